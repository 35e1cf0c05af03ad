"""Tests for the Gaussian-weighted sliding-window aggregator (diffprobe.predict.sliding_window)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from torch import nn

from diffprobe.predict import sliding_window_logits
from diffprobe.predict.sliding_window import MIN_WEIGHT, VALUE_SCALING_FACTOR

torch.set_num_threads(1)

PATCH = (12, 14, 16)  # non-cubic so that axis mix-ups show
R = 2  # receptive-field radius of the toy conv nets: two 3x3x3 convolutions


def conv_net(cin: int, k: int, seed: int, symmetric: bool = False) -> nn.Module:
    """Fixed random conv stack with zero padding: translation-equivariant, receptive radius R.

    ``symmetric``: every kernel is made symmetric under flips of each axis, so the net commutes with
    mirroring (zero padding is symmetric too).
    """
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(cin, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, k, 3, padding=1))
    with torch.no_grad():
        for conv in (net[0], net[2]):
            w = torch.randn(conv.weight.shape, generator=g) * 0.3
            if symmetric:
                for d in (2, 3, 4):
                    w = w + w.flip(d)
            conv.weight.copy_(w)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return net.eval()


def net_predictor(net: nn.Module):
    return lambda image, guidance, starts: net(image)


def noise_predictor(k: int):
    """Logits = per-tile noise seeded from the tile start (the caller's use case) + the image."""
    def predict(image, guidance, starts):
        noise = [torch.randn((k, *image.shape[2:]), generator=torch.Generator().manual_seed(
            z * 1_000_000 + y * 1_000 + x)) for z, y, x in starts]
        return torch.stack(noise) + image.mean(1, keepdim=True)
    return predict


def volume(shape, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((channels, *shape), generator=torch.Generator().manual_seed(seed))


def centred_before(shape, patch=PATCH) -> list[int]:
    return [max(p - n, 0) // 2 for n, p in zip(shape, patch)]


def trusted_mask(shape, starts, before, patch=PATCH, r=R) -> torch.Tensor:
    """Voxels where *every* covering tile's conv output equals the whole-volume output.

    The Gaussian weights are never zero, so a tile's output counts everywhere it covers, also where it
    is wrong: within ``r`` of a tile face inside the volume (the tile's zero padding hides real data)
    and within ``r`` of the volume border where the tile extends into the aggregator's padding
    (``pad_value`` voxels instead of the whole-volume conv's zero padding).  A face that lies exactly
    on the volume border is harmless: both see the conv's zero padding.  Comparing only at distance
    >= r from the volume border would therefore not be exact; this mask is.
    """
    bad = torch.zeros(shape, dtype=torch.bool)
    for start in starts:
        lo = [s - b for s, b in zip(start, before)]  # original coordinates
        region, inner = [], []
        for a in range(3):
            lo_a, hi_a, n = lo[a], lo[a] + patch[a], shape[a]
            first = 0 if lo_a == 0 else max(lo_a, 0) + r
            last = n if hi_a == n else min(hi_a, n) - r
            region.append(slice(max(lo_a, 0), min(hi_a, n)))
            inner.append((max(lo_a, 0), first, last, min(hi_a, n)))
        tile_bad = torch.ones([s.stop - s.start for s in region], dtype=torch.bool)
        ok = tuple(slice(max(f - s0, 0), max(last - s0, 0)) for s0, f, last, _ in inner)
        tile_bad[ok] = False
        bad[tuple(region)] |= tile_bad
    return ~bad


def coverage(shape, starts, before, patch=PATCH) -> torch.Tensor:
    count = torch.zeros(shape, dtype=torch.int32)
    for start in starts:
        count[tuple(slice(max(s - b, 0), max(s - b + p, 0)) for s, b, p in zip(start, before, patch))] += 1
    return count


def recording(predict, log: list):
    def wrapped(image, guidance, starts):
        log.append(list(starts))
        return predict(image, guidance, starts)
    return wrapped


def test_conv_net_matches_whole_volume_where_tiles_see_full_context():
    net = conv_net(1, 3, seed=1)
    vol = volume((30, 33, 40))
    log: list = []
    out = sliding_window_logits(vol, None, recording(net_predictor(net), log), 3, PATCH)
    whole = net(vol[None])[0].detach()
    starts = [s for call in log for s in call]
    mask = trusted_mask(tuple(vol.shape[1:]), starts, [0, 0, 0])
    assert out.shape == whole.shape and out.dtype == torch.float32
    # The comparison is meaningful: a good part of the volume, including voxels averaged over 8 tiles.
    assert mask.float().mean() > 0.05
    assert (coverage(tuple(vol.shape[1:]), starts, [0, 0, 0])[mask] == 8).any()
    torch.testing.assert_close(out[:, mask], whole[:, mask], atol=1e-5, rtol=1e-5)
    assert (out - whole).abs().max() > 1e-4  # elsewhere tile-edge errors do leak in (weights never 0)


def test_pointwise_net_is_reproduced_everywhere():
    """All tiles agree exactly (receptive field 1), so the weighted mean must equal it exactly."""
    net = nn.Conv3d(2, 3, 1)
    vol = volume((20, 30, 41), channels=2)
    out = sliding_window_logits(vol, None, net_predictor(net), 3, PATCH, step_size=0.4, batch_size=2)
    torch.testing.assert_close(out, net(vol[None])[0].detach(), atol=1e-5, rtol=1e-5)


def test_matches_naive_gaussian_weighted_average():
    """Against a per-tile reference built from nnU-Net's steps and Gaussian (floored at MIN_WEIGHT)."""
    vol = volume((25, 30, 35))
    predict = noise_predictor(2)
    out = sliding_window_logits(vol, None, predict, 2, PATCH, step_size=0.5)
    w = compute_gaussian(PATCH, 1.0 / 8, VALUE_SCALING_FACTOR, torch.float64, torch.device("cpu"))
    w = w.clamp_min(MIN_WEIGHT).numpy()
    num, den = np.zeros((2, 25, 30, 35)), np.zeros((25, 30, 35))
    for z, y, x in itertools.product(*compute_steps_for_sliding_window((25, 30, 35), PATCH, 0.5)):
        sl = (slice(z, z + PATCH[0]), slice(y, y + PATCH[1]), slice(x, x + PATCH[2]))
        num[(slice(None), *sl)] += predict(vol[None][(slice(None), slice(None), *sl)], None, [(z, y, x)])[0].numpy() * w
        den[sl] += w
    np.testing.assert_allclose(out.numpy(), num / den, rtol=1e-4, atol=1e-5)


def test_volume_smaller_than_patch_is_padded_centred_and_cropped():
    net = conv_net(1, 2, seed=2)
    shape = (7, 10, 30)  # z and y shorter than the patch (odd and even padding), x longer
    vol = volume(shape)
    log: list = []
    out = sliding_window_logits(vol, None, recording(net_predictor(net), log), 2, PATCH)
    whole = net(vol[None])[0].detach()
    assert out.shape == (2, *shape)
    starts = [s for call in log for s in call]
    assert {s[0] for s in starts} == {0} and {s[1] for s in starts} == {0}  # one tile along padded axes
    mask = trusted_mask(shape, starts, centred_before(shape))
    assert mask.any() and not mask[:R].any() and not mask[-R:].any()  # padded axis: interior only
    torch.testing.assert_close(out[:, mask], whole[:, mask], atol=1e-5, rtol=1e-5)


def test_guidance_tiles_are_aligned_with_image_tiles_including_padding():
    shape = (9, 20, 33)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    before = centred_before(shape)
    seen: list = []

    def predict(image, guidance, starts):
        assert image.shape[1:] == (1, *PATCH) and guidance.shape == (image.shape[0], 3, *PATCH)
        for b, start in enumerate(starts):
            idx = [torch.arange(p) + s - b_ for p, s, b_ in zip(PATCH, start, before)]  # original coordinates
            for a in range(3):
                view = [1, 1, 1]
                view[a] = PATCH[a]
                expect = idx[a].clamp(0, shape[a] - 1).float().view(view).expand(PATCH)  # edge replication
                torch.testing.assert_close(guidance[b, a], expect, atol=0, rtol=0)
            iz, iy, ix = torch.meshgrid(*idx, indexing="ij")
            inside = (iz >= 0) & (iz < shape[0]) & (iy >= 0) & (iy < shape[1]) & (ix >= 0) & (ix < shape[2])
            assert torch.equal(image[b, 0], torch.where(inside, iz.float(), -1.0))  # image: z grid, pad -1
            seen.append(start)
        return torch.zeros((image.shape[0], 1, *PATCH))

    sliding_window_logits(grid[:1].clone(), grid, predict, 1, PATCH, batch_size=2)
    assert len(seen) > 1


def test_mirroring_flips_guidance_with_the_image():
    shape = (20, 20, 20)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    calls: list = []

    def predict(image, guidance, starts):
        assert torch.equal(image, guidance)  # both are the same coordinate grid, flipped alike
        calls.append(list(starts))
        return image[:, :1]

    out = sliding_window_logits(grid, grid, predict, 1, PATCH, mirror_axes=(0, 2))
    torch.testing.assert_close(out, grid[:1])  # logits were flipped back
    starts = compute_steps_for_sliding_window(shape, PATCH, 0.5)
    assert len(calls) == 4 * len(list(itertools.product(*starts)))  # identity, z, x, zx


def test_mirroring_tta():
    vol = volume((20, 26, 30))
    sym = conv_net(1, 2, seed=3, symmetric=True)
    plain = sliding_window_logits(vol, None, net_predictor(sym), 2, PATCH)
    tta = sliding_window_logits(vol, None, net_predictor(sym), 2, PATCH, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)

    asym = conv_net(1, 2, seed=4)
    plain = sliding_window_logits(vol, None, net_predictor(asym), 2, PATCH)
    tta = sliding_window_logits(vol, None, net_predictor(asym), 2, PATCH, mirror_axes=(1, 2))
    again = sliding_window_logits(vol, None, net_predictor(asym), 2, PATCH, mirror_axes=(1, 2))
    assert (tta - plain).abs().max() > 1e-3
    assert torch.equal(tta, again)


def test_starts_cover_volume_deterministic_and_batch_size_independent():
    vol = volume((23, 31, 45))
    shape = tuple(vol.shape[1:])
    log: list = []
    done: list = []
    a = sliding_window_logits(vol, None, recording(noise_predictor(3), log), 3, PATCH, batch_size=1)
    b = sliding_window_logits(vol, None, noise_predictor(3), 3, PATCH, batch_size=1)
    c = sliding_window_logits(vol, None, noise_predictor(3), 3, PATCH, batch_size=3,
                              progress=lambda d, t: done.append((d, t)))
    starts = [s for call in log for s in call]
    assert starts == list(itertools.product(*compute_steps_for_sliding_window(shape, PATCH, 0.5)))
    assert (coverage(shape, starts, [0, 0, 0]) > 0).all()
    assert all(0 <= s <= n - p for start in starts for s, n, p in zip(start, shape, PATCH))
    assert torch.equal(a, b) and torch.equal(a, c)
    n = len(starts)
    assert done[-1] == (n, n) and len(done) == -(-n // 3) and [d for d, _ in done] == sorted({d for d, _ in done})


def test_fp16_accumulation_close_to_fp32():
    vol = volume((22, 30, 37))
    full = sliding_window_logits(vol, None, noise_predictor(2), 2, PATCH, mirror_axes=(0,))
    half = sliding_window_logits(vol, None, noise_predictor(2), 2, PATCH, mirror_axes=(0,),
                                 accumulate_dtype=torch.float16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=1e-2, rtol=1e-2)

    def huge(image, guidance, starts):
        return torch.full((image.shape[0], 1, *PATCH), 1e4)

    with pytest.raises(RuntimeError, match="float32"):  # 1e4 * weight 10 overflows float16
        sliding_window_logits(vol, None, huge, 1, PATCH, accumulate_dtype=torch.float16)


def test_no_gradients_and_result_is_an_ordinary_tensor():
    net = conv_net(1, 2, seed=5)
    out = sliding_window_logits(volume((14, 14, 16)), None, net_predictor(net), 2, PATCH)
    assert not out.requires_grad
    out.softmax(0).add_(1)  # not an inference tensor: in-place use outside inference mode works
    out.mul_(2)


def test_invalid_arguments():
    vol = volume((12, 14, 16))
    with pytest.raises(ValueError, match="predict_patch returned shape"):
        sliding_window_logits(vol, None, noise_predictor(2), 3, PATCH)
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_logits(vol, None, noise_predictor(2), 2, PATCH, mirror_axes=(3,))
    with pytest.raises(ValueError, match="guidance"):
        sliding_window_logits(vol, torch.zeros(3, 12, 14, 15), noise_predictor(2), 2, PATCH)
    with pytest.raises(ValueError, match="step_size"):
        sliding_window_logits(vol, None, noise_predictor(2), 2, PATCH, step_size=0)
