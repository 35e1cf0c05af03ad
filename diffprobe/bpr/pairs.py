"""Overlapping crop pairs with a known voxel offset: the supervision of the self-supervised BPR.

The body part regressor is trained without labels: the only "label" is geometry.  Two crops
``a`` and ``b`` are cut from the same preprocessed volume at random, overlapping positions, so
the physical displacement between any voxel of ``a`` and any voxel of ``b`` is known exactly
(``offset_vox`` times the spacing).  The losses (``losses.py``) turn that into order, distance
and consistency constraints on the predicted coordinates. ``sample_far_pair`` draws two crops
at independent places of one volume (no overlap needed): offsets as long as the scan.

Conventions (see docs/bpr.md): arrays are (C, z, y, x) in canonical orientation; ``offset_vox``
is ``start_a - start_b`` per axis, so voxel ``i`` of ``a`` is voxel ``i + offset_vox`` of ``b``
(and voxel ``j`` of ``b`` is voxel ``j - offset_vox`` of ``a``).  Crops may extend past the
volume; those voxels are filled with ``pad_value`` (-1 = the bottom of the normalised CT window,
i.e. air), which keeps offsets exact for volumes smaller than the crop.  No flips or rotations:
they would change what "left" or "superior" means, which is the very thing the model learns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CropPair:
    """Two equally sized crops of one volume and their integer voxel offset.

    ``offset_vox = start_a - start_b`` (z, y, x): voxel ``i`` of ``a`` is voxel ``i + offset_vox``
    of ``b``.  ``start_a``/``start_b`` are the crops' first voxels in the volume (may be negative
    when the crop hangs over the volume's edge); informational, the losses need only the offset.
    """

    a: np.ndarray  # (C, z, y, x) float32
    b: np.ndarray  # (C, z, y, x) float32, same shape as a
    offset_vox: np.ndarray  # (3,) int64
    start_a: np.ndarray | None = None  # (3,) int64
    start_b: np.ndarray | None = None  # (3,) int64


def extract_crop(volume: np.ndarray, start: np.ndarray | tuple[int, ...], size: tuple[int, int, int],
                 pad_value: float = -1.0) -> np.ndarray:
    """Crop ``volume`` (C, z, y, x) at ``start`` (z, y, x, may be negative) to ``size``, padding outside."""
    c = volume.shape[0]
    out = np.full((c, *size), pad_value, dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for st, n, dim in zip(start, size, volume.shape[1:], strict=True):
        st = int(st)
        lo, hi = max(st, 0), min(st + n, dim)
        if hi <= lo:  # no overlap with the volume at all along this axis
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def sample_crop_pair(volume: np.ndarray, crop_size: tuple[int, int, int], rng: np.random.Generator,
                     max_shift_fraction: float = 0.5, *, noise_std: float = 0.0,
                     pad_value: float = -1.0) -> CropPair:
    """Sample two overlapping crops of ``volume`` (C, z, y, x) or (z, y, x) with a known offset.

    Per axis, crop ``a`` starts uniformly anywhere it fits (if the volume is shorter than the
    crop, anywhere the whole volume stays inside the crop), and ``b`` is shifted from it by an
    integer uniform in ``[-floor(max_shift_fraction * size), +...]``, restricted to the same range
    of valid starts — so the crops always overlap by at least ``(1 - max_shift_fraction)`` of
    their size and never cut deeper into padding than necessary.

    ``noise_std`` > 0 adds Gaussian noise (normalised units; 0.02 ~ 23 HU) to ``b`` only, a mild
    intensity-preserving augmentation that the consistency loss then teaches invariance to.
    The default (0) leaves ``a`` and ``b`` bit-identical on their overlap.
    """
    vol = np.asarray(volume)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"volume must be (C, z, y, x) or (z, y, x), got shape {tuple(volume.shape)}")
    if len(crop_size) != 3 or min(crop_size) < 1:
        raise ValueError(f"crop_size must be three positive ints (z, y, x), got {crop_size}")
    if not 0.0 <= max_shift_fraction <= 1.0:
        raise ValueError(f"max_shift_fraction must be in [0, 1], got {max_shift_fraction}")

    start_a = np.zeros(3, np.int64)
    start_b = np.zeros(3, np.int64)
    for ax, (n, dim) in enumerate(zip(crop_size, vol.shape[1:], strict=True)):
        lo, hi = min(0, dim - n), max(0, dim - n)  # valid starts
        sa = int(rng.integers(lo, hi + 1))
        max_shift = int(np.floor(max_shift_fraction * n))
        sb_lo, sb_hi = max(lo, sa - max_shift), min(hi, sa + max_shift)
        start_a[ax], start_b[ax] = sa, int(rng.integers(sb_lo, sb_hi + 1))

    crop_size = tuple(int(n) for n in crop_size)
    a = extract_crop(vol, start_a, crop_size, pad_value)
    b = extract_crop(vol, start_b, crop_size, pad_value)
    if noise_std > 0:
        b += rng.standard_normal(b.shape, dtype=np.float32) * np.float32(noise_std)
    return CropPair(a=a, b=b, offset_vox=start_a - start_b, start_a=start_a, start_b=start_b)


def random_start(dim: int, n: int, rng: np.random.Generator) -> int:
    """A crop start along one axis, uniform over the starts where the crop fits (or holds the whole axis)."""
    lo, hi = min(0, dim - n), max(0, dim - n)
    return int(rng.integers(lo, hi + 1))


def sample_far_pair(read: Callable[[np.ndarray, tuple[int, int, int]], np.ndarray], shape: tuple[int, int, int],
                    crop_size: tuple[int, int, int], rng: np.random.Generator, *, noise_std: float = 0.0) -> CropPair:
    """Two crops of one volume at independent uniform positions: any offset the volume allows.

    Overlapping pairs (``sample_crop_pair``) only tell the model how coordinates change over half
    a crop; a coordinate that is right across a whole scan needs pairs as far apart as the scan
    is long (the ``order`` and ``distance`` terms then compare anatomy 100s of mm apart).
    ``read(start, size)`` returns the (C, *size) crop at ``start`` (z, y, x, may be negative),
    padded outside the volume of spatial ``shape`` — e.g. ``lambda s, n: extract_crop(vol, s, n)``,
    or a lazy reader of a file. Starts follow ``sample_crop_pair``'s rule for crop ``a``;
    ``noise_std`` as there (``b`` only).
    """
    crop_size = tuple(int(n) for n in crop_size)
    start_a = np.array([random_start(d, n, rng) for d, n in zip(shape, crop_size, strict=True)], np.int64)
    start_b = np.array([random_start(d, n, rng) for d, n in zip(shape, crop_size, strict=True)], np.int64)
    a = np.asarray(read(start_a, crop_size), np.float32)
    b = np.array(read(start_b, crop_size), np.float32)
    if noise_std > 0:
        b += rng.standard_normal(b.shape, dtype=np.float32) * np.float32(noise_std)
    return CropPair(a=a, b=b, offset_vox=start_a - start_b, start_a=start_a, start_b=start_b)


def collate_pairs(pairs: list[CropPair]) -> dict[str, torch.Tensor]:
    """Stack pairs into ``{"a": (B,C,z,y,x) float32, "b": same, "offset_vox": (B,3) int64}``."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    return {
        "a": torch.from_numpy(np.stack([p.a for p in pairs]).astype(np.float32, copy=False)),
        "b": torch.from_numpy(np.stack([p.b for p in pairs]).astype(np.float32, copy=False)),
        "offset_vox": torch.from_numpy(np.stack([np.asarray(p.offset_vox, np.int64) for p in pairs])),
    }
