"""Preprocessing: round trip to the raw geometry, idempotency, interrupted cases."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import body_volume, make_raw_dataset, write_sitk

from diffprobe.io.image_io import read_image, read_label, write_image
from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.preprocessing.normalization import denormalize_ct
from diffprobe.preprocessing.preprocess import revert_to_original, seg_onto_preprocessed
from diffprobe.preprocessing.storage import load_case
from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

FLIP_Y = (1, 0, 0, 0, -1, 0, 0, 0, 1)
OBLIQUE = tuple(np.array([[0.98480775, -0.17364818, 0], [0.17364818, 0.98480775, 0], [0, 0, 1]]).ravel())


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def roundtrip(roots, direction, target_spacing=None, spacing=(0.9, 0.9, 2.5)):
    folder = make_raw_dataset(roots["raw"], n_labelled=2, n_unlabelled=0, spacing=spacing, shape=(14, 44, 52))
    for i in range(2):  # rewrite with the requested direction (same arrays)
        for sub, name in (("imagesTr", f"case{i}_0000"), ("labelsTr", f"case{i}")):
            p = folder / sub / f"{name}.nii.gz"
            img = sitk.ReadImage(str(p))
            img.SetDirection(direction)
            img.SetOrigin((12.5, -30.0, 100.0))
            sitk.WriteImage(img, str(p), True)
    kwargs = {"target_spacing_override": target_spacing} if target_spacing else None
    plan_and_preprocess(5, num_processes=1, plan_kwargs=kwargs, show_progress=False)
    data_dir, plans, ids = preprocessed_cases(5)
    assert ids == ["case0", "case1"]
    data, seg, props = load_case(data_dir, "case0")
    norm = plans["preprocessing"]["normalization"]["0"]
    img_back, geom = revert_to_original(data[0], props, is_seg=False, fill_value=-1.0)
    img_back = denormalize_ct(img_back, norm)
    seg_back, _ = revert_to_original(seg, props, is_seg=True)
    raw_img = read_image(folder / "imagesTr" / "case0_0000.nii.gz")
    raw_lab = read_label(folder / "labelsTr" / "case0.nii.gz")
    # the forward twin: the raw label onto the preprocessed grid is exactly what preprocessing stored
    np.testing.assert_array_equal(seg_onto_preprocessed(raw_lab.array, props), seg)
    return img_back, seg_back, geom, raw_img, raw_lab, props


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), FLIP_Y, OBLIQUE])
def test_roundtrip_exact_without_resampling(roots, direction, tmp_path):
    img_back, seg_back, geom, raw_img, raw_lab, props = roundtrip(roots, direction, target_spacing=[2.5, 0.9, 0.9])
    assert geom == raw_img.geometry
    assert img_back.shape == raw_img.array.shape
    np.testing.assert_array_equal(seg_back, raw_lab.array)
    lo, hi = props["bbox"][0]
    inside = np.zeros(raw_img.array.shape, bool)
    # compare inside the body bbox (outside was cropped away)
    amap_inside = revert_to_original(np.ones(props["shape_after_resampling"], np.uint8), props, True)[0] > 0
    inside |= amap_inside
    np.testing.assert_allclose(img_back[inside], raw_img.array[inside], atol=0.05)
    # written file opens with the raw file's exact geometry
    out = tmp_path / "back.nii.gz"
    write_image(seg_back, geom, out)
    back = sitk.ReadImage(str(out))
    ref = sitk.ReadImage(str(roots["raw"] / "Dataset005_Tiny" / "labelsTr" / "case0.nii.gz"))
    assert back.GetSpacing() == ref.GetSpacing() and back.GetOrigin() == ref.GetOrigin()
    assert back.GetDirection() == ref.GetDirection()


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), FLIP_Y])
def test_roundtrip_with_resampling(roots, direction):
    img_back, seg_back, geom, raw_img, raw_lab, props = roundtrip(roots, direction, target_spacing=[2.0, 1.2, 1.2])
    assert props["shape_after_resampling"] != props["shape_after_crop"]
    assert geom == raw_img.geometry and seg_back.shape == raw_lab.array.shape
    for c in (1, 2):
        assert dice(seg_back == c, raw_lab.array == c) > 0.85
    inside = revert_to_original(np.ones(props["shape_after_resampling"], np.uint8), props, True)[0] > 0
    err = np.abs(img_back[inside] - raw_img.array[inside])
    assert np.median(err) < 15  # HU; noise std is 10 HU, cubic resampling smooths it
    assert np.corrcoef(img_back[inside], raw_img.array[inside])[0, 1] > 0.9


def test_normalised_range_and_labels(roots):
    make_raw_dataset(roots["raw"])
    rep = plan_and_preprocess(5, num_processes=1, show_progress=False)
    data_dir, plans, ids = preprocessed_cases(5)
    data, seg, props = load_case(data_dir, "case0")
    assert data.dtype == np.float32 and data.min() >= -1 and data.max() <= 1
    assert set(np.unique(seg)) <= {0, 1, 2}
    assert props["class_locations"]["1"] and len(props["class_locations"]["1"][0]) == 3
    _, seg2, props2 = load_case(data_dir, "case2")
    assert seg2 is None and not props2["labelled"]
    assert (rep.folder / "dataset_fingerprint.json").is_file() and (rep.folder / "dataset.json").is_file()


def test_idempotent_and_resumes_interrupted_case(roots):
    make_raw_dataset(roots["raw"])
    first = plan_and_preprocess(5, num_processes=2, show_progress=False)
    assert sorted(first.processed) == ["case0", "case1", "case2"]
    second = plan_and_preprocess(5, num_processes=1, show_progress=False)
    assert second.processed == [] and second.fingerprint_reused and second.plans_reused
    data_dir = first.folder / "data"
    ref = (data_dir / "case1.b2nd").read_bytes()
    # simulate a run killed while writing case1: data half-written, no properties JSON, a temp file left
    (data_dir / "case1.json").unlink()
    (data_dir / "case1.b2nd").write_bytes(ref[: len(ref) // 3])
    (data_dir / ".case1.b2nd.abc.tmp.b2nd").write_bytes(b"partial")
    third = plan_and_preprocess(5, num_processes=1, show_progress=False)
    assert third.processed == ["case1"]
    assert (data_dir / "case1.b2nd").read_bytes() == ref  # deterministic: same bytes as before
    assert not list(data_dir.glob(".*tmp*"))
    clean = plan_and_preprocess(5, num_processes=1, clean=True, show_progress=False)
    assert sorted(clean.processed) == ["case0", "case1", "case2"]


def test_edited_plans_are_kept_and_validated(roots):
    make_raw_dataset(roots["raw"])
    rep = plan_and_preprocess(5, num_processes=1, show_progress=False)
    plans = json.loads(rep.plans_path.read_text())
    plans["batch_size"] = 5
    rep.plans_path.write_text(json.dumps(plans))
    again = plan_and_preprocess(5, num_processes=1, show_progress=False)
    assert again.plans_reused and json.loads(rep.plans_path.read_text())["batch_size"] == 5
    # changing preprocessing-relevant values re-preprocesses the cases
    plans["preprocessing"]["target_spacing"] = [2.0, 1.5, 1.5]
    rep.plans_path.write_text(json.dumps(plans))
    assert sorted(plan_and_preprocess(5, num_processes=1, show_progress=False).processed) == ["case0", "case1", "case2"]
    plans["patch_size"] = [5, 5, 5]
    rep.plans_path.write_text(json.dumps(plans))
    from diffprobe.errors import DiffprobeError

    with pytest.raises(DiffprobeError, match="patch_size"):
        plan_and_preprocess(5, num_processes=1, show_progress=False)


def test_raw_change_refreshes_fingerprint(roots):
    folder = make_raw_dataset(roots["raw"])
    plan_and_preprocess(5, num_processes=1, show_progress=False)
    img, _ = body_volume(seed=9)
    write_sitk(img, folder / "imagesTr" / "case9_0000.nii.gz")
    rep = plan_and_preprocess(5, num_processes=1, show_progress=False)
    assert not rep.fingerprint_reused and rep.processed == ["case9"]


def test_seg_onto_preprocessed_refuses_another_grid(roots):
    """A prediction of another scan (or one written on a resampled grid) is refused, not cropped silently."""
    make_raw_dataset(roots["raw"])
    plan_and_preprocess(5, num_processes=1, show_progress=False)
    data_dir, _, _ = preprocessed_cases(5)
    _, _, props = load_case(data_dir, "case0")
    wrong = np.zeros([n + 1 for n in props["shape_before_crop"]], np.uint8)
    with pytest.raises(ValueError, match="raw shape"):
        seg_onto_preprocessed(wrong, props)
