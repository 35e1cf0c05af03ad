"""Tests for the synthetic CT phantom generator.

Small, coarse configs keep the file fast; statistics that are noisy per case (organ medians) are
pooled over a dozen cases so the thresholds test the model, not the luck of one noise draw.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffprobe.phantoms import LABELS, PhantomCase, PhantomConfig, generate_case, make_phantom_dataset

SMALL = PhantomConfig(num_train_labelled=2, num_train_unlabelled=1, num_test=1, seed=3, fov_mm=60.0,
                      spacing_inplane=(1.0, 1.5), spacing_slice=(2.5, 4.0), scan_length_mm=(40.0, 70.0))
N_CASES = 12

# Expected median HU per organ (nominal value +- tolerance for per-case sampling and partial volume).
ORGAN_MEDIAN_RANGE = {
    "liver": (47, 63), "spleen": (40, 56), "kidney_right": (27, 43), "kidney_left": (27, 43),
    "aorta": (34, 50), "adrenal_right": (22, 40),
}


@pytest.fixture(scope="module")
def cases() -> list[PhantomCase]:
    return [generate_case(SMALL, i) for i in range(N_CASES)]


def _pooled(cases: list[PhantomCase], name: str) -> np.ndarray:
    return np.concatenate([c.image[c.label == LABELS[name]] for c in cases]).astype(np.float64)


def _world_centroid(case: PhantomCase, label: int) -> np.ndarray | None:
    idx = np.argwhere(case.label == label)  # (z, y, x)
    if len(idx) == 0:
        return None
    return np.array(case.origin) + idx.mean(0)[::-1] * np.array(case.spacing)  # (x, y, z) mm


def test_determinism() -> None:
    a, b = generate_case(SMALL, 5), generate_case(SMALL, 5)
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8
    assert a.image.shape == a.label.shape
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.spacing == b.spacing and a.origin == b.origin
    # A case does not depend on which other cases were generated, and the seed matters.
    generate_case(SMALL, 4)
    np.testing.assert_array_equal(generate_case(SMALL, 5).image, a.image)
    c = generate_case(replace(SMALL, seed=SMALL.seed + 1), 5)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_tissue_intensities() -> None:
    # Without noise and blur every tissue class shows its own value range.
    clean = replace(SMALL, noise_hu=(0.0, 0.0), blur_sigma_vox=(0.0, 0.0))
    images = [generate_case(clean, i).image for i in range(N_CASES)]
    for img in images:
        corners = np.concatenate([img[:, :2, :2].ravel(), img[:, -2:, -2:].ravel()])
        assert np.all(corners == -1000)  # air outside the body
        assert ((img >= -125) & (img <= -75)).sum() > 100  # subcutaneous / visceral fat
        assert (img >= 400).sum() > 20  # cortical bone of the spine
        assert ((img >= 250) & (img <= 400)).sum() > 20  # cancellous bone
    lung_counts = [((img >= -920) & (img <= -780)).sum() for img in images]
    assert max(lung_counts) > 1000  # scans reaching above the diaphragm contain lung
    assert min(lung_counts) == 0  # ... and low scans do not


def test_noisy_images_keep_air_and_bone(cases: list[PhantomCase]) -> None:
    for c in cases:
        assert abs(np.median(c.image[:, :3, :3]) + 1000) <= 10  # noise std up to 20 HU
        assert (c.image >= 400).any()
        # Organ voxels are inside the body: never air or lung.
        assert c.image[c.label > 0].min() > -400


def test_organ_hu(cases: list[PhantomCase]) -> None:
    for name, (lo, hi) in ORGAN_MEDIAN_RANGE.items():
        values = _pooled(cases, name)
        assert values.size > 50, name
        assert lo <= np.median(values) <= hi, (name, np.median(values))
    right, left = _pooled(cases, "kidney_right"), _pooled(cases, "kidney_left")
    assert abs(np.median(right) - np.median(left)) < 10
    for c in cases:  # also per case, where both kidneys are well sampled
        r, lf = c.image[c.label == LABELS["kidney_right"]], c.image[c.label == LABELS["kidney_left"]]
        if r.size > 100 and lf.size > 100:
            assert abs(np.median(r) - np.median(lf)) < 10
    # Intensity alone cannot separate kidney from aorta or adrenal: 5-95 % ranges overlap.
    k5, k95 = np.percentile(right, [5, 95])
    for other in ("aorta", "adrenal_right"):
        o5, o95 = np.percentile(_pooled(cases, other), [5, 95])
        assert o5 < k95 and k5 < o95, other


def test_anatomy(cases: list[PhantomCase]) -> None:
    n_kidneys = n_liver_spleen = n_adrenal = 0
    for c in cases:
        kr, kl = _world_centroid(c, LABELS["kidney_right"]), _world_centroid(c, LABELS["kidney_left"])
        if kr is not None and kl is not None:
            assert kl[0] > kr[0]  # left kidney on the patient's left (+x in LPS)
            n_kidneys += 1
        liver, spleen = _world_centroid(c, LABELS["liver"]), _world_centroid(c, LABELS["spleen"])
        if liver is not None and spleen is not None:
            assert liver[0] < spleen[0]
            n_liver_spleen += 1
        assert (c.label == LABELS["liver"]).any() or (c.label == LABELS["kidney_right"]).any()
        fraction = (c.label == LABELS["adrenal_right"]).mean()
        assert fraction < 0.005
        n_adrenal += fraction > 0
        assert set(np.unique(c.label)) <= set(LABELS.values())
    assert n_kidneys >= N_CASES // 2 and n_liver_spleen >= N_CASES // 2
    assert n_adrenal >= N_CASES // 2


def test_left_kidney_higher() -> None:
    # Averaged over cases (the window may clip a kidney in any single case), the left kidney is
    # higher; use tall scans so both kidneys are fully covered.
    tall = replace(SMALL, scan_length_mm=(140.0, 150.0))
    dz = []
    for i in range(6):
        c = generate_case(tall, i)
        kr, kl = _world_centroid(c, LABELS["kidney_right"]), _world_centroid(c, LABELS["kidney_left"])
        if kr is not None and kl is not None:
            dz.append(kl[2] - kr[2])
    assert len(dz) >= 3 and np.mean(dz) > 0


def test_per_case_variation(cases: list[PhantomCase]) -> None:
    spacings = np.array([c.spacing for c in cases])
    assert np.all(spacings[:, 0] == spacings[:, 1])  # isotropic in-plane
    assert SMALL.spacing_inplane[0] <= spacings[:, 0].min() and spacings[:, 0].max() <= SMALL.spacing_inplane[1]
    assert SMALL.spacing_slice[0] <= spacings[:, 2].min() and spacings[:, 2].max() <= SMALL.spacing_slice[1]
    assert len(np.unique(spacings[:, 0])) == N_CASES and len(np.unique(spacings[:, 2])) == N_CASES
    first_z = np.array([c.origin[2] for c in cases])
    assert np.ptp(first_z) > 10.0  # scans start at different heights
    kidney_slice = [np.argwhere(c.label == LABELS["kidney_right"])[:, 0].mean() for c in cases
                    if (c.label == LABELS["kidney_right"]).any()]
    assert len(np.unique(np.round(kidney_slice))) >= 3  # position must be inferred, not indexed


def test_default_case_speed() -> None:
    t0 = time.perf_counter()
    case = generate_case(PhantomConfig(), 0)
    elapsed = time.perf_counter() - t0
    assert 100 <= case.image.shape[1] <= 190 and case.image.shape[1] == case.image.shape[2]
    assert elapsed < 5.0  # ~0.3 s typical on one core; generous for loaded CI machines


def test_make_phantom_dataset(tmp_path: Path) -> None:
    out = make_phantom_dataset(tmp_path / "Dataset001_Phantoms", SMALL)
    assert out == tmp_path / "Dataset001_Phantoms"
    meta = json.loads((out / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending", "name", "description", "phantom_config"):
        assert key in meta
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == LABELS and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 3 and meta["phantom_config"]["seed"] == SMALL.seed

    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "phantom_000_0000.nii.gz", "phantom_001_0000.nii.gz", "phantom_002_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["phantom_100_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["phantom_100.nii.gz"]

    expected = generate_case(SMALL, 1)
    img = sitk.ReadImage(str(out / "imagesTr" / "phantom_001_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTr" / "phantom_001.nii.gz"))
    assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(img.GetSpacing(), expected.spacing, rtol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), expected.origin, atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expected.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), expected.label)
    test_label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / "phantom_100.nii.gz")))
    assert set(np.unique(test_label)) <= set(LABELS.values())
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_portal_venous_phase_changes_intensities_only(cases: list[PhantomCase]) -> None:
    """Same seed, contrast phase: identical anatomy and labels; enhanced organs brighter than
    muscle, kidneys and aorta still overlap (intensity alone does not separate them)."""
    pv = [generate_case(replace(SMALL, phase="portal_venous"), i) for i in range(N_CASES)]
    for native, enhanced in zip(cases, pv, strict=True):
        np.testing.assert_array_equal(native.label, enhanced.label)
    medians = {name: float(np.median(_pooled(pv, name))) for name in ORGAN_MEDIAN_RANGE}
    assert 90 < medians["liver"] < 120 and 105 < medians["spleen"] < 135
    assert 130 < medians["kidney_right"] < 190 and 130 < medians["aorta"] < 185  # partial volume lowers both
    k5, k95 = np.percentile(_pooled(pv, "kidney_right"), [5, 95])
    a5, a95 = np.percentile(_pooled(pv, "aorta"), [5, 95])
    assert a5 < k95 and k5 < a95
    with pytest.raises(ValueError, match="phase must be one of"):
        generate_case(replace(SMALL, phase="arterial"), 0)
