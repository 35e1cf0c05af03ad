"""The bad-input matrix of docs/bad-inputs.md: one test per row, run through the CLI entry point.

Every row must end with one message naming the file and a fix, exit code 1, no traceback,
and every file an earlier successful run wrote keeping its bytes. The test ids are the row
names of the table. Run with ``-rP`` to see each row's message.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_inputs_support import (
    DS,
    Roots,
    assert_clean_failure,
    enospc,
    refuse_writes_in,
    run_cli,
    set_dataset_json,
    tree_hashes,
)
from conftest import body_volume, make_raw_dataset, write_sitk

from diffprobe.paths import roots_at


@pytest.fixture(scope="module")
def preprocessed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny valid dataset (id 5), planned and preprocessed once for the whole module."""
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    base = tmp_path_factory.mktemp("bad_inputs_template")
    make_raw_dataset(base / "raw", shape=(10, 24, 28))
    (base / "results").mkdir()
    with roots_at(base):
        plan_and_preprocess(5, num_processes=1, show_progress=False)
    return base


@pytest.fixture
def ds(preprocessed_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    """A private copy of the template (mtimes kept, so an unchanged raw dataset is recognised)."""
    base = tmp_path / "roots"
    shutil.copytree(preprocessed_template, base)
    for kind in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"DIFFPROBE_{kind.upper()}", str(base / kind))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return Roots(base, base / "raw" / DS, base / "preprocessed" / DS / "diffprobe")


# ---- rows on the raw dataset (plan_and_preprocess) ------------------------------------------
def _missing_dataset_json(f: Path, tmp: Path) -> list[str]:
    (f / "dataset.json").unlink()
    return ["dataset.json is missing", f"{DS}/dataset.json"]


def _invalid_json(f: Path, tmp: Path) -> list[str]:
    (f / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
    return ["dataset.json is not valid JSON", f"{DS}/dataset.json", "fix the JSON syntax"]


def _missing_keys(f: Path, tmp: Path) -> list[str]:
    (f / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2}}))
    return ["dataset.json lacks channel_names, numTraining, file_ending", f"{DS}/dataset.json"]


def _wrong_type(key: str, value: object, message: str) -> Callable[[Path, Path], list[str]]:
    def mutate(f: Path, tmp: Path) -> list[str]:
        set_dataset_json(f, **{key: value})
        return [message, f"{DS}/dataset.json"]
    return mutate


def _rename_image(new_name: str) -> Callable[[Path, Path], list[str]]:
    def mutate(f: Path, tmp: Path) -> list[str]:
        (f / "imagesTr" / "case2_0000.nii.gz").rename(f / "imagesTr" / new_name)
        return [f"imagesTr/{new_name}"]
    return mutate


def _missing_channel(f: Path, tmp: Path) -> list[str]:
    set_dataset_json(f, channel_names={"0": "CT", "1": "CT_late"})
    return ["lacks channel(s) 0001", "case0_0001.nii.gz", "add the missing channel file(s)"]


def _write_image(array: np.ndarray, **kw: object) -> Callable[[Path, Path], list[str]]:
    def mutate(f: Path, tmp: Path) -> list[str]:
        write_sitk(array, f / "imagesTr" / "case1_0000.nii.gz", **kw)
        return ["imagesTr/case1_0000.nii.gz"]
    return mutate


def _truncated(f: Path, tmp: Path) -> list[str]:
    p = f / "imagesTr" / "case0_0000.nii.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return ["imagesTr/case0_0000.nii.gz", "truncated or corrupt", "re-export"]


def _garbage(f: Path, tmp: Path) -> list[str]:
    (f / "imagesTr" / "case0_0000.nii.gz").write_bytes(np.random.default_rng(0).bytes(4000))
    return ["imagesTr/case0_0000.nii.gz", "cannot be read as an image (Unable to determine ImageIO reader for "
            "the file)", "re-export"]


def _gzip_garbage(f: Path, tmp: Path) -> list[str]:
    (f / "imagesTr" / "case0_0000.nii.gz").write_bytes(gzip.compress(b"garbage" * 100))
    return ["imagesTr/case0_0000.nii.gz", "cannot be read as an image"]


def _non_finite(value: float) -> Callable[[Path, Path], list[str]]:
    def mutate(f: Path, tmp: Path) -> list[str]:
        img, _ = body_volume((10, 24, 28), seed=1)
        img = img.astype(np.float32)
        img[3, 4, 5] = value
        write_sitk(img, f / "imagesTr" / "case1_0000.nii.gz")
        return ["imagesTr/case1_0000.nii.gz", "NaN/inf voxels", "replace non-finite voxels"]
    return mutate


def _undeclared_label(f: Path, tmp: Path) -> list[str]:
    _, lab = body_volume((10, 24, 28), seed=0)
    lab[0, 0, :3] = 7
    write_sitk(lab, f / "labelsTr" / "case0.nii.gz")
    return ["labelsTr/case0.nii.gz", "label values [7] are not declared in dataset.json", "declare them"]


def _label_geometry(**kw: object) -> Callable[[Path, Path], list[str]]:
    def mutate(f: Path, tmp: Path) -> list[str]:
        shape = kw.pop("shape", (10, 24, 28))
        _, lab = body_volume(shape, seed=0)
        write_sitk(lab, f / "labelsTr" / "case0.nii.gz", **kw)
        return ["labelsTr/case0.nii.gz", "label geometry differs physically from the image",
                "resample the label onto the image grid"]
    return mutate


def _empty_images_tr(f: Path, tmp: Path) -> list[str]:
    shutil.rmtree(f / "imagesTr")
    shutil.rmtree(f / "labelsTr")
    (f / "imagesTr").mkdir()
    return ["imagesTr: imagesTr holds no images", "add images named <case>_0000.nii.gz"]


def _empty_images_tr_with_labels(f: Path, tmp: Path) -> list[str]:
    shutil.rmtree(f / "imagesTr")
    (f / "imagesTr").mkdir()
    return ["labelsTr/case0.nii.gz: label has no matching image", "add imagesTr/case0_0000.nii.gz"]


def _listed(entry: dict) -> Callable[[Path, Path], list[str]]:
    def mutate(f: Path, tmp: Path) -> list[str]:
        set_dataset_json(f, dataset={"case0": {"images": ["imagesTr/case0_0000.nii.gz"],
                                               "label": "labelsTr/case0.nii.gz"}, **entry})
        return [f"{DS}/dataset.json", "dataset.case9", "inside"]
    return mutate


def _listed_symlink(f: Path, tmp: Path) -> list[str]:
    outside = tmp / "elsewhere" / "secret_0000.nii.gz"
    outside.parent.mkdir()
    shutil.copy(f / "imagesTr" / "case0_0000.nii.gz", outside)
    (f / "imagesTr" / "case9_0000.nii.gz").symlink_to(outside)
    set_dataset_json(f, dataset={"case9": {"images": ["imagesTr/case9_0000.nii.gz"], "label": None}})
    return [f"{DS}/dataset.json", "symbolic link that resolves outside the dataset folder", "copy the file"]


DATASET_ROWS: dict[str, Callable[[Path, Path], list[str]]] = {
    "missing_dataset_json": _missing_dataset_json,
    "dataset_json_invalid_json": _invalid_json,
    "dataset_json_missing_keys": _missing_keys,
    "dataset_json_wrong_type_channel_names": _wrong_type("channel_names", ["CT"],
                                                         "channel_names must map channel numbers to names"),
    "dataset_json_wrong_type_labels": _wrong_type("labels", ["background", "liver"],
                                                  "labels must be a non-empty object"),
    "dataset_json_wrong_type_label_id": _wrong_type("labels", {"background": 0, "liver": "1"},
                                                    "label 'liver' has id '1', not a non-negative integer"),
    "dataset_json_wrong_type_numTraining": _wrong_type("numTraining", "3",
                                                       "numTraining must be a non-negative integer"),
    "dataset_json_wrong_type_file_ending": _wrong_type("file_ending", 3, "file_ending 3 is not supported"),
    "channel_suffix_missing": _rename_image("case2.nii.gz"),
    "channel_suffix_undeclared": _rename_image("case2_0001.nii.gz"),
    "missing_channel": _missing_channel,
    "image_2d": _write_image(np.zeros((24, 28), np.int16), spacing=(1.0, 1.0), origin=(0.0, 0.0),
                             direction=(1, 0, 0, 1)),
    "image_4d": _write_image(np.zeros((2, 10, 24, 28), np.int16), spacing=(1.0,) * 4, origin=(0.0,) * 4,
                             direction=tuple(np.eye(4).ravel())),
    "truncated_nii_gz": _truncated,
    "corrupt_nii_gz_garbage": _garbage,
    "corrupt_nii_gz_gzipped_garbage": _gzip_garbage,
    "nan_voxels": _non_finite(np.nan),
    "inf_voxels": _non_finite(np.inf),
    "constant_image": _write_image(np.full((10, 24, 28), -1000, np.int16)),
    "undeclared_label_values": _undeclared_label,
    "label_geometry_spacing": _label_geometry(spacing=(1.0, 1.0, 2.5)),
    "label_geometry_origin": _label_geometry(origin=(0.0, 5.0, 0.0)),
    "label_geometry_direction": _label_geometry(direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "label_geometry_shape": _label_geometry(shape=(10, 24, 20)),
    "empty_imagesTr": _empty_images_tr,
    "empty_imagesTr_labels_left": _empty_images_tr_with_labels,
    "dataset_list_absolute_path": _listed({"case9": {"images": ["/etc/passwd"], "label": None}}),
    "dataset_list_dotdot_path": _listed({"case9": {"images": ["../../outside_0000.nii.gz"], "label": None}}),
    "dataset_list_symlink_outside": _listed_symlink,
}
ROW_EXPECT = {  # what each dataset row's message says, beyond the file name
    "channel_suffix_missing": ["name lacks the channel suffix _0000", "rename it to case2_0000.nii.gz"],
    "channel_suffix_undeclared": ["channel 0001 is not declared in dataset.json channel_names",
                                  "declare the channel or remove the file"],
    "image_2d": ["image is 2D", "export the whole scan (all slices) as one 3D volume"],
    "image_4d": ["image is 4D", "split 4D series into one file per channel"],
    "constant_image": ["image is constant (every voxel = -1000)", "re-export the scan"],
    "dataset_list_absolute_path": ["'/etc/passwd' is an absolute path"],
    "dataset_list_dotdot_path": ["contains '..'"],
}


@pytest.mark.parametrize("row", list(DATASET_ROWS))
def test_dataset_row(row: str, ds: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Bad raw data: plan_and_preprocess refuses it and the earlier run's outputs keep their bytes."""
    before = tree_hashes(ds.pre)
    expected = DATASET_ROWS[row](ds.raw, tmp_path) + ROW_EXPECT.get(row, [])
    code, text = run_cli(["plan_and_preprocess", "-d", "5", "-np", "1"], capfd)
    assert_clean_failure(code, text, *expected)
    assert tree_hashes(ds.pre) == before


def test_missing_dataset(ds: Roots, capfd: pytest.CaptureFixture) -> None:
    code, text = run_cli(["plan_and_preprocess", "-d", "77", "-np", "1"], capfd)
    assert_clean_failure(code, text, "no dataset with id 077", str(ds.base / "raw"),
                         "create one with `diffprobe make_phantoms -d 77`")


def test_missing_dataset_folder_named(ds: Roots, capfd: pytest.CaptureFixture) -> None:
    """A full folder name whose raw folder is gone (only the preprocessed one is left)."""
    before = tree_hashes(ds.pre)
    shutil.rmtree(ds.raw)
    code, text = run_cli(["plan_and_preprocess", "-d", DS, "-np", "1"], capfd)
    assert_clean_failure(code, text, f"raw/{DS}: dataset folder does not exist", "make_phantoms")
    assert tree_hashes(ds.pre) == before


# ---- plans.json edited into an invalid state ------------------------------------------------
def _edit_plans(pre: Path, edit: Callable[[dict], None] | str) -> None:
    path = pre / "plans.json"
    if isinstance(edit, str):
        path.write_text(edit)
        return
    plans = json.loads(path.read_text())
    edit(plans)
    path.write_text(json.dumps(plans, indent=1))


PLANS_ROWS: dict[str, tuple[Callable[[dict], None] | str, str]] = {
    "plans_invalid_json": ('{"plans_version": 1, "patch_size": [16, 16,', "plans file is not valid JSON"),
    "plans_negative_patch_size": (lambda p: p.update(patch_size=[-16, 16, 16]),
                                  "invalid value for 'patch_size': need three positive integers"),
    "plans_patch_size_wrong_type": (lambda p: p.update(patch_size="16x16x16"),
                                    "invalid value for 'patch_size'"),
    "plans_unknown_normalisation": (lambda p: p["preprocessing"]["normalization"]["0"].update(scheme="minmax"),
                                    "invalid value for 'preprocessing.normalization.0.scheme': must be "
                                    "'ct_window' or 'zscore_per_image', got 'minmax'"),
    "plans_window_reversed": (lambda p: p["preprocessing"]["normalization"]["0"].update(window_hu=[400, -100]),
                              "invalid value for 'preprocessing.normalization.0.window_hu': need two numbers "
                              "low, high with low < high"),
    "plans_normalization_wrong_type": (lambda p: p["preprocessing"].update(normalization="ct"),
                                       "invalid value for 'preprocessing.normalization'"),
    "plans_section_wrong_type": (lambda p: p.update(diffusion=[1000]),
                                 "invalid value for 'diffusion': must be a JSON object"),
    "plans_batch_size_zero": (lambda p: p.update(batch_size=0), "invalid value for 'batch_size'"),
    "plans_timestep_out_of_range": (lambda p: p["diffusion"].update(feature_timesteps=[10, 5000]),
                                    "invalid value for 'diffusion.feature_timesteps'"),
}


@pytest.mark.parametrize("row", list(PLANS_ROWS))
def test_plans_row(row: str, ds: Roots, capfd: pytest.CaptureFixture) -> None:
    """The stage reading an edited plans.json names the key and the --replan fix; nothing is rewritten."""
    edit, message = PLANS_ROWS[row]
    _edit_plans(ds.pre, edit)
    before = tree_hashes(ds.pre)
    code, text = run_cli(["plan_and_preprocess", "-d", "5", "-np", "1"], capfd)
    assert_clean_failure(code, text, f"{DS}/diffprobe/plans.json", message,
                         f"diffprobe plan_and_preprocess -d {DS} --replan")
    assert tree_hashes(ds.pre) == before


def test_replan_repairs_invalid_plans(ds: Roots, capfd: pytest.CaptureFixture) -> None:
    """The fix the plans rows name really works."""
    _edit_plans(ds.pre, lambda p: p.update(patch_size=[-16, 16, 16]))
    code, text = run_cli(["plan_and_preprocess", "-d", DS, "--replan", "-np", "1"], capfd)
    assert code == 0, text
    assert json.loads((ds.pre / "plans.json").read_text())["patch_size"][0] > 0


# ---- output that cannot be written ----------------------------------------------------------
def test_preprocessed_root_below_a_file(ds: Roots, monkeypatch: pytest.MonkeyPatch,
                                        capfd: pytest.CaptureFixture) -> None:
    (ds.base / "a_file").write_text("x")
    monkeypatch.setenv("DIFFPROBE_PREPROCESSED", str(ds.base / "a_file" / "preprocessed"))
    code, text = run_cli(["plan_and_preprocess", "-d", "5", "-np", "1"], capfd)
    assert_clean_failure(code, text, "DIFFPROBE_PREPROCESSED points to", "lies below the file",
                         "set DIFFPROBE_PREPROCESSED to a folder")
    assert (ds.base / "a_file").read_text() == "x"


def test_preprocessed_folder_not_writable(ds: Roots, monkeypatch: pytest.MonkeyPatch,
                                          capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(ds.pre)
    refuse_writes_in(monkeypatch, ds.pre)
    try:
        code, text = run_cli(["plan_and_preprocess", "-d", "5", "--replan", "-np", "1"], capfd)
    finally:
        ds.pre.chmod(0o755)
    assert_clean_failure(code, text, "cannot write this file (Permission denied)", f"{DS}/diffprobe/",
                         "make", "writable or choose another output folder")
    assert tree_hashes(ds.pre) == before


def test_disk_full_writing_plans(ds: Roots, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(ds.pre)
    monkeypatch.setattr(os, "fsync", enospc)  # write_json's last step before the rename
    code, text = run_cli(["plan_and_preprocess", "-d", "5", "--override", "batch_size=1", "-np", "1"], capfd)
    assert_clean_failure(code, text, f"{DS}/diffprobe/plans.json: disk full while writing this file (its "
                         "previous version is unchanged)", "free space on")
    assert tree_hashes(ds.pre) == before  # no temp file left either


def test_disk_full_writing_preprocessed_case(ds: Roots, monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture) -> None:
    import blosc2

    img, _ = body_volume((10, 24, 28), seed=7)
    write_sitk(img, ds.raw / "imagesTr" / "case7_0000.nii.gz")  # a new case: only it is preprocessed
    before = {k: v for k, v in tree_hashes(ds.pre).items() if k.startswith("data/")}
    monkeypatch.setattr(blosc2, "asarray", enospc)
    code, text = run_cli(["plan_and_preprocess", "-d", "5", "-np", "1"], capfd)
    assert_clean_failure(code, text, "data/case7.b2nd: disk full while writing this file")
    after = {k: v for k, v in tree_hashes(ds.pre).items() if k.startswith("data/")}
    assert after == before

