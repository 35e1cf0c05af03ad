"""The bad-input matrix of docs/bad-inputs.md: one test per row, run through the CLI entry point.

Every row must end with one message naming the file and a fix, exit code 1, no traceback,
and every file an earlier successful run wrote keeping its bytes. The test ids are the row
names of the table. Run with ``-rP`` to see each row's message.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import body_volume, make_raw_dataset, write_dicom_series, write_sitk

from diffprobe.cli.app import main
from diffprobe.paths import roots_at

DS = "Dataset005_Tiny"


# ---- helpers ------------------------------------------------------------------------------
def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha1} of every file under ``folder``: what 'nothing was damaged' compares.

    Left temporary files count (they would show up as new entries); lock files (``.lock``, which
    record the run holding them) do not.
    """
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def run_cli(args: list[str], capfd: pytest.CaptureFixture) -> tuple[int, str]:
    """``diffprobe ARGS`` in-process; (exit code, everything it printed)."""
    capfd.readouterr()  # drop earlier output (e.g. the log line of a previous call)
    code = main(args)
    out, err = capfd.readouterr()
    text = out + err
    print(f"$ diffprobe {' '.join(args)}\n{text}")  # shown with -rP: the messages of docs/bad-inputs.md
    return code, text


def assert_clean_failure(code: int, text: str, *expected: str) -> None:
    """Exit code 1, no traceback, a fix line, and every expected fragment (file names, reasons)."""
    assert code == 1, text
    assert "Traceback" not in text, text
    assert "fix:" in text, text
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


@dataclass
class Roots:
    base: Path
    raw: Path  # the raw dataset folder
    pre: Path  # its preprocessed diffprobe/ folder (plans.json, fingerprint, data/)


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


def set_dataset_json(folder: Path, **changes: object) -> None:
    ds = json.loads((folder / "dataset.json").read_text())
    ds.update(changes)
    (folder / "dataset.json").write_text(json.dumps(ds))


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
def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_preprocessed_root_below_a_file(ds: Roots, monkeypatch: pytest.MonkeyPatch,
                                        capfd: pytest.CaptureFixture) -> None:
    (ds.base / "a_file").write_text("x")
    monkeypatch.setenv("DIFFPROBE_PREPROCESSED", str(ds.base / "a_file" / "preprocessed"))
    code, text = run_cli(["plan_and_preprocess", "-d", "5", "-np", "1"], capfd)
    assert_clean_failure(code, text, "DIFFPROBE_PREPROCESSED points to", "lies below the file",
                         "set DIFFPROBE_PREPROCESSED to a folder")
    assert (ds.base / "a_file").read_text() == "x"


def refuse_writes_in(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` non-writable: chmod, plus (root ignores modes) temp files refused in it."""
    folder.chmod(0o555)
    real = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object):
        if Path(str(kwargs.get("dir", ""))).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


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


# ---- rows that need a trained probe (predict, train) ----------------------------------------
@pytest.fixture
def probe(trained_probe_roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    """A private copy of the session's trained probe results (raw and preprocessed are shared,
    read-only); torch on one thread."""
    results = tmp_path / "results"
    shutil.copytree(trained_probe_roots["results"], results,
                    ignore=shutil.ignore_patterns("bpr_maps", "*.png"))
    monkeypatch.setenv("DIFFPROBE_RAW", str(trained_probe_roots["raw"]))
    monkeypatch.setenv("DIFFPROBE_PREPROCESSED", str(trained_probe_roots["preprocessed"]))
    monkeypatch.setenv("DIFFPROBE_RESULTS", str(results))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Roots(tmp_path, trained_probe_roots["raw"] / "Dataset001_Phantoms",
                results / "Dataset001_Phantoms" / "diffprobe" / "tiny__fpn" / "fold_all")
    torch.set_num_threads(threads)


def probe_image(probe: Roots) -> Path:
    return sorted((probe.raw / "imagesTs").glob("*_0000.nii.gz"))[0]


PREDICT = ["-d", "1", "-c", "tiny__fpn", "-f", "all", "-device", "cpu"]


def write_dicom(array: np.ndarray, folder: Path, series_uid: str) -> list[Path]:
    """One series per call; two calls with other UIDs put two series in one folder."""
    return write_dicom_series(array, folder, series_uid=series_uid,
                              file_name=lambda k, n: f"{series_uid[-1]}_{k:03d}.dcm")


def test_dicom_two_series(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    img, _ = body_volume((6, 24, 28))
    folder = tmp_path / "dicom"
    write_dicom(img, folder, "1.2.3.4.1")
    write_dicom(img, folder, "1.2.3.4.2")
    code, text = run_cli(["predict", "-i", str(folder), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, f"{folder}: folder holds 2 DICOM series (1.2.3.4.1, 1.2.3.4.2)",
                         "put each series in its own folder")
    assert not any((tmp_path / "out").glob("*"))


def test_dicom_missing_slice(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    img, _ = body_volume((6, 24, 28))
    folder = tmp_path / "dicom"
    files = write_dicom(img, folder, "1.2.3.4.1")
    files[3].unlink()
    code, text = run_cli(["predict", "-i", str(folder), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, f"{folder}: DICOM series has missing slice(s): 5 mm between 1_002.dcm and "
                         "1_004.dcm", "other slices are 2.5 mm apart", "copy the complete series")
    assert not any((tmp_path / "out").glob("*"))


def test_predict_output_below_a_file(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "segs"
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(out), *PREDICT], capfd)
    assert_clean_failure(code, text, f"{out}: cannot create the output folder", "choose a writable output folder")
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.fixture
def previous_prediction(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> Path:
    """An output folder holding a finished prediction of the test image."""
    out = tmp_path / "segs"
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(out), *PREDICT], capfd)
    assert code == 0, text
    return out


def test_predict_output_not_writable(probe: Roots, previous_prediction: Path, monkeypatch: pytest.MonkeyPatch,
                                     capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(previous_prediction)
    refuse_writes_in(monkeypatch, previous_prediction)
    try:
        code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(previous_prediction), *PREDICT],
                             capfd)
    finally:
        previous_prediction.chmod(0o755)
    name = probe_image(probe).name.replace("_0000", "")
    assert_clean_failure(code, text, f"{previous_prediction / name}: cannot write this file (Permission denied) "
                         "(its previous version is unchanged)", "writable or choose another output folder")
    assert tree_hashes(previous_prediction) == before


def test_disk_full_writing_prediction(probe: Roots, previous_prediction: Path, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(previous_prediction)
    monkeypatch.setattr(sitk, "WriteImage", enospc)
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(previous_prediction), *PREDICT], capfd)
    name = probe_image(probe).name.replace("_0000", "")
    assert_clean_failure(code, text, f"{previous_prediction / name}: disk full while writing this file (its "
                         "previous version is unchanged)")
    assert tree_hashes(previous_prediction) == before  # no temp file left either


def test_disk_full_writing_checkpoint(probe: Roots, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(probe.pre)
    monkeypatch.setattr(torch, "save", enospc)
    code, text = run_cli(["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--c", "--steps", "4",
                          "-device", "cpu"], capfd)
    assert_clean_failure(code, text, "fold_all/checkpoint_", "disk full while writing this file (its previous "
                         "version is unchanged)")
    assert {k: v for k, v in tree_hashes(probe.pre).items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}


# ---- checkpoints from elsewhere -------------------------------------------------------------
def test_probe_from_another_dataset(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A trained probe folder copied under another dataset's results is refused, not used."""
    other = probe.pre.parents[3] / "Dataset002_Other" / "diffprobe" / "tiny__fpn" / "fold_all"
    shutil.copytree(probe.pre, other)
    (probe.raw.parent / "Dataset002_Other").mkdir(exist_ok=True)
    try:
        code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), "-d", "2",
                              "-device", "cpu"], capfd)
    finally:
        (probe.raw.parent / "Dataset002_Other").rmdir()  # the raw root is the shared session fixture's
    assert_clean_failure(code, text, f"{other / 'probe.json'}: this probe was trained on Dataset001_Phantoms, "
                         "but lies in the results of Dataset002_Other", "train a probe for Dataset002_Other")
    assert not (tmp_path / "out").exists()


def test_probe_checkpoint_of_another_network(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A head checkpoint whose tensors do not fit (another dataset's class count) is refused."""
    from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(probe.pre / "checkpoint_final.pt")
    key = next(k for k, v in reversed(ckpt["model"].items()) if v.ndim >= 1)
    ckpt["model"][key] = torch.zeros(ckpt["model"][key].shape[0] + 3, *ckpt["model"][key].shape[1:])
    ckpt.pop("format")
    save_checkpoint(probe.pre / "checkpoint_final.pt", ckpt)
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "fold_all/checkpoint_final.pt: checkpoint does not fit this network",
                         "size mismatch", "rerun `diffprobe train`")


def test_checkpoint_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    ckpt = torch.load(probe.pre / "checkpoint_final.pt", weights_only=True)
    ckpt["format"] = 99
    torch.save(ckpt, probe.pre / "checkpoint_final.pt")
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "fold_all/checkpoint_final.pt: checkpoint has an unknown format/version",
                         "retrain with this diffprobe version")


def test_probe_json_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    meta = json.loads((probe.pre / "probe.json").read_text())
    meta["format"] = 1  # the per-patch GroupNorm heads
    (probe.pre / "probe.json").write_text(json.dumps(meta))
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "fold_all/probe.json: probe format 1 is not supported by this version",
                         "retrain the probe")


def test_pretrained_model_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model_json = probe.base / "results" / "pretrained" / "tiny" / "model.json"
    meta = json.loads(model_json.read_text())
    meta["format"] = 7
    model_json.write_text(json.dumps(meta))
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "pretrained/tiny/model.json: pretrained model format 7 is not supported",
                         "install a model made by this diffprobe version")


def test_install_model_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    archive = tmp_path / "tiny.zip"
    assert run_cli(["export_model", "tiny", str(archive)], capfd)[0] == 0
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["model.json"])
    meta["format"] = 7
    members["model.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(archive, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    code, text = run_cli(["install_model", str(archive), "--name", "other"], capfd)
    assert_clean_failure(code, text, f"{archive}: model format 7 is not supported by this version",
                         "export the model with the same diffprobe version")
    assert not (probe.base / "results" / "pretrained" / "other").exists()


# ---- rows closed after the first matrix (model names, resume checkpoints, memory) ---------------
@pytest.mark.parametrize("name", ["../escape", "/abs/model", "a/b"])
def test_pretrain_name_escaping_results(probe: Roots, name: str, capfd: pytest.CaptureFixture) -> None:
    """`pretrain --name` becomes a folder under results/pretrained: path-like names are refused."""
    before = tree_hashes(probe.base)
    code, text = run_cli(["pretrain", "-d", "1", "--name", name, "--bpr_steps", "1",
                          "--diffusion_steps", "1", "-device", "cpu"], capfd)
    assert_clean_failure(code, text, name)
    assert tree_hashes(probe.base) == before


def test_resume_from_checkpoint_of_another_network(probe: Roots, capfd: pytest.CaptureFixture) -> None:
    """`train --c` with a checkpoint_latest.pt whose tensors do not fit the head: one message, not
    PyTorch's key list; the checkpoint itself is left as it was."""
    from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint

    latest = probe.pre / "checkpoint_latest.pt"
    ckpt = load_checkpoint(latest)
    ckpt["model"] = {k: torch.zeros(3, 1) for k in ckpt["model"]}
    save_checkpoint(latest, {k: v for k, v in ckpt.items() if k != "format"})
    before = tree_hashes(probe.pre)
    code, text = run_cli(["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--c", "--steps", "4",
                          "-device", "cpu"], capfd)
    assert_clean_failure(code, text, "checkpoint_latest.pt")
    assert {k: v for k, v in tree_hashes(probe.pre).items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}


# ---- clean refusals of issue 15 (timesteps, folds, model.json dataset names, install limits) ----
def _num_timesteps(probe: Roots) -> int:
    meta = json.loads((probe.base / "results" / "pretrained" / "tiny" / "model.json").read_text())
    return int(meta["plans"]["diffusion"]["num_timesteps"])


@pytest.mark.parametrize("command", [
    ["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--steps", "1", "-device", "cpu"],
    ["ablate", "timesteps", "-d", "1", "-f", "all", "-m", "tiny", "--steps", "1", "-device", "cpu"],
    ["tune_timesteps", "-d", "1", "-f", "all", "-m", "tiny", "--steps", "1", "-device", "cpu", "--dry_run"],
    ["features", "-i", "IMAGE", "-o", "OUT", "--pretrained", "tiny", "-device", "cpu"],
], ids=["train", "ablate_timesteps", "tune_timesteps", "features"])
def test_timestep_out_of_range(probe: Roots, tmp_path: Path, command: list[str],
                               capfd: pytest.CaptureFixture) -> None:
    """`--t 5000` of a model with T steps: one message naming the range from the model's plans, up front
    (nothing trained, no probe folder, no features file), not a ValueError of the feature extractor."""
    steps = _num_timesteps(probe)
    args = [str(probe_image(probe)) if a == "IMAGE" else str(tmp_path / "f.npz") if a == "OUT" else a
            for a in command]
    results = probe.base / "results"
    before = tree_hashes(results)
    code, text = run_cli([*args, "--t", "10", str(steps + 4000)], capfd)
    assert_clean_failure(code, text, "pretrained/tiny/model.json", f"--t {steps + 4000}: outside the diffusion "
                         f"steps of the pretrained model 'tiny', 0 to {steps - 1}", f"choose --t between 0 and "
                         f"{steps - 1}")
    assert tree_hashes(results) == before
    assert not (tmp_path / "f.npz").exists()


@pytest.fixture
def probe_own_splits(probe: Roots, trained_probe_roots: dict[str, Path], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> Roots:
    """``probe`` with a private copy of the preprocessed dataset: a fold run creates splits_final.json
    there, which must not land in the session's shared folder."""
    pre = tmp_path / "preprocessed"
    shutil.copytree(trained_probe_roots["preprocessed"], pre)
    monkeypatch.setenv("DIFFPROBE_PREPROCESSED", str(pre))
    return probe


FOLD_COMMANDS = {
    "train": ["train", "-d", "1", "--pretrained", "tiny", "--steps", "1", "-device", "cpu"],
    "ablate_timesteps": ["ablate", "timesteps", "-d", "1", "-m", "tiny", "--t", "10", "--steps", "1", "-device", "cpu"],
    "ablate_controls": ["ablate", "controls", "-d", "1", "--pretrained", "tiny", "--quick", "-device", "cpu"],
    "ablate_labels": ["ablate", "labels", "-d", "1", "--n", "1", "--pretrained", "tiny", "--quick", "-device", "cpu"],
    "tune_timesteps": ["tune_timesteps", "-d", "1", "-m", "tiny", "--t", "10", "--steps", "1", "-device", "cpu",
                       "--dry_run"],
}


@pytest.mark.parametrize("fold,message", [
    ("-1", "-f -1: fold '-1' does not exist, folds are numbered 0 to 2 (3 folds in splits_final.json); they do "
           "not count from the end (-1 is not the last fold)"),
    ("3", "-f 3: fold '3' does not exist, folds are numbered 0 to 2 (3 folds in splits_final.json)"),
    ("x", "-f x: fold 'x' does not exist, folds are numbered 0 to 2"),
], ids=["negative", "past_the_last", "not_a_number"])
@pytest.mark.parametrize("command", list(FOLD_COMMANDS))
def test_fold_that_does_not_exist(probe_own_splits: Roots, command: str, fold: str, message: str,
                                  capfd: pytest.CaptureFixture) -> None:
    """`-f -1` used to mean Python's "last split" (trained into fold_-1/); `-f 3` of 3 folds: refused up
    front, naming the splits file and the valid folds; nothing trained or pretrained."""
    results = probe_own_splits.base / "results"
    before = tree_hashes(results)
    code, text = run_cli([*FOLD_COMMANDS[command], "-f", fold], capfd)
    assert_clean_failure(code, text, "splits_final.json", message, "use -f 0..2 or -f all")
    assert tree_hashes(results) == before


def test_predict_fold_that_does_not_exist(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """predict checks -f against the trained folds (here only `all`): -1 is not 'the last one'."""
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), "-d", "1",
                          "-c", "tiny__fpn", "-f", "-1", "-device", "cpu"], capfd)
    assert_clean_failure(code, text, "tiny__fpn: fold(s) -1 of tiny__fpn are not trained (available: all)",
                         "choose existing folds with -f")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where,name", [
    ("datasets", "../../x"), ("datasets", "/abs"), ("datasets", "Dataset001_../../x"), ("plans", "../x"),
])
@pytest.mark.parametrize("command", [
    ["sample", "--name", "tiny", "-n", "1", "--steps", "1"],
    ["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--steps", "1", "-device", "cpu"],
], ids=["sample", "train"])
def test_model_json_dataset_name_with_path_parts(probe: Roots, where: str, name: str, command: list[str],
                                                 capfd: pytest.CaptureFixture) -> None:
    """A model.json naming its dataset '../../x' or '/abs' is refused, not followed into that folder."""
    model_json = probe.base / "results" / "pretrained" / "tiny" / "model.json"
    meta = json.loads(model_json.read_text())
    if where == "datasets":
        meta["datasets"] = [name]
    else:
        meta["plans"]["dataset"] = name
    model_json.write_text(json.dumps(meta))
    before = tree_hashes(probe.base / "results")
    code, text = run_cli(command, capfd)
    assert_clean_failure(code, text, f"{model_json}: model.json names dataset(s) {name!r} that are not plain "
                         "DatasetXXX_Name folder names", "pretrain the model again")
    assert tree_hashes(probe.base / "results") == before


def test_install_model_dataset_name_with_path_parts(probe: Roots, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture) -> None:
    archive = tmp_path / "tiny.zip"
    assert run_cli(["export_model", "tiny", str(archive)], capfd)[0] == 0
    _rewrite_zip(archive, lambda members: members.update(
        {"model.json": json.dumps({**json.loads(members["model.json"]), "datasets": ["../../x"]}).encode()}))
    code, text = run_cli(["install_model", str(archive), "--name", "other"], capfd)
    assert_clean_failure(code, text, f"{archive}: model.json names dataset(s) '../../x'")
    assert sorted(p.name for p in (probe.base / "results" / "pretrained").iterdir()) == ["tiny"]


def _rewrite_zip(archive: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)


# install_model limits: crafted archives, refused before anything is unpacked under results/pretrained
def _bomb(path: Path, members: dict[str, int], model_json: bytes | None = None) -> Path:
    """A zip of highly compressible members (name -> uncompressed bytes of zeros) and a model.json."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.json", model_json or json.dumps({"name": "bomb", "format": 2}).encode())
        for name, size in members.items():
            zf.writestr(name, bytes(size))
    return path


INSTALL_ROWS: dict[str, tuple[dict[str, int], str | None, str, str]] = {
    # row: (members, DIFFPROBE_INSTALL_MAX_GB, message, fix)
    "install_model_too_many_members": ({f"f{i}.png": 1 for i in range(70)}, None,
                                       "archive holds 71 members, more than the 64 a model archive may hold",
                                       "only install archives written by `diffprobe export_model`"),
    "install_model_member_too_large": ({"diffusion/checkpoint_final.pt": 3 << 20}, "0.001",
                                       "archive member 'diffusion/checkpoint_final.pt' unpacks to 3.0 MB, more than "
                                       "the 1.0 MB one member may", "set DIFFPROBE_INSTALL_MAX_GB (GB) above it"),
    "install_model_total_too_large": ({"bpr/checkpoint_final.pt": 700 << 10,
                                       "diffusion/checkpoint_final.pt": 700 << 10}, "0.001",
                                      "archive unpacks to 1.4 MB, more than the 1.0 MB a model may",
                                      "set DIFFPROBE_INSTALL_MAX_GB (GB) above it"),
}


@pytest.mark.parametrize("row", list(INSTALL_ROWS))
def test_install_model_limits(row: str, roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capfd: pytest.CaptureFixture) -> None:
    members, limit, message, fix = INSTALL_ROWS[row]
    if limit:
        monkeypatch.setenv("DIFFPROBE_INSTALL_MAX_GB", limit)
    archive = _bomb(tmp_path / "bomb.zip", members)
    code, text = run_cli(["install_model", str(archive), "--name", "bomb"], capfd)
    assert_clean_failure(code, text, f"{archive}: {message}", fix)
    assert list((roots["results"] / "pretrained").iterdir()) == []  # no temporary folder left either


def test_install_model_not_enough_disk(roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture) -> None:
    archive = _bomb(tmp_path / "big.zip", {"diffusion/checkpoint_final.pt": 2 << 20})
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    code, text = run_cli(["install_model", str(archive), "--name", "big"], capfd)
    assert_clean_failure(code, text, "archive unpacks to 2.0 MB, but", "has only 1.0 MB free", "free space on")
    assert list((roots["results"] / "pretrained").iterdir()) == []


def test_install_model_member_twice(roots: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    import warnings
    import zipfile

    archive = tmp_path / "twice.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(archive, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        zf.writestr("model.json", json.dumps({"name": "t", "format": 2}))
        zf.writestr("model.json", json.dumps({"name": "t", "format": 2, "datasets": ["/abs"]}))
    code, text = run_cli(["install_model", str(archive)], capfd)
    assert_clean_failure(code, text, f"{archive}: archive member 'model.json' appears twice")
    assert list((roots["results"] / "pretrained").iterdir()) == []


def test_install_model_header_understates_size(roots: dict[str, Path], tmp_path: Path,
                                               capfd: pytest.CaptureFixture) -> None:
    """A member whose central-directory size is smaller than what its stream inflates to (a lying
    header): unpacking stops at the declared size and the archive is refused, not trusted."""
    archive = _bomb(tmp_path / "liar.zip", {"diffusion/loss_curve.png": 1 << 20})
    data = bytearray(archive.read_bytes())
    entry = data.rindex(b"PK\x01\x02")  # the last central-directory entry: the png
    data[entry + 24:entry + 28] = (16).to_bytes(4, "little")  # uncompressed size: 16 bytes
    archive.write_bytes(bytes(data))
    code, text = run_cli(["install_model", str(archive), "--name", "liar"], capfd)
    assert_clean_failure(code, text, f"{archive}: archive member 'diffusion/loss_curve.png'",
                         "download or copy the archive again")
    assert list((roots["results"] / "pretrained").iterdir()) == []


def test_install_model_tar_archive(roots: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A .tar (even one holding ../ members) is refused as such; nothing is unpacked."""
    import io
    import tarfile

    archive = tmp_path / "model.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("model.json", "../../evil.txt"):
            data = json.dumps({"name": "t", "format": 2}).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    code, text = run_cli(["install_model", str(archive), "--name", "t"], capfd)
    assert_clean_failure(code, text, f"{archive}: not a zip archive", "pass the .zip file written by")
    assert not (roots["results"] / "pretrained").exists()
    assert not (tmp_path.parent / "evil.txt").exists()
