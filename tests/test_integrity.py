"""One test per integrity error kind; each names the file and a fix, and all bad cases are reported at once."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import body_volume, make_raw_dataset, write_sitk

from diffprobe.errors import DiffprobeError, IntegrityError
from diffprobe.fingerprint import compute_fingerprint


def problems_of(folder):
    with pytest.raises(IntegrityError) as exc:
        compute_fingerprint(folder, num_processes=1, show_progress=False)
    return exc.value.problems


def test_valid_dataset_passes(roots):
    folder = make_raw_dataset(roots["raw"])
    fp = compute_fingerprint(folder, num_processes=1, show_progress=False)
    assert fp["num_cases"] == 3 and fp["num_labelled"] == 2


def test_missing_dataset_json(roots):
    folder = make_raw_dataset(roots["raw"])
    (folder / "dataset.json").unlink()
    with pytest.raises(DiffprobeError, match="dataset.json is missing"):
        compute_fingerprint(folder, 1, False)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"labels": {"background": 0}}), "lacks channel_names"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 1}, "numTraining": 1, "file_ending": ".nii.gz"}),
     "no background"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": [1, 2]}, "numTraining": 1,
                 "file_ending": ".nii.gz"}), "region-based"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 1,
                 "file_ending": ".png"}), "file_ending"),
    (json.dumps({"modality": {"0": "CT"}, "labels": {"background": 0}}), "v1 format"),
])
def test_malformed_dataset_json(roots, content, match):
    folder = make_raw_dataset(roots["raw"])
    (folder / "dataset.json").write_text(content)
    with pytest.raises(DiffprobeError, match=match) as exc:
        compute_fingerprint(folder, 1, False)
    assert "dataset.json" in str(exc.value) and exc.value.fix


def test_wrong_channel_suffix(roots):
    folder = make_raw_dataset(roots["raw"])
    (folder / "imagesTr" / "case2_0000.nii.gz").rename(folder / "imagesTr" / "case2.nii.gz")
    (p,) = problems_of(folder)
    assert "case2.nii.gz" in p.file and "_0000" in p.what and "case2_0000" in p.fix


def test_missing_channel(roots):
    folder = make_raw_dataset(roots["raw"])
    ds = json.loads((folder / "dataset.json").read_text())
    ds["channel_names"] = {"0": "CT", "1": "CT_late"}
    (folder / "dataset.json").write_text(json.dumps(ds))
    probs = problems_of(folder)
    assert len(probs) == 3 and all("lacks channel(s) 0001" in p.what for p in probs)


@pytest.mark.parametrize("ndim", [2, 4])
def test_wrong_dimensionality(roots, ndim):
    folder = make_raw_dataset(roots["raw"])
    shape = (40, 48) if ndim == 2 else (2, 12, 40, 48)
    write_sitk(np.zeros(shape, np.int16), folder / "imagesTr" / "case1_0000.nii.gz",
               spacing=(1.0,) * ndim, origin=(0.0,) * ndim, direction=tuple(np.eye(ndim).ravel()))
    (p,) = problems_of(folder)
    assert p.file.endswith("case1_0000.nii.gz") and f"{ndim}D" in p.what


def test_truncated_file(roots):
    folder = make_raw_dataset(roots["raw"])
    f = folder / "imagesTr" / "case0_0000.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    (p,) = problems_of(folder)
    assert p.file.endswith("case0_0000.nii.gz") and ("truncated" in p.what or "cannot be read" in p.what)


def test_not_gzip(roots):
    folder = make_raw_dataset(roots["raw"])
    f = folder / "imagesTr" / "case0_0000.nii.gz"
    f.write_bytes(gzip.compress(b"garbage" * 100))
    (p,) = problems_of(folder)
    assert "cannot be read" in p.what


def test_nan_voxels(roots):
    folder = make_raw_dataset(roots["raw"])
    img, _ = body_volume()
    img = img.astype(np.float32)
    img[3, 4, 5] = np.nan
    write_sitk(img, folder / "imagesTr" / "case1_0000.nii.gz")
    (p,) = problems_of(folder)
    assert "NaN" in p.what and p.file.endswith("case1_0000.nii.gz")


def test_constant_image(roots):
    folder = make_raw_dataset(roots["raw"])
    write_sitk(np.zeros((12, 40, 48), np.int16), folder / "imagesTr" / "case2_0000.nii.gz")
    (p,) = problems_of(folder)
    assert "constant" in p.what


def test_undeclared_label_values(roots):
    folder = make_raw_dataset(roots["raw"])
    _, lab = body_volume()
    lab[0, 0, :3] = 7
    write_sitk(lab, folder / "labelsTr" / "case0.nii.gz")
    (p,) = problems_of(folder)
    assert "[7]" in p.what and "not declared" in p.what and p.file.endswith("case0.nii.gz")


def test_geometry_mismatch_refused(roots):
    folder = make_raw_dataset(roots["raw"])
    _, lab = body_volume()
    write_sitk(lab, folder / "labelsTr" / "case0.nii.gz", spacing=(1.0, 1.0, 2.5))
    (p,) = problems_of(folder)
    assert "geometry differs physically" in p.what and "spacing" in p.what


def test_origin_shift_refused(roots):
    folder = make_raw_dataset(roots["raw"])
    _, lab = body_volume()
    write_sitk(lab, folder / "labelsTr" / "case1.nii.gz", origin=(0.0, 5.0, 0.0))
    (p,) = problems_of(folder)
    assert "extent" in p.what


def test_flipped_label_reoriented(roots):
    folder = make_raw_dataset(roots["raw"])
    _, lab = body_volume(seed=0)
    # same voxels, y axis flipped: origin at the other end, direction -y
    write_sitk(lab[:, ::-1, :].copy(), folder / "labelsTr" / "case0.nii.gz", origin=(0.0, 39.0, 0.0),
               direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    fp = compute_fingerprint(folder, 1, False)
    assert any("reoriented" in n for n in fp["notes"])


def test_label_without_image(roots):
    folder = make_raw_dataset(roots["raw"])
    _, lab = body_volume()
    write_sitk(lab, folder / "labelsTr" / "orphan.nii.gz")
    (p,) = problems_of(folder)
    assert "no matching image" in p.what


def test_all_bad_cases_reported_in_one_run(roots):
    folder = make_raw_dataset(roots["raw"], n_labelled=3, n_unlabelled=0)
    _, lab = body_volume()
    lab[0, 0, 0] = 9
    write_sitk(lab, folder / "labelsTr" / "case0.nii.gz")
    write_sitk(lab * 0, folder / "labelsTr" / "case1.nii.gz", spacing=(2.0, 2.0, 2.0))
    (folder / "imagesTr" / "case2_0000.nii.gz").write_bytes(b"xx")
    probs = problems_of(folder)
    files = sorted(p.file.rsplit("/", 1)[-1] for p in probs)
    assert files == ["case0.nii.gz", "case1.nii.gz", "case2_0000.nii.gz"]


def test_empty_images_tr(roots):
    folder = make_raw_dataset(roots["raw"], n_labelled=0, n_unlabelled=0)
    (folder / "imagesTr").mkdir(exist_ok=True)
    with pytest.raises(DiffprobeError, match="holds no images"):
        compute_fingerprint(folder, 1, False)


def test_cli_reports_without_traceback(roots):
    folder = make_raw_dataset(roots["raw"])
    (folder / "imagesTr" / "case2_0000.nii.gz").write_bytes(b"xx")
    _, lab = body_volume()
    lab[0, 0, 0] = 9
    write_sitk(lab, folder / "labelsTr" / "case0.nii.gz")
    res = subprocess.run([sys.executable, "-m", "diffprobe", "plan_and_preprocess", "-d", "5"],
                         capture_output=True, text=True)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    assert "2 problem(s)" in out and "case2_0000.nii.gz" in out and "case0.nii.gz" in out and "fix:" in out
