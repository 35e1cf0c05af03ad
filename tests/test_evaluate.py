"""Evaluation: hand-computed Dice / surface Dice / HD95, summary.json, and the evaluate command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_sitk

from diffprobe.cli.app import main
from diffprobe.errors import DiffprobeError
from diffprobe.evaluation import class_metrics, dice, evaluate_folders, format_table, hd95, load_summary
from diffprobe.evaluation import normalized_surface_dice as nsd

SHAPE = (8, 8, 8)


def cube(start=(2, 2, 2), size=3, shape=SHAPE, value=1) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(s, s + size) for s in start)] = value
    return out


def test_dice_hand_computed():
    a, b = cube((2, 2, 2), size=2), cube((2, 2, 3), size=2)  # 8 voxels each, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / (8 + 8))
    # 3x3x3 cubes shifted by one slice share 2 of 3 slices: 2 * 18 / 54
    assert dice(cube(), cube((3, 2, 2))) == pytest.approx(2 / 3)


def test_surface_dice_hand_computed_anisotropic():
    """Two 3x3x3 cubes, the second one slice higher (z), spacing (z, y, x) = (2, 1, 1) mm.

    Each cube has 26 surface voxels (all but its centre). For cube A (z = 0..2 of the cube):
    - its bottom slice (9 voxels) is outside B; B's nearest surface voxel is one slice up,
      2 mm away -> outside a 1.5 mm tolerance;
    - its middle slice (8 surface voxels) lies on B's bottom slice, all B surface -> 0 mm;
    - its top slice (9 voxels) is B's middle slice: 8 rim voxels are B surface (0 mm), the
      centre is B's interior, 1 mm in-plane from B's rim -> within tolerance.
    So 17 of 26 voxels of A are within 1.5 mm of B; by symmetry 17 of 26 of B too:
    NSD = (17 + 17) / (26 + 26) = 17/26. At 2 mm every distance (max 2 mm) is within.
    """
    a, b, spacing = cube(), cube((3, 2, 2)), (2.0, 1.0, 1.0)
    assert nsd(a, b, spacing, 1.5) == pytest.approx(17 / 26)
    assert nsd(a, b, spacing, 2.0) == 1.0
    # the same one-voxel shift along x (1 mm) is within 1.5 mm everywhere
    assert nsd(a, cube((2, 2, 3)), spacing, 1.5) == 1.0


def test_hd95_of_shifted_cubes_is_the_shift():
    # z-shift of one 2 mm slice: 18 of 52 pooled surface distances are 2 mm, the rest smaller
    assert hd95(cube(), cube((3, 2, 2)), (2.0, 1.0, 1.0)) == pytest.approx(2.0)
    # 6^3 cubes shifted two voxels along x at 0.7 mm: a whole face is 1.4 mm from the other surface
    a, b = cube((1, 1, 0), 6, (8, 8, 10)), cube((1, 1, 2), 6, (8, 8, 10))
    assert hd95(a, b, (1.0, 1.0, 0.7)) == pytest.approx(1.4)
    assert hd95(a, a, (1.0, 1.0, 0.7)) == 0.0


def test_mask_touching_the_array_border():
    full = np.ones((3, 3, 3), bool)  # its border voxels are surface
    m = class_metrics(full, full, (1.0, 1.0, 1.0), 1.0)
    assert (m["Dice"], m["NSD"], m["HD95"], m["n_ref"]) == (1.0, 1.0, 0.0, 27)


def test_empty_cases():
    empty, spacing = np.zeros(SHAPE, bool), (1.0, 1.0, 1.0)
    both = class_metrics(empty, empty, spacing, 2.0)
    assert all(math.isnan(both[k]) for k in ("Dice", "NSD", "HD95")) and both["n_ref"] == both["n_pred"] == 0
    for ref, pred in ((empty, cube()), (cube(), empty)):
        one = class_metrics(ref, pred, spacing, 2.0)
        assert (one["Dice"], one["NSD"], one["HD95"]) == (0.0, 0.0, math.inf)
        assert one["n_ref"] + one["n_pred"] == 27


def write_case(folder: Path, name: str, array: np.ndarray, spacing=(1.0, 1.0, 2.0), **kw) -> Path:
    return write_sitk(array, folder / name, spacing=spacing, **kw)  # spacing x, y, z


def two_class_folders(tmp_path: Path) -> tuple[Path, Path]:
    """case_a perfect; case_b class 1 shifted one slice, class 2 in neither; case_c misses class 2."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    both = cube() + cube((5, 5, 5), 2, value=2)
    write_case(ref, "case_a.nii.gz", both)
    write_case(pred, "case_a.nrrd", both)  # paired by case name across formats
    write_case(ref, "case_b.nii.gz", cube())
    write_case(pred, "case_b.nii.gz", cube((3, 2, 2)))
    write_case(ref, "case_c.nii.gz", both)
    write_case(pred, "case_c.mha", cube())
    (pred / "notes.txt").write_text("not an image")
    return ref, pred


def test_summary_json(tmp_path):
    ref, pred = two_class_folders(tmp_path)
    out = tmp_path / "summary.json"
    summary = evaluate_folders(ref, pred, tolerance_mm=2.0, output=out, show_progress=False)
    assert summary["labels"] == {"1": 1, "2": 2} and summary["num_cases"] == 3
    raw = json.loads(out.read_text())  # strict JSON: null for NaN, "inf" for infinity
    case_b = next(c for c in raw["metric_per_case"] if c["reference_file"].endswith("case_b.nii.gz"))
    assert case_b["prediction_file"].endswith("case_b.nii.gz")
    assert case_b["metrics"]["1"]["Dice"] == pytest.approx(2 / 3)
    assert case_b["metrics"]["1"]["HD95"] == pytest.approx(2.0)  # one 2 mm slice
    assert case_b["metrics"]["2"] == {"Dice": None, "NSD": None, "HD95": None, "n_ref": 0, "n_pred": 0}
    assert raw["mean"]["2"]["HD95"] == "inf"  # case_c missed class 2
    # means skip NaN: class 2 is scored in case_a (1.0) and case_c (0.0) only
    assert raw["mean"]["1"]["Dice"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert raw["mean"]["2"]["Dice"] == pytest.approx(0.5) and raw["mean"]["2"]["n_cases"] == 2
    assert raw["foreground_mean"]["Dice"] == pytest.approx(((1 + 2 / 3 + 1) / 3 + 0.5) / 2)
    loaded = load_summary(out)
    assert math.isinf(loaded["mean"]["2"]["HD95"]) and math.isnan(loaded["metric_per_case"][1]["metrics"]["2"]["NSD"])
    assert format_table(loaded) == format_table(summary)
    # named labels; two workers give the same numbers
    named = evaluate_folders(ref, pred, labels={"background": 0, "big": 1, "small": 2}, num_processes=2,
                             show_progress=False)
    assert named["labels"] == {"big": 1, "small": 2}
    assert json.dumps(named["mean"]) == json.dumps(summary["mean"])
    assert "big" in format_table(named) and "foreground mean" in format_table(named)


def test_shape_mismatch(tmp_path):
    write_case(tmp_path / "ref", "c.nii.gz", cube())
    write_case(tmp_path / "pred", "c.nii.gz", cube(shape=(8, 8, 9)))
    with pytest.raises(DiffprobeError, match="shape") as err:
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", show_progress=False)
    assert err.value.file == str(tmp_path / "pred" / "c.nii.gz")


def test_cli_evaluate_with_dataset_names(roots, tmp_path, capsys):
    ref, pred = two_class_folders(tmp_path)
    ds = roots["raw"] / "Dataset007_Eval"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 0,
                                                 "labels": {"background": 0, "liver": 1, "kidney": 2},
                                                 "file_ending": ".nii.gz"}))
    assert main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-d", "7", "--tolerance", "1.5"]) == 0
    summary = load_summary(pred / "summary.json")
    assert summary["labels"] == {"liver": 1, "kidney": 2} and summary["tolerance_mm"] == 1.5
    err = capsys.readouterr().err
    assert "liver" in err and "kidney" in err and "NSD@1.5mm" in err


def test_cli_help(capsys):
    assert main(["evaluate", "--help"]) == 0
    assert "diffprobe evaluate" in capsys.readouterr().out


def test_cli_missing_prediction(tmp_path, capsys):
    ref, pred = two_class_folders(tmp_path)
    (pred / "case_b.nii.gz").unlink()
    assert main(["evaluate", "-ref", str(ref), "-pred", str(pred)]) == 1
    err = capsys.readouterr().err
    assert "case_b.nii.gz" in err and "no prediction" in err and "Traceback" not in err
    assert not (pred / "summary.json").exists()


def test_cli_geometry_mismatch(tmp_path, capsys):
    ref, pred = two_class_folders(tmp_path)
    write_case(pred, "case_b.nii.gz", cube(), spacing=(1.0, 1.0, 2.5))
    assert main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err
    assert str(pred / "case_b.nii.gz") in err and "geometry differs" in err and "Traceback" not in err


def test_reference_in_another_orientation_is_reoriented_exactly(tmp_path):
    """A reference holding the same voxels with a flipped y axis (as the shared real CT's label) is
    compared voxel for voxel after an exact rearrangement, never paired by array index."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    spacing, shape = (1.0, 1.0, 2.0), SHAPE
    labels = cube((1, 1, 2), 3) + cube((5, 6, 5), 2, value=2)
    write_case(pred, "case.nii.gz", labels, spacing=spacing)
    extent_y = (shape[1] - 1) * spacing[1]
    flipped = labels[:, ::-1, :].copy()
    write_case(ref, "case.nii.gz", flipped, spacing=spacing, origin=(0.0, extent_y, 0.0),
               direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    summary = evaluate_folders(ref, pred)
    assert summary["mean"]["1"]["Dice"] == pytest.approx(1.0)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(1.0)
    # the same array stored without the flip (paired by index) would not match
    write_case(ref, "case.nii.gz", flipped, spacing=spacing)
    assert evaluate_folders(ref, pred)["mean"]["1"]["Dice"] < 0.5
