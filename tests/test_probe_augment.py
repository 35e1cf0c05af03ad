"""Spatial augmentation of probe training patches: image, labels and guidance move together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffprobe.preprocessing.volumes import VolumeRef, read_region
from diffprobe.probe.augment import SpatialAugment, augmented_region

SHAPE = (30, 80, 90)


def _volumes():
    """Labels in 10-voxel blocks (class = block index mod 4); image = class / 10; guidance = (z, y, x)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    seg = ((z // 10 + y // 10 + x // 10) % 4).astype(np.float32)[None]
    image = seg / 10
    guide = np.stack([z, y, x]).astype(np.float32)
    return image, seg, guide


@pytest.fixture
def patches_of(monkeypatch):
    import diffprobe.probe.data as probe_data

    image, seg, guide = _volumes()
    monkeypatch.setattr(probe_data, "open_array", lambda path: seg if "_seg" in str(path) else image)
    monkeypatch.setattr(probe_data, "patch_guidance",
                        lambda mode, ref, start, size: read_region(guide, start, size, fill=0.0, edge=True))
    ref = VolumeRef(Path("."), "case", SHAPE, (3.0, 1.5, 1.5))
    vol = probe_data.LabelledVolume(ref, {str(k): [[15, 40, 45]] for k in range(1, 4)})

    def make(p: float):
        return probe_data.LabelledPatches([vol], [16, 32, 32], 8, "bpr", 0.5, seed=0, augment=SpatialAugment(p=p))
    return make


def test_identity_and_quarter_turn_resample_exactly():
    vol = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)

    def read(at, size):
        return read_region(vol, at, size, fill=-1.0)

    start, patch = np.array([3, 5, 7]), (16, 32, 32)
    np.testing.assert_array_equal(augmented_region(read, start, patch, np.eye(3), order=1), read(start, patch))
    quarter = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
    turned = augmented_region(read, start, patch, quarter, order=1)
    assert min(np.abs(turned - np.rot90(read(start, patch), k, axes=(2, 3))).max() for k in (1, 3)) < 1e-5


def test_draw_is_identity_or_a_rotation_about_z_with_a_zoom():
    aug, rng = SpatialAugment(p=0.5), np.random.default_rng(0)
    matrices = [aug.draw(rng, (3.0, 1.5, 1.5)) for _ in range(400)]
    identity = sum(m is None for m in matrices)
    assert 0.15 < identity / 400 < 0.35  # (1 - p)^2 = 0.25
    for m in (m for m in matrices if m is not None):
        assert m[0, 1] == m[0, 2] == m[1, 0] == m[2, 0] == 0  # z is never mixed into y/x
        zoom = m[0, 0]
        assert 0.8 - 1e-9 <= zoom <= 1.25 + 1e-9
        assert np.isclose(np.linalg.det(m[1:, 1:]), zoom**2)  # in-plane: rotation (no shear) times the zoom


def test_augmented_batches_keep_labels_image_and_guidance_aligned(patches_of):
    plain, aug = patches_of(0.0).batch(5), patches_of(1.0).batch(5)
    assert plain["seeds"] == aug["seeds"]  # the same crops (noise seeds follow the start): only the warp differs
    assert not np.array_equal(plain["image"].numpy(), aug["image"].numpy())
    image, seg = aug["image"][:, 0].numpy(), aug["seg"].numpy()
    # where the (linear) image is a pure class value, the (nearest) label is that class; mixed values
    # only at block borders, and the air fill (-1) outside the volume
    pure = np.isclose(image * 10, np.rint(image * 10), atol=1e-3) & (image >= 0)
    assert pure.mean() > 0.5
    assert (np.rint(image * 10) == seg)[pure].mean() > 0.97
    # the guidance is the source position: rebuilding the labels from it gives the labels
    guide = aug["guidance"].numpy()
    top = np.array(SHAPE)[None, :, None, None, None] - 1
    g = np.clip(np.rint(guide).astype(int), 0, top)
    in_volume = ((guide >= 0) & (guide <= top)).all(axis=1)
    from_guidance = (g[:, 0] // 10 + g[:, 1] // 10 + g[:, 2] // 10) % 4
    assert (from_guidance == seg)[in_volume].mean() > 0.9


def test_p_zero_is_the_unaugmented_batch(patches_of):
    from diffprobe.probe.data import LabelledPatches

    made = patches_of(0.0)
    again = LabelledPatches(made.volumes, list(made.patch), 8, "bpr", 0.5, seed=0)
    a, b = made.batch(2), again.batch(2)
    for key in ("image", "seg", "guidance"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_intensity_augment_scales_hu_about_water_in_the_plans_window():
    from diffprobe.probe.augment import IntensityAugment

    window = {"scheme": "ct_window", "window_hu": [-1350.0, 1000.0]}
    aug = IntensityAugment.for_normalization(1.0, window)

    def norm(hu):
        return np.float32(-1 + 2 * (hu + 1350) / 2350)

    hu = np.array([-1000.0, -100.0, 0.0, 60.0, 150.0], np.float32)
    out = aug.apply(norm(hu), (1.2, 10 * aug.unit_per_hu))
    back = (out + 1) / 2 * 2350 - 1350
    np.testing.assert_allclose(back, hu * 1.2 + 10, atol=0.05)  # water stays at 0 HU + the shift
    assert aug.apply(norm(np.float32(990.0)), (1.25, 0.0)) == 1.0  # clipped to the window
    rng = np.random.default_rng(0)
    draws = [aug.draw(rng) for _ in range(200)]
    assert all(0.75 <= c <= 1.25 and abs(s) <= 30 * aug.unit_per_hu + 1e-9 for c, s in draws)
    none = IntensityAugment.for_normalization(0.0, window)
    assert all(none.draw(rng) is None for _ in range(20))
    z = IntensityAugment.for_normalization(1.0, {"scheme": "zscore_per_image"})
    assert z.water == 0.0


def test_intensity_augment_changes_only_the_image(patches_of):
    from diffprobe.probe.augment import IntensityAugment

    plain = patches_of(0.0)
    changed = patches_of(0.0)
    changed.intensity = IntensityAugment.for_normalization(1.0, {"scheme": "ct_window", "window_hu": [-1350, 1000]})
    a, b = plain.batch(4), changed.batch(4)
    np.testing.assert_array_equal(a["seg"].numpy(), b["seg"].numpy())
    np.testing.assert_array_equal(a["guidance"].numpy(), b["guidance"].numpy())
    assert not np.array_equal(a["image"].numpy(), b["image"].numpy())
    assert a["seeds"] == b["seeds"]
