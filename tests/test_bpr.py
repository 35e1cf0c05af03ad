"""Body part regressor: crop pairs, model shapes, loss properties, inference, and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffprobe.bpr import (
    BodyPartRegressor,
    bpr_losses,
    collate_pairs,
    extract_crop,
    predict_coordinates,
    sample_crop_pair,
    sample_far_pair,
)
from diffprobe.phantoms import PhantomConfig, generate_case

C_PER_MM = torch.tensor([0.01, 0.01, 0.01])


def _fine_model(width: int = 4, **kwargs) -> BodyPartRegressor:
    """A BPR on the fine grid (no input pooling, output stride 4x8x8, per-cell head, no ramp):
    exercises the generic geometry of pairs, losses and inference with small volumes."""
    return BodyPartRegressor(width=width, input_pool=[1, 1, 1], output_stride=[4, 8, 8], local_head=True,
                             norm="none", **kwargs)


# ----------------------------------------------------------------------------------------- pairs

def _check_pair_overlap(vol: np.ndarray, pair, crop: tuple[int, int, int], pad: float = -1.0) -> None:
    off = pair.offset_vox
    np.testing.assert_array_equal(off, pair.start_a - pair.start_b)
    # a[i] == b[i + off] wherever both indices are inside the crops.
    sl_a, sl_b = [slice(None)], [slice(None)]
    for o, n in zip(off, crop, strict=True):
        lo, hi = max(0, -o), min(n, n - o)
        assert hi > lo, "crops must overlap"
        sl_a.append(slice(lo, hi))
        sl_b.append(slice(lo + o, hi + o))
    np.testing.assert_array_equal(pair.a[tuple(sl_a)], pair.b[tuple(sl_b)])
    # Each crop is the volume at its start, padded outside.
    for crop_arr, start in ((pair.a, pair.start_a), (pair.b, pair.start_b)):
        idx = np.meshgrid(*[np.arange(s, s + n) for s, n in zip(start, crop, strict=True)], indexing="ij")
        inside = np.all([(i >= 0) & (i < d) for i, d in zip(idx, vol.shape[1:], strict=True)], axis=0)
        expected = np.full(crop, pad, np.float32)
        expected[inside] = vol[0][tuple(i[inside] for i in idx)]
        np.testing.assert_array_equal(crop_arr[0], expected)


def test_crop_pair_offsets_are_exact():
    rng = np.random.default_rng(0)
    vol = np.arange(20 * 30 * 25, dtype=np.float32).reshape(1, 20, 30, 25)
    crop = (8, 16, 12)
    seen = set()
    for _ in range(50):
        pair = sample_crop_pair(vol, crop, rng, max_shift_fraction=0.5)
        assert pair.a.shape == pair.b.shape == (1, *crop) and pair.a.dtype == np.float32
        assert np.all(np.abs(pair.offset_vox) <= np.floor(0.5 * np.array(crop)))
        assert np.all(pair.start_a >= 0) and np.all(pair.start_a + crop <= vol.shape[1:])  # no needless padding
        _check_pair_overlap(vol, pair, crop)
        seen.add(tuple(pair.offset_vox))
    assert len(seen) > 10  # offsets actually vary


def test_crop_pair_pads_volumes_smaller_than_the_crop():
    rng = np.random.default_rng(1)
    vol = np.arange(5 * 9 * 30, dtype=np.float32).reshape(5, 9, 30) + 10  # (z, y, x) accepted too
    crop = (8, 16, 16)
    for _ in range(30):
        pair = sample_crop_pair(vol, crop, rng)
        _check_pair_overlap(vol[None], pair, crop)
        for start in (pair.start_a, pair.start_b):  # short axes: the whole volume stays inside the crop
            assert -3 <= start[0] <= 0 and -7 <= start[1] <= 0
        # the complete volume extent along the short axes is present in a
        assert np.isin(vol[:, :, pair.start_a[2]], pair.a).all()


def test_crop_pair_noise_changes_only_b_and_collate():
    vol = np.random.default_rng(2).standard_normal((1, 12, 20, 20)).astype(np.float32)
    clean = sample_crop_pair(vol, (8, 16, 16), np.random.default_rng(3))
    noisy = sample_crop_pair(vol, (8, 16, 16), np.random.default_rng(3), noise_std=0.02)
    np.testing.assert_array_equal(clean.a, noisy.a)
    np.testing.assert_array_equal(clean.offset_vox, noisy.offset_vox)
    delta = noisy.b - clean.b
    assert 0.01 < delta.std() < 0.03 and abs(delta.mean()) < 0.005
    batch = collate_pairs([clean, noisy])
    assert batch["a"].shape == batch["b"].shape == (2, 1, 8, 16, 16) and batch["a"].dtype == torch.float32
    assert batch["offset_vox"].shape == (2, 3) and batch["offset_vox"].dtype == torch.int64


# ----------------------------------------------------------------------------------------- model

def test_model_output_shape_and_strides():
    model = _fine_model()
    assert model.total_stride == (4, 8, 8)
    assert model(torch.zeros(2, 1, 16, 32, 32)).shape == (2, 3, 4, 4, 4)
    model = _fine_model(in_channels=2, depth=2, strides=[[2, 2, 2], [1, 2, 2]])
    assert model.total_stride == (4, 8, 8) and model.feature_stride == (2, 4, 4)
    model = BodyPartRegressor(in_channels=2, width=4, depth=2, strides=[[2, 2, 2], [1, 2, 2]], input_pool=[1, 1, 1],
                              output_stride=[2, 4, 4], local_head=True)
    assert model.total_stride == (2, 4, 4)
    assert model(torch.zeros(1, 2, 8, 16, 12)).shape == (1, 3, 4, 4, 3)
    with pytest.raises(ValueError, match="strides"):
        BodyPartRegressor(depth=2, strides=[[1, 2, 2]])
    grouped = BodyPartRegressor(width=4, norm="group", input_pool=[1, 1, 1], output_stride=[4, 8, 8], local_head=True)
    assert grouped(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 3, 2, 2, 2)
    clone = BodyPartRegressor(**grouped.config())  # checkpoints: config + state_dict, weights_only
    clone.load_state_dict(grouped.state_dict())
    # The default: input average-pooled 2x4x4 (a wide field of view), features at 8x32x32, the
    # map on a 1x4x4 grid; the ramp (units_per_voxel) is a buffer restored by load_state_dict.
    default = BodyPartRegressor(width=4, units_per_voxel=[0.03, 0.015, 0.015])
    assert default.feature_stride == (8, 32, 32) and default.total_stride == (1, 4, 4)
    assert default(torch.zeros(2, 1, 32, 64, 64)).shape == (2, 3, 32, 16, 16)
    restored = BodyPartRegressor(width=4)
    restored.load_state_dict(default.state_dict())
    assert torch.equal(restored.units_per_voxel, default.units_per_voxel)
    assert BodyPartRegressor(**default.config()).config() == default.config()


def test_every_output_cell_sees_the_whole_crop():
    """The last cell's prediction depends on the first voxel of a long crop (the crop position is
    computed from all cells), far beyond the convolutions' receptive field."""
    torch.manual_seed(0)
    model = BodyPartRegressor(width=4).double().eval()
    x = torch.rand(1, 1, 160, 16, 16, dtype=torch.float64, requires_grad=True)
    model(x)[0, :, -1, -1, -1].sum().backward()
    assert (x.grad[0, 0].abs().sum(dim=(1, 2)) > 0).all()


# ----------------------------------------------------------------------------------------- losses

def _linear_outputs(low_shape, stride, spacing, offset, c, sign=1.0, mix=0.0, b_shift=0.0):
    """Exact coordinates: out[ch] = sign * c_ch * position_mm along (x, y, z)[ch], in crop a's frame.

    ``mix`` leaks z into the LR channel (a rotated frame); ``b_shift`` shifts b's coordinates
    (a model that ignores the offset between crops).
    """
    bsz = offset.shape[0]
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) * s + (s - 1) / 2
                             for n, s in zip(low_shape, stride, strict=True)], indexing="ij")
    pos = torch.stack(grids)[None].expand(bsz, 3, *low_shape)  # (B, 3 zyx, ...) voxels in own frame
    sp = spacing.reshape(-1, 3).expand(bsz, 3)[:, :, None, None, None]
    off = offset.float()[:, :, None, None, None]
    outs = []
    for frame_shift in (torch.zeros_like(off), off):  # b's voxel j sits at j - offset in a's frame
        mm = (pos - frame_shift) * sp  # (B, zyx, ...)
        coords = mm.flip(1) * c[None, :, None, None, None] * sign  # channels (x, y, z)
        coords = coords.clone()
        coords[:, 0] += mix * c[0] * mm[:, 0]
        outs.append(coords)
    outs[1] = outs[1] + b_shift
    return outs[0], outs[1]


@pytest.fixture
def geometry():
    offset = torch.tensor([[3, -7, 5], [-6, 2, 0]])
    spacing = torch.tensor([3.0, 0.8, 0.8])
    return (4, 6, 6), (4, 8, 8), spacing, offset


def test_losses_vanish_for_exact_coordinates(geometry):
    low, stride, spacing, offset = geometry
    a, b = _linear_outputs(low, stride, spacing, offset, C_PER_MM)
    out = bpr_losses(a, b, offset, spacing, stride, C_PER_MM, torch.Generator().manual_seed(0))
    assert set(out) == {"order", "distance", "consistency", "centre", "total"}
    assert out["distance"] < 1e-6 and out["consistency"] < 1e-6 and out["centre"] < 1e-6
    assert out["order"] < np.log(2)  # correctly ordered: below the value at zero difference


def test_order_loss_prefers_monotone_outputs(geometry):
    low, stride, spacing, offset = geometry
    gen = torch.Generator().manual_seed(1)
    mono = bpr_losses(*_linear_outputs(low, stride, spacing, offset, C_PER_MM), offset, spacing, stride, C_PER_MM, gen)
    gen = torch.Generator().manual_seed(1)
    rev = bpr_losses(*_linear_outputs(low, stride, spacing, offset, C_PER_MM, sign=-1.0), offset, spacing, stride,
                     C_PER_MM, gen)
    assert mono["order"] < np.log(2) < rev["order"]
    assert rev["distance"] > 0.05


def test_distance_penalises_axis_leakage_and_consistency_penalises_ignored_offsets(geometry):
    low, stride, spacing, offset = geometry
    exact = bpr_losses(*_linear_outputs(low, stride, spacing, offset, C_PER_MM), offset, spacing, stride, C_PER_MM)
    leaky = bpr_losses(*_linear_outputs(low, stride, spacing, offset, C_PER_MM, mix=0.3), offset, spacing, stride,
                       C_PER_MM)
    shifted = bpr_losses(*_linear_outputs(low, stride, spacing, offset, C_PER_MM, b_shift=0.05), offset, spacing,
                         stride, C_PER_MM)
    assert leaky["distance"] > exact["distance"] + 1e-3
    assert shifted["consistency"] > 0.01 and shifted["distance"] > exact["distance"] + 1e-3
    assert shifted["centre"] > 0.01 and exact["centre"] < 1e-6
    # a constant shift of everything is free: absolute position is not fixed by the losses
    const = bpr_losses(*[o + 0.7 for o in _linear_outputs(low, stride, spacing, offset, C_PER_MM)], offset, spacing,
                       stride, C_PER_MM)
    assert const["distance"] < 1e-6 and const["consistency"] < 1e-6 and const["centre"] < 1e-6


def test_losses_are_finite_with_gradients_and_reproducible():
    torch.manual_seed(0)
    model = BodyPartRegressor(width=4)
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1, 1, (1, 20, 40, 40)).astype(np.float32)
    batch = collate_pairs([sample_crop_pair(vol, (16, 32, 32), rng) for _ in range(2)])
    scale = torch.nn.Parameter(torch.full((3,), 0.01))
    spacing = torch.tensor([[3.0, 0.8, 0.8], [2.0, 1.0, 1.0]])
    out_a, out_b = model(batch["a"]), model(batch["b"])
    losses = bpr_losses(out_a, out_b, batch["offset_vox"], spacing, model.total_stride, scale,
                        torch.Generator().manual_seed(5), num_pairs=256)
    again = bpr_losses(out_a, out_b, batch["offset_vox"], spacing, model.total_stride, scale,
                       torch.Generator().manual_seed(5), num_pairs=256)
    for key, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert torch.equal(value, again[key]), key
    losses["total"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0 and float(scale.grad.abs().sum()) > 0


class _RampReader(torch.nn.Module):
    """A "perfect" model for a volume whose channels hold the true coordinates: average-pool them."""

    total_stride = (4, 8, 8)

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(x, self.total_stride) + self.dummy


def _ramp_volume(shape, spacing):
    """(3, z, y, x) volume: channel ch = c * mm along world axis (x, y, z)[ch], plus an arbitrary origin."""
    grids = np.meshgrid(*[np.arange(n) * sp for n, sp in zip(shape, spacing, strict=True)], indexing="ij")
    return np.stack([grids[2], grids[1], grids[0] + 123.0]).astype(np.float32) * 0.01


def test_crop_pairs_losses_and_inference_share_one_geometry_convention():
    """End to end: real crop pairs + a model that reads true coordinates give zero distance/consistency."""
    spacing = (2.5, 0.8, 1.1)
    vol = _ramp_volume((40, 72, 64), spacing)  # multiples of the stride: no padded cells
    rng = np.random.default_rng(0)
    batch = collate_pairs([sample_crop_pair(vol, (16, 32, 32), rng) for _ in range(4)])
    model = _RampReader()
    losses = bpr_losses(model(batch["a"]), model(batch["b"]), batch["offset_vox"], torch.tensor(spacing),
                        model.total_stride, C_PER_MM, torch.Generator().manual_seed(0))
    assert losses["distance"] < 1e-5 and losses["consistency"] < 1e-5
    # Inference maps low-res cells back to the voxels they stand for (exact away from the border cells).
    for patch in (None, (16, 32, 32)):
        pred = predict_coordinates(model, vol, patch_size=patch).numpy()
        inner = (slice(None), slice(4, -4), slice(8, -8), slice(8, -8))
        np.testing.assert_allclose(pred[inner], vol[inner], atol=1e-4)


# ----------------------------------------------------------------------------------------- inference

def test_predict_coordinates_shapes_and_determinism():
    torch.manual_seed(0)
    model = _fine_model()
    model.train()
    vol = np.random.default_rng(0).uniform(-1, 1, (1, 21, 45, 38)).astype(np.float32)
    full = predict_coordinates(model, vol)
    assert full.shape == (3, 21, 45, 38) and full.dtype == torch.float32 and model.training
    assert torch.equal(full, predict_coordinates(model, torch.from_numpy(vol)))
    low = predict_coordinates(model, vol, full_resolution=False)
    assert low.shape == (3, 6, 6, 5)
    tiled = predict_coordinates(model, vol, patch_size=(8, 16, 16))
    assert tiled.shape == (3, 21, 45, 38) and torch.isfinite(tiled).all()
    assert torch.equal(tiled, predict_coordinates(model, vol, patch_size=(8, 16, 16)))
    small = predict_coordinates(model, vol[:, :5, :9, :9], patch_size=(8, 16, 16))  # padded to one patch
    assert small.shape == (3, 5, 9, 9)
    with pytest.raises(ValueError, match="multiples"):
        predict_coordinates(model, vol, patch_size=(6, 16, 16))


# ----------------------------------------------------------------------------------------- training

def test_short_training_learns_a_monotone_cranio_caudal_coordinate():
    """150 Adam steps on one small phantom, the production model and pairs (half overlapping, half at
    independent places): the CC channel increases from the first slice to the last."""
    cfg = PhantomConfig(fov_mm=60, spacing_inplane=(1.0, 1.5), spacing_slice=(2.0, 3.0), scan_length_mm=(60, 80))
    case = generate_case(cfg, 0)
    vol = ((np.clip(case.image.astype(np.float32), -1350, 1000) + 1350) / 2350 * 2 - 1)[None].astype(np.float32)
    spacing = torch.tensor(case.spacing[::-1], dtype=torch.float32)  # SimpleITK (x, y, z) -> (z, y, x)
    crop = (16, 32, 32)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: OpenMP synchronisation costs more than it saves
    try:
        torch.manual_seed(0)
        model = BodyPartRegressor(width=8, units_per_voxel=(C_PER_MM * spacing).tolist())
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        first = last = None
        for _ in range(150):
            pairs = [sample_crop_pair(vol, crop, rng) for _ in range(2)]
            pairs += [sample_far_pair(lambda s, n: extract_crop(vol, s, n), vol.shape[1:], crop, rng) for _ in range(2)]
            batch = collate_pairs(pairs)
            out = model(torch.cat([batch["a"], batch["b"]]))
            losses = bpr_losses(out[:4], out[4:], batch["offset_vox"], spacing, model.total_stride, C_PER_MM, gen,
                                num_pairs=512)
            opt.zero_grad()
            losses["total"].backward()
            opt.step()
            last = float(losses["total"].detach())
            first = last if first is None else first
        coords = predict_coordinates(model, vol, patch_size=crop)  # sliding window, training-size context
        whole = predict_coordinates(model, vol)  # one pass over the whole volume
        slab_errors = _thin_slab_cc_errors(model, vol, coords, crop)
    finally:
        torch.set_num_threads(threads)

    assert last < first
    assert coords.shape == whole.shape == (3, *vol.shape[1:])
    z = np.arange(vol.shape[1])
    rho = spearmanr(z, coords[2].mean(dim=(1, 2)).numpy())[0]
    rho_whole = spearmanr(z, whole[2].mean(dim=(1, 2)).numpy())[0]
    print(f"BPR short training: Spearman rho(z, CC) = {rho:.3f} (sliding window), {rho_whole:.3f} (whole volume)")
    assert rho > 0.9 and rho_whole > 0.9
    # a slab thinner than the crop, predicted alone, lands nearer its place in the whole scan with repeated
    # end slices (what predict_coordinates does) than with air below it (what it did before)
    print(f"thin slabs alone, mean |CC error| (coordinate units): {slab_errors}")
    assert slab_errors["repeated"] < slab_errors["air_below"]


def _thin_slab_cc_errors(model, vol: np.ndarray, reference: torch.Tensor, crop: tuple[int, int, int]) -> dict:
    """Mean |CC error| of 6-slice slabs cut from ``vol`` and predicted alone, against ``reference``."""
    errors: dict[str, list[float]] = {"repeated": [], "air_below": []}
    for z0 in range(0, vol.shape[1] - 6, 3):
        slab, ref = vol[:, z0:z0 + 6], reference[2, z0:z0 + 6].mean(dim=(1, 2))
        repeated = predict_coordinates(model, slab, patch_size=crop)[2].mean(dim=(1, 2))
        air = np.concatenate([slab, np.full((1, crop[0] - 6, *slab.shape[2:]), -1.0, np.float32)], axis=1)
        air_below = predict_coordinates(model, air, patch_size=crop)[2, :6].mean(dim=(1, 2))
        errors["repeated"].append(float((repeated - ref).abs().mean()))
        errors["air_below"].append(float((air_below - ref).abs().mean()))
    return {k: round(float(np.mean(v)), 3) for k, v in errors.items()}


def test_a_thin_volume_is_centred_between_repeated_end_slices():
    """The thin volume's coordinates are those of the volume padded along z by repeating its end slices,
    centred in the crop (in-plane: air at the high end), cropped back."""
    torch.manual_seed(0)
    model = _fine_model()
    vol = np.random.default_rng(1).uniform(-1, 1, (1, 5, 16, 16)).astype(np.float32)
    got = predict_coordinates(model, vol, patch_size=(8, 16, 16))
    padded = np.concatenate([vol[:, :1]] * 1 + [vol] + [vol[:, -1:]] * 2, axis=1)  # (8 - 5) // 2 = 1 before
    want = predict_coordinates(model, padded, patch_size=(8, 16, 16))[:, 1:6]
    torch.testing.assert_close(got, want)
