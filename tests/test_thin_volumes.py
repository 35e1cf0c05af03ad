"""Volumes thinner than the patch: training patches see what the sliding window feeds at prediction
(the slab inside the patch, image padded with air, guidance channels edge-replicated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.preprocessing.volumes import VolumeRef, read_region
from diffprobe.probe.data import LabelledPatches, LabelledVolume


def test_edge_read_repeats_the_nearest_voxel_and_fill_read_keeps_the_constant():
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    start, size = np.array([-2, 1, -1]), (7, 4, 7)
    edge = read_region(arr, start, size, fill=0.0, edge=True)
    filled = read_region(arr, start, size, fill=-1.0)
    zi = np.clip(np.arange(start[0], start[0] + size[0]), 0, 2)
    yi = np.clip(np.arange(start[1], start[1] + size[1]), 0, 3)
    xi = np.clip(np.arange(start[2], start[2] + size[2]), 0, 4)
    np.testing.assert_array_equal(edge, arr[:, zi][:, :, yi][:, :, :, xi])
    inside = (slice(None), slice(2, 5), slice(0, 3), slice(1, 6))
    np.testing.assert_array_equal(filled[inside], edge[inside])
    assert (filled[:, :2] == -1).all() and (filled[:, :, 3:] == -1).all()


def test_an_axis_shorter_than_the_patch_takes_every_placement_in_training():
    """Training places a thin slab anywhere inside the patch, the centred placement of the sliding
    window among them; one fixed placement made the probe learn exactly that placement."""
    from diffprobe.pretraining.data import place_short_axes

    ref = VolumeRef(Path("."), "slab", (9, 80, 90), (3.0, 1.5, 1.5))
    vol = LabelledVolume(ref, {"1": [[4, 40, 45]]})
    patches = LabelledPatches([vol], [24, 64, 64], 4, "none", oversample_foreground=0.5, seed=0)
    rng = np.random.default_rng(0)
    for foreground in (False, True):
        starts = [patches._start(vol, rng, foreground) for _ in range(200)]
        assert {int(s[0]) for s in starts} == set(range(-(24 - 9), 1))  # the slab fully inside the patch
        assert all(0 <= s[1] <= 80 - 64 and 0 <= s[2] <= 90 - 64 for s in starts)
    # without a generator: centred, as sliding_window pads (before = (patch - n) // 2)
    assert place_short_axes(np.zeros(3, int), (9, 80, 90), (24, 64, 64))[0] == -((24 - 9) // 2)


def test_pretraining_patches_place_a_short_axis_anywhere_too():
    """Pretraining saw the shared labelled slab at the patch's top edge only."""
    from diffprobe.pretraining.data import PatchBatches

    thin = VolumeRef(Path("."), "slab", (9, 80, 90), (3.0, 1.5, 1.5))
    thick = VolumeRef(Path("."), "body", (60, 80, 90), (3.0, 1.5, 1.5))
    batches = PatchBatches([thin, thick], [24, 64, 64], 2, "none", augment=False)
    rng = np.random.default_rng(0)
    starts = [batches.start(ref, rng) for ref in (thin, thick) for _ in range(20)]
    assert {int(s[0]) for s in starts[:20]} <= set(range(-(24 - 9), 1)) and len({int(s[0]) for s in starts[:20]}) > 5
    assert len({int(s[0]) for s in starts[20:]}) > 5 and all(0 <= s[0] <= 60 - 24 for s in starts[20:])
    assert all(0 <= s[1] <= 80 - 64 and 0 <= s[2] <= 90 - 64 for s in starts)


def test_guidance_shift_moves_each_patch_channel_by_one_constant(monkeypatch):
    """``guidance_shift``: every training patch's guidance channel offset by one uniform draw in
    [-shift, shift] (the BPR's offset moves with the field of view); none without it."""
    import diffprobe.probe.data as probe_data

    monkeypatch.setattr(probe_data, "open_array", lambda path: np.zeros((1, 9, 80, 90), np.float32))
    monkeypatch.setattr(probe_data, "patch_guidance",
                        lambda mode, ref, start, size: np.zeros((3, *size), np.float32))
    ref = VolumeRef(Path("."), "slab", (9, 80, 90), (3.0, 1.5, 1.5))
    vol = LabelledVolume(ref, {"1": [[4, 40, 45]]})
    plain = LabelledPatches([vol], [24, 64, 64], 4, "bpr", 0.5, seed=0).batch(3)["guidance"]
    assert (plain == 0).all()
    g = LabelledPatches([vol], [24, 64, 64], 4, "bpr", 0.5, seed=0, guidance_shift=0.5).batch(3)["guidance"]
    lo, hi = g.amin(dim=(2, 3, 4)), g.amax(dim=(2, 3, 4))
    assert (lo == hi).all() and (hi.abs() <= 0.5).all() and len(set(hi.flatten().tolist())) == 12


def test_mirror_padding_fills_a_thin_axis_with_the_volumes_own_slices_and_labels(monkeypatch):
    """``thin_padding="mirror"``: outside a thin slab the patch holds the slab's slices mirrored at its
    ends (image, labels and guidance alike, so every voxel is anatomy with its own label); the slab
    itself is where ``"air"`` puts it, and thick axes are untouched."""
    import diffprobe.probe.data as probe_data

    z = np.arange(9, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(z / 10, (9, 80, 90))[None].copy()
    seg = np.broadcast_to((z % 3 == 0).astype(np.float32), (9, 80, 90))[None].copy()
    monkeypatch.setattr(probe_data, "open_array", lambda path: seg if "seg" in str(path) else image)
    monkeypatch.setattr(probe_data, "patch_guidance",
                        lambda mode, ref, start, size: read_region(np.broadcast_to(z, (3, 9, 80, 90)), start,
                                                                   size, fill=0.0, edge=True))
    ref = VolumeRef(Path("."), "slab", (9, 80, 90), (3.0, 1.5, 1.5))
    vol = LabelledVolume(ref, {"1": [[3, 40, 45]]})
    start = np.array([-5, 3, 7])
    air = LabelledPatches([vol], [24, 64, 64], 1, "bpr", thin_padding="air").patch_at(vol, start)
    mirror = LabelledPatches([vol], [24, 64, 64], 1, "bpr", thin_padding="mirror").patch_at(vol, start)
    order = np.pad(np.arange(9), (5, 24 - 9 - 5), mode="symmetric")  # slice of the slab at each patch z
    np.testing.assert_allclose(mirror["image"][0, :, 0, 0], order / 10, rtol=1e-6)
    np.testing.assert_array_equal(mirror["seg"][:, 0, 0], (order % 3 == 0).astype(np.int64))
    np.testing.assert_array_equal(mirror["guidance"][0, :, 0, 0], order)
    assert (air["image"][0, :5] == -1).all() and (air["seg"][:5] == 0).all()  # air: nothing there
    np.testing.assert_array_equal(mirror["image"][:, 5:14], air["image"][:, 5:14])  # the slab in place
    np.testing.assert_array_equal(mirror["seg"][5:14], air["seg"][5:14])
    assert LabelledPatches([vol], [24, 64, 64], 1, "bpr").thin_padding == "mirror"  # the default

    # a spatially augmented patch reads its source box the same way: anatomy along z, never air
    from diffprobe.probe.augment import SpatialAugment

    rng = np.random.default_rng(0)
    matrix = next(m for m in (SpatialAugment(p=1.0).draw(rng, ref.spacing) for _ in range(20)) if m is not None)
    warped = {mode: LabelledPatches([vol], [24, 64, 64], 1, "bpr", thin_padding=mode).patch_at(vol, start,
                                                                                            matrix=matrix)
              for mode in ("air", "mirror")}
    centre = warped["mirror"]["image"][0, :, 32, 32]
    assert (centre >= 0).all() and (centre <= 0.8 + 1e-6).all()  # slab values only (0 .. 0.8)
    assert (warped["air"]["image"][0, :3, 32, 32] == -1).all()  # air: the fill above the slab


def test_thin_padding_setting_is_checked():
    import pytest

    from diffprobe.errors import DiffprobeError
    from diffprobe.workflows.train_probe import probe_config

    assert probe_config(None)["thin_padding"] == "mirror"  # the default since 2026-11-30 (docs/results.md)
    assert probe_config({"thin_padding": "air"})["thin_padding"] == "air"
    with pytest.raises(DiffprobeError, match="thin_padding"):
        probe_config({"thin_padding": "reflect"})


def test_sliding_window_pads_a_thin_input_as_its_probe_trained():
    """``thin_padding="mirror"`` at prediction: the tiles of a thin input hold its slices mirrored at
    its ends (image and guidance), as the probe's training patches did; ``air`` keeps the air value."""
    import torch

    from diffprobe.predict.sliding_window import sliding_window_logits

    volume = torch.arange(3, dtype=torch.float32)[None, :, None, None].expand(1, 3, 4, 4).contiguous()
    guidance = volume.expand(3, 3, 4, 4) * 10
    seen = {}

    def predict_patch(image, guide, starts):
        seen.setdefault("image", image[0, 0, :, 0, 0].tolist())
        seen.setdefault("guidance", guide[0, 0, :, 0, 0].tolist())
        return torch.zeros(image.shape[0], 2, *image.shape[2:])

    for mode in ("mirror", "air"):
        seen.clear()
        out = sliding_window_logits(volume, guidance, predict_patch, 2, (8, 4, 4), thin_padding=mode)
        assert out.shape == (2, 3, 4, 4)  # the padding is cropped off
        order = np.pad(np.arange(3), ((8 - 3) // 2, 8 - 3 - (8 - 3) // 2), mode="symmetric")
        if mode == "mirror":
            assert seen["image"] == order.tolist() and seen["guidance"] == (order * 10).tolist()
        else:
            assert seen["image"] == [-1.0, -1.0, 0.0, 1.0, 2.0, -1.0, -1.0, -1.0]
            assert seen["guidance"] == [0.0, 0.0, 0.0, 10.0, 20.0, 20.0, 20.0, 20.0]
