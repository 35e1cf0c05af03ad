"""Gaussian-weighted sliding-window aggregation of patch logits over a whole volume (nnU-Net style).

The network only ever sees ``patch_size`` tiles (the size it was trained on), so a whole
preprocessed volume is covered by overlapping tiles whose logits are averaged with a Gaussian
importance map: voxels near a tile's centre had the most context, so that tile's opinion counts
most there.  Tile placement (``compute_steps_for_sliding_window``) and the weights
(``compute_gaussian``, sigma = patch/8) come from nnU-Net, so results match its predictor's
conventions.

The window geometry and the tile loop (``diffprobe.models.tiling``: ``window_starts``,
``nnunet_gaussian``, ``tile_average``) are shared with the body part regressor's whole-volume
inference (``diffprobe.bpr.model.predict_coordinates``).  ``sliding_window_logits`` is the generic
probe window: padding, guidance tiles and mirroring around that loop, the network hidden behind
``predict_patch``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffprobe.models.tiling import (  # noqa: F401 - re-exported: the window's constants
    MIN_WEIGHT,
    VALUE_SCALING_FACTOR,
    nnunet_gaussian,
    tile_average,
    window_starts,
)

PatchPredictor = Callable[[Tensor, Tensor | None, list[tuple[int, int, int]]], Tensor]
"""``predict_patch(image_tiles, guidance_tiles, starts) -> logits``; see ``sliding_window_logits``."""


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


def mirror_pad(t: Tensor, before: list[int], after: list[int]) -> Tensor:
    """(C, z, y, x) padded by ``before``/``after`` voxels per axis with its own slices mirrored at its
    ends (``numpy.pad`` "symmetric", any width) -- what ``thin_padding="mirror"`` trains on."""
    for axis, (b, a) in enumerate(zip(before, after)):
        if b or a:
            index = np.pad(np.arange(t.shape[axis + 1]), (b, a), mode="symmetric")
            t = t.index_select(axis + 1, torch.from_numpy(index).to(t.device))
    return t


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
    thin_padding: str = "air",
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Whole-volume logits ``(K, z, y, x)`` float32 on ``device``: Gaussian-weighted mean of tile logits.

    ``volume`` (C, z, y, x) is the preprocessed image; ``guidance`` (G, z, y, x) optional extra
    channels aligned with it (e.g. body-part coordinates), cut into the same tiles.

    **Padding**: an axis shorter than the patch is padded to the patch size, *centred* like
    nnU-Net's ``pad_nd_image`` (``before = (patch - n) // 2``, the odd voxel goes after); the image
    with ``pad_value`` (normalised air), the guidance by edge replication (a constant such as -1 would
    be a real, wrong coordinate); with ``thin_padding="mirror"`` (a probe trained that way,
    ``probe.data.mirror_thin_axes``) image and guidance are the volume's own slices mirrored at its ends.
    The padding is cropped off the result exactly.

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

    Tile starts follow nnU-Net's ``compute_steps_for_sliding_window`` (``window_starts``, float for
    float; ``step_size`` is the fraction of the patch between tiles; 0.5 as nnU-Net), weights its
    ``compute_gaussian`` (sigma_scale 1/8, peak 10), floored at ``MIN_WEIGHT`` (``nnunet_gaussian``);
    the loop is ``diffprobe.models.tiling.tile_average``.  Only two buffers on ``device`` hold
    state — the weighted logit sum (K, padded shape) and the weight sum — in ``accumulate_dtype``
    (float16 halves memory on GPU; products are formed in float32 first).  The volume stays on its
    own device and tiles are copied to ``device`` (pass it there already to avoid transfers).
    Deterministic: fixed tile order and accumulation order, no gradients.
    ``progress(done, total)`` is called after every batch with tile counts.
    """
    patch_size = tuple(int(p) for p in patch_size)
    mirror_axes = tuple(int(a) for a in mirror_axes)
    _check_args(volume, guidance, patch_size, step_size, batch_size, mirror_axes, accumulate_dtype, num_classes)
    device = torch.device(device)

    shape = tuple(volume.shape[1:])
    before = [max(p - n, 0) // 2 for n, p in zip(shape, patch_size)]
    after = [max(p - n, 0) - b for n, p, b in zip(shape, patch_size, before)]
    pad = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]  # F.pad: last axis first
    if any(pad) and thin_padding == "mirror":
        volume = mirror_pad(volume, before, after)
        guidance = mirror_pad(guidance, before, after) if guidance is not None else None
    elif any(pad):
        volume = F.pad(volume, pad, value=pad_value)
        if guidance is not None:
            guidance = F.pad(guidance[None], pad, mode="replicate")[0]
    padded = tuple(volume.shape[1:])

    starts = list(itertools.product(*(window_starts(n, p, p * step_size) for n, p in zip(padded, patch_size))))
    combos = _mirror_combinations(mirror_axes)
    pz, py, px = patch_size
    expected = (num_classes, *patch_size)

    def predict_batch(batch: list[tuple[int, int, int]]) -> Tensor:
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
        return logits

    crop = tuple(slice(b, b + n) for b, n in zip(before, shape)) if any(pad) else None
    return tile_average(starts, predict_batch, num_classes, padded, patch_size,
                        nnunet_gaussian(patch_size, accumulate_dtype, device), batch_size=batch_size, device=device,
                        accumulate_dtype=accumulate_dtype, crop=crop, progress=progress)
