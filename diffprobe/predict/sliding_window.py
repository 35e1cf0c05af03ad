"""Gaussian-weighted sliding-window aggregation of patch logits over a whole volume (nnU-Net style).

The network only ever sees ``patch_size`` tiles (the size it was trained on), so a whole
preprocessed volume is covered by overlapping tiles whose logits are averaged with a Gaussian
importance map: voxels near a tile's centre had the most context, so that tile's opinion counts
most there.  Tile placement (``compute_steps_for_sliding_window``) and the weights
(``compute_gaussian``, sigma = patch/8) come from nnU-Net, so results match its predictor's
conventions.  ``diffprobe.bpr.model.predict_coordinates`` is an unrelated, older sliding window on
a low-resolution grid; this one is generic: the network is hidden behind ``predict_patch``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PatchPredictor = Callable[[Tensor, Tensor | None, list[tuple[int, int, int]]], Tensor]
"""``predict_patch(image_tiles, guidance_tiles, starts) -> logits``; see ``sliding_window_logits``."""

# nnU-Net's predictor scales the Gaussian peak to 10 (keeps fp16 sums far from overflow).
VALUE_SCALING_FACTOR = 10.0
# Floor for the weights: 1e-4 of the peak, which only raises voxels farther than ~0.54 patch lengths
# (per-axis normalised) from the tile centre, i.e. the tile's edges and corners.  There the raw
# Gaussian falls to ~4e-10, zero or subnormal in fp16: 0/0 at volume corners, and logits * weight
# loses all precision.  Applied in both modes, so fp16 and fp32 accumulation use the same weights.
MIN_WEIGHT = 1e-3


def _mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Identity first, then every non-empty combination of ``axes`` (nnU-Net's TTA set)."""
    return [()] + [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]


def _check_args(volume: Tensor, guidance: Tensor | None, patch_size: tuple[int, ...], step_size: float,
                batch_size: int, mirror_axes: tuple[int, ...], accumulate_dtype: torch.dtype,
                num_classes: int) -> None:
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, z, y, x), got shape {tuple(volume.shape)}")
    if guidance is not None and (guidance.ndim != 4 or guidance.shape[1:] != volume.shape[1:]):
        raise ValueError(f"guidance must be (G, z, y, x) with the volume's spatial shape {tuple(volume.shape[1:])}, "
                         f"got {tuple(guidance.shape)}")
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be three positive ints, got {patch_size}")
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    if batch_size < 1 or num_classes < 1:
        raise ValueError(f"batch_size and num_classes must be positive, got {batch_size}, {num_classes}")
    if len(set(mirror_axes)) != len(mirror_axes) or not set(mirror_axes) <= {0, 1, 2}:
        raise ValueError(f"mirror_axes must be distinct spatial axes from (0, 1, 2), got {mirror_axes}")
    if accumulate_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"accumulate_dtype must be torch.float32 or torch.float16, got {accumulate_dtype}")


@torch.no_grad()  # no_grad, not inference_mode: callers may modify the result in place afterwards
def sliding_window_logits(
    volume: Tensor,
    guidance: Tensor | None,
    predict_patch: PatchPredictor,
    num_classes: int,
    patch_size: tuple[int, int, int],
    step_size: float = 0.5,
    batch_size: int = 1,
    mirror_axes: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
    accumulate_dtype: torch.dtype = torch.float32,
    pad_value: float = -1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Whole-volume logits ``(K, z, y, x)`` float32 on ``device``: Gaussian-weighted mean of tile logits.

    ``volume`` (C, z, y, x) is the preprocessed image; ``guidance`` (G, z, y, x) optional extra
    channels aligned with it (e.g. body-part coordinates), cut into the same tiles.

    **Padding**: an axis shorter than the patch is padded to the patch size, *centred* like
    nnU-Net's ``pad_nd_image`` (``before = (patch - n) // 2``, the odd voxel goes after); the image
    with ``pad_value`` (normalised air), the guidance by edge replication (a constant such as -1 would
    be a real, wrong coordinate).  The padding is cropped off the result exactly.

    **predict_patch(image_tiles, guidance_tiles, starts) -> logits**:

    * ``image_tiles``: (B, C, pz, py, px), on ``device``, in the volume's dtype;
    * ``guidance_tiles``: (B, G, pz, py, px) on ``device``, or None when ``guidance`` is None;
    * ``starts``: list of B ``(z, y, x)`` int tuples, tile ``b`` = padded volume
      ``[:, z:z+pz, y:y+py, x:x+px]``.  Starts are in **padded**-volume coordinates (subtract the
      centred padding to get original coordinates; equal when no axis was padded) and are stable
      across calls, so callers can seed per-tile noise from them deterministically.  With mirroring
      the callable is called once per mirror combination with the *same* starts but flipped tiles
      (so noise seeded from starts alone is reused in the flipped frame, not flipped with the image);
    * returns (B, ``num_classes``, pz, py, px) logits in the tiles' (possibly flipped) frame.

    B is ``batch_size`` except possibly for the last call.  ``mirror_axes``: spatial axes
    (0=z, 1=y, 2=x); for the identity and every non-empty combination the tiles are flipped,
    predicted and flipped back, and the logits averaged (nnU-Net's TTA: 2**len(axes) calls per batch).

    Tile starts come from nnU-Net's ``compute_steps_for_sliding_window`` (``step_size`` is the
    fraction of the patch between tiles; 0.5 as nnU-Net), weights from ``compute_gaussian``
    (sigma_scale 1/8, peak 10), floored at ``MIN_WEIGHT``.  Only two buffers on ``device`` hold
    state — the weighted logit sum (K, padded shape) and the weight sum — in ``accumulate_dtype``
    (float16 halves memory on GPU; products are formed in float32 first).  The volume stays on its
    own device and tiles are copied to ``device`` (pass it there already to avoid transfers).
    Deterministic: fixed tile order and accumulation order, no gradients.
    ``progress(done, total)`` is called after every batch with tile counts.
    """
    # Imported here so that ``import diffprobe.predict`` stays light (nnunetv2 pulls in scipy.ndimage).
    # This nnunetv2 module imports only numpy, torch, scipy and acvl_utils (no torchvision/timm).
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    patch_size = tuple(int(p) for p in patch_size)
    mirror_axes = tuple(int(a) for a in mirror_axes)
    _check_args(volume, guidance, patch_size, step_size, batch_size, mirror_axes, accumulate_dtype, num_classes)
    device = torch.device(device)

    shape = tuple(volume.shape[1:])
    before = [max(p - n, 0) // 2 for n, p in zip(shape, patch_size)]
    after = [max(p - n, 0) - b for n, p, b in zip(shape, patch_size, before)]
    pad = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]  # F.pad: last axis first
    if any(pad):
        volume = F.pad(volume, pad, value=pad_value)
        if guidance is not None:
            guidance = F.pad(guidance[None], pad, mode="replicate")[0]
    padded = tuple(volume.shape[1:])

    steps = compute_steps_for_sliding_window(padded, patch_size, step_size)
    starts = list(itertools.product(*steps))
    # compute_gaussian is lru_cached and returns a shared tensor: never modify it in place.
    weight = compute_gaussian(patch_size, sigma_scale=1.0 / 8, value_scaling_factor=VALUE_SCALING_FACTOR,
                              dtype=torch.float32, device=device).clamp_min(MIN_WEIGHT)
    weight = weight.to(accumulate_dtype)  # identical (rounded) weights in numerator and denominator
    weight32 = weight.float()

    logit_sum = torch.zeros((num_classes, *padded), dtype=accumulate_dtype, device=device)
    weight_sum = torch.zeros(padded, dtype=accumulate_dtype, device=device)
    combos = _mirror_combinations(mirror_axes)
    pz, py, px = patch_size
    expected = (num_classes, *patch_size)

    for first in range(0, len(starts), batch_size):
        batch = starts[first:first + batch_size]
        image = torch.stack([volume[:, z:z + pz, y:y + py, x:x + px] for z, y, x in batch]).to(device)
        guide = None if guidance is None else torch.stack(
            [guidance[:, z:z + pz, y:y + py, x:x + px] for z, y, x in batch]).to(device)
        logits = None
        for combo in combos:
            dims = [a + 2 for a in combo]
            img_in = torch.flip(image, dims) if dims else image
            guide_in = torch.flip(guide, dims) if dims and guide is not None else guide
            out = predict_patch(img_in, guide_in, list(batch))
            if tuple(out.shape) != (len(batch), *expected):
                raise ValueError(f"predict_patch returned shape {tuple(out.shape)}, expected {(len(batch), *expected)}")
            out = out.to(device=device, dtype=torch.float32)
            out = torch.flip(out, dims) if dims else out
            logits = out if logits is None else logits + out
        if len(combos) > 1:
            logits = logits / len(combos)  # not in place: ``logits`` may be predict_patch's own tensor
        for tile, (z, y, x) in zip(logits, batch):
            region = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
            logit_sum[(slice(None), *region)] += (tile * weight32).to(accumulate_dtype)
            weight_sum[region] += weight
        if progress is not None:
            progress(min(first + batch_size, len(starts)), len(starts))

    crop = tuple(slice(b, b + n) for b, n in zip(before, shape))
    if accumulate_dtype == torch.float32:
        # In place: the K x volume sum becomes the result, so no second K x volume buffer is ever
        # allocated (for a 512x512x600 CT and 7 classes that is ~2 GB). Contiguous when nothing was padded.
        logit_sum.div_(weight_sum)
        del weight_sum
        result = logit_sum[(slice(None), *crop)] if any(pad) else logit_sum
        return result.contiguous()
    result = torch.empty((num_classes, *shape), dtype=torch.float32, device=device)
    # Mixed-dtype division promotes to float32 and writes straight into ``result`` (no fp32 copy of the sums).
    torch.div(logit_sum[(slice(None), *crop)], weight_sum[crop].float(), out=result)
    if accumulate_dtype == torch.float16 and not torch.isfinite(result).all():
        raise RuntimeError("non-finite logits after float16 accumulation: the weighted sums overflowed (or "
                           "predict_patch returned inf/nan); use accumulate_dtype=torch.float32")
    return result
