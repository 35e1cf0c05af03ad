"""Pretraining patches: deterministic per step, loader order, guidance channels per mode."""

import numpy as np
import pytest
import torch

from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.pretraining.data import PatchBatches, loader, volume_refs

PATCH = [8, 32, 32]


@pytest.fixture
def refs(use_phantom_roots):
    data_dir, plans, ids = preprocessed_cases(1)
    return volume_refs(data_dir, ids)


@pytest.mark.parametrize("mode,channels", [("none", 0), ("random", 3), ("physical", 3)])
def test_guidance_modes_feed_expected_channels(refs, mode, channels):
    pb = PatchBatches(refs, PATCH, 2, guidance=mode)
    b = pb.batch(3)
    assert b["image"].shape == (2, 1, *PATCH) and pb.guidance_channels == channels
    if channels:
        assert b["guidance"].shape == (2, 3, *PATCH) and torch.isfinite(b["guidance"]).all()
    else:
        assert b["guidance"] is None


def test_bpr_guidance_requires_maps(refs):
    with pytest.raises(ValueError, match="BPR stage"):
        PatchBatches(refs, PATCH, 2, guidance="bpr")


def test_physical_guidance_is_monotone_crop_mm(refs):
    pb = PatchBatches(refs, PATCH, 1, guidance="physical", augment=False)
    g = pb.batch(0)["guidance"][0].numpy()
    assert np.all(np.diff(g[0], axis=2) > 0)  # LR channel increases along x
    assert np.all(np.diff(g[1], axis=1) > 0)  # AP along y
    assert np.all(np.diff(g[2], axis=0) > 0)  # CC along z
    assert np.allclose(np.diff(g[2], axis=1), 0)


def test_batches_deterministic_and_loader_order(refs):
    pb = PatchBatches(refs, PATCH, 2, guidance="physical")
    a, b = pb.batch(7), pb.batch(7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["guidance"], b["guidance"])
    assert not torch.equal(pb.batch(8)["image"], a["image"])
    it = loader(pb, start_step=5, num_workers=2)
    got = [next(it) for _ in range(4)]
    assert [g["step"] for g in got] == [5, 6, 7, 8]
    assert torch.equal(got[2]["image"], a["image"])
    other_rank = PatchBatches(refs, PATCH, 2, guidance="physical", rank=1)
    assert not torch.equal(other_rank.batch(7)["image"], a["image"])


def test_augmentation_draws_one_transform_for_image_and_guidance(refs):
    """The image (cubic) and its guidance (linear) are transformed alike: an off-centre blob copied into a
    guidance channel lands where the image's does; the image is what one cubic call alone gives."""
    pb = PatchBatches(refs, PATCH, 1, guidance="physical")
    region = tuple(p + 2 * max(2, p // 6) for p in PATCH)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in region], indexing="ij")
    blob = np.exp(-((z - region[0] / 2) ** 2 / 8 + (y - region[1] * 0.3) ** 2 / 18 + (x - region[2] * 0.7) ** 2 / 18))
    stack = np.stack([blob, blob, z / region[0]]).astype(np.float32)
    moved = 0
    for seed in range(8):
        out = pb._spatial(stack, np.random.default_rng(seed))
        assert out.shape == (3, *PATCH)
        np.testing.assert_array_equal(out[:1], pb._augment(stack[:1], int(np.random.default_rng(seed).integers(2**31)),
                                                           order=3))
        assert np.unravel_index(out[0].argmax(), PATCH) == np.unravel_index(out[1].argmax(), PATCH)
        assert np.corrcoef(out[0].ravel(), out[1].ravel())[0, 1] > 0.99
        centre = tuple(p // 2 + m for p, m in zip(PATCH, [max(2, p // 6) for p in PATCH]))
        plain = blob[tuple(slice(c - p // 2, c - p // 2 + p) for c, p in zip(centre, PATCH))]
        moved += not np.allclose(out[0], plain, atol=1e-3)
    assert moved >= 2  # some draws did rotate or scale (p = 0.5 each)


def test_a_loader_process_drops_only_hand_over_failures(capsys):
    """A broken batch hand-over (the main process stopped receiving) prints nothing; a bug still does."""
    from diffprobe.pretraining.data import _quiet_handover_failures

    seen = []
    hook = _quiet_handover_failures(lambda kind, value, tb: seen.append(kind))
    for kind in (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        hook(kind, kind("main process gone"), None)
    assert seen == []
    hook(ZeroDivisionError, ZeroDivisionError("bug"), None)
    assert seen == [ZeroDivisionError]
