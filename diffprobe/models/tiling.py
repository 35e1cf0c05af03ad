"""Sliding windows over a volume for patch networks: window placement, importance maps, the tile loop.

One place for the window geometry and the batched tile loop that both whole-volume inferences use:
the probe's Gaussian-weighted sliding window (``diffprobe.predict.sliding_window``, nnU-Net's
conventions) and the body part regressor's (``diffprobe.bpr.model.predict_coordinates``), whose
network outputs a grid ``stride`` times coarser than its input.  :func:`window_starts` places
windows (nnU-Net's rule, or starts aligned on the output grid), :func:`nnunet_gaussian` /
:func:`separable_gaussian` are the two importance maps, and :func:`tile_average` is the loop that
runs the network on batches of windows and accumulates the weighted mean.  It lives with the
networks (not in ``predict/``) so that ``bpr`` can use it without importing a higher layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# nnU-Net's predictor scales the Gaussian peak to 10 (keeps fp16 sums far from overflow).
VALUE_SCALING_FACTOR = 10.0
# Floor for the weights: 1e-4 of the peak, which only raises voxels farther than ~0.54 patch lengths
# (per-axis normalised) from the tile centre, i.e. the tile's edges and corners.  There the raw
# Gaussian falls to ~4e-10, zero or subnormal in fp16: 0/0 at volume corners, and logits * weight
# loses all precision.  Applied in both modes, so fp16 and fp32 accumulation use the same weights.
MIN_WEIGHT = 1e-3


def window_starts(size: int, patch: int, step: float, align: int | None = None) -> list[int]:
    """Starts of windows of length ``patch`` covering ``[0, size)``, at most ``step`` apart, evenly spread.

    ``align=None``: nnU-Net's ``compute_steps_for_sliding_window`` for one axis, float for float
    (``step = patch * step_size``).  ``align=k``: starts snapped to multiples of ``k`` (a network whose
    output is k times coarser: every window then covers whole output cells) and the last window flush
    with the end (``size - patch`` a multiple of k).  ``size <= patch`` gives ``[0]`` in both rules.
    The two roundings of the evenly spread positions differ only at exact float ties (a few shapes in
    a thousand); each is kept float for float, so neither the probe's tiles (nnU-Net's placement) nor
    the BPR's windows (and with them the cached BPR maps pretraining made) move.
    """
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / step) + 1
    if align is None:
        actual = (size - patch) / (n - 1)
        return [int(round(actual * i)) for i in range(n)]
    starts = {int(round(i * (size - patch) / (n - 1) / align)) * align for i in range(n)}
    return sorted(starts | {size - patch})


def nnunet_gaussian(patch_size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """nnU-Net's importance map (``compute_gaussian``: sigma = patch/8, peak ``VALUE_SCALING_FACTOR``),
    floored at ``MIN_WEIGHT`` and rounded to ``dtype`` (the same weights in numerator and denominator)."""
    # Imported here so that ``import diffprobe.predict`` stays light (nnunetv2 pulls in scipy.ndimage).
    # This nnunetv2 module imports only numpy, torch, scipy and acvl_utils (no torchvision/timm).
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    # compute_gaussian is lru_cached and returns a shared tensor: never modify it in place.
    weight = compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=VALUE_SCALING_FACTOR,
                              dtype=torch.float32, device=device).clamp_min(MIN_WEIGHT)
    return weight.to(dtype)


def separable_gaussian(shape: tuple[int, ...], device: torch.device, sigma_scale: float = 0.25,
                       floor: float = 1e-3) -> Tensor:
    """Product of per-axis Gaussians (sigma = ``sigma_scale`` x the size, centred at (n-1)/2, peak 1,
    each floored at ``floor``): the BPR's window weights on its low-resolution output grid."""
    w = torch.ones((), device=device)
    for n in shape:
        t = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        g = torch.exp(-0.5 * (t / max(n * sigma_scale, 1e-3)) ** 2)
        w = w[..., None] * (g / g.max()).clamp_min(floor)
    return w


@torch.no_grad()
def tile_average(starts: Sequence[tuple[int, int, int]], predict_batch: Callable[[list[tuple[int, int, int]]], Tensor],
                 num_channels: int, shape: tuple[int, int, int], patch_size: tuple[int, int, int], weight: Tensor,
                 *, stride: tuple[int, int, int] = (1, 1, 1), batch_size: int = 1,
                 device: torch.device | str = "cpu", accumulate_dtype: torch.dtype = torch.float32,
                 crop: tuple[slice, ...] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """The weighted mean ``(K, *shape / stride)`` float32 of a network's outputs over windows: the one tile loop.

    ``starts`` are window starts (z, y, x) on the input grid of ``shape``; ``predict_batch(starts)``
    (at most ``batch_size`` of them, in order) cuts and predicts those windows and returns
    ``(B, num_channels, *patch_size / stride)``: the network's output for window ``b`` covers output
    cells ``start / stride`` onwards.  ``weight`` (``patch_size / stride``) weighs every window's output.
    Two buffers hold state on ``device``: the weighted sum and the weight sum, in ``accumulate_dtype``
    (products are formed in float32 first; the weights are rounded to it once, so numerator and
    denominator see the same ones).  ``crop`` (slices of the output grid) is applied to the result.
    Deterministic: fixed window and accumulation order.  ``progress(done, total)`` after every batch.
    """
    device = torch.device(device)
    out_shape = tuple(n // s for n, s in zip(shape, stride, strict=True))
    out_patch = tuple(p // s for p, s in zip(patch_size, stride, strict=True))
    weight = weight.to(device=device, dtype=accumulate_dtype)
    weight32 = weight.float()
    logit_sum = torch.zeros((num_channels, *out_shape), dtype=accumulate_dtype, device=device)
    weight_sum = torch.zeros(out_shape, dtype=accumulate_dtype, device=device)
    expected = (num_channels, *out_patch)
    starts = list(starts)
    for first in range(0, len(starts), batch_size):
        batch = starts[first:first + batch_size]
        out = predict_batch(batch)
        if tuple(out.shape) != (len(batch), *expected):
            raise ValueError(f"predict_batch returned shape {tuple(out.shape)}, expected {(len(batch), *expected)}")
        out = out.to(device=device, dtype=torch.float32)
        for tile, start in zip(out, batch):
            region = tuple(slice(v // s, v // s + p) for v, s, p in zip(start, stride, out_patch))
            logit_sum[(slice(None), *region)] += (tile * weight32).to(accumulate_dtype)
            weight_sum[region] += weight
        if progress is not None:
            progress(min(first + batch_size, len(starts)), len(starts))

    if accumulate_dtype == torch.float32:
        # In place: the K x volume sum becomes the result, so no second K x volume buffer is ever
        # allocated (for a 512x512x600 CT and 7 classes that is ~2 GB). Contiguous when nothing is cropped.
        logit_sum.div_(weight_sum)
        del weight_sum
        result = logit_sum[(slice(None), *crop)] if crop is not None else logit_sum
        return result.contiguous()
    crop = crop if crop is not None else tuple(slice(None) for _ in out_shape)
    sums = logit_sum[(slice(None), *crop)]
    result = torch.empty(sums.shape, dtype=torch.float32, device=device)
    # Mixed-dtype division promotes to float32 and writes straight into ``result`` (no fp32 copy of the sums).
    torch.div(sums, weight_sum[crop].float(), out=result)
    if accumulate_dtype == torch.float16 and not torch.isfinite(result).all():
        raise RuntimeError("non-finite logits after float16 accumulation: the weighted sums overflowed (or "
                           "predict_patch returned inf/nan); use accumulate_dtype=torch.float32")
    return result
