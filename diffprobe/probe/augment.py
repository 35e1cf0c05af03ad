"""Augmentation of probe training patches: in-plane rotation and zoom; contrast and brightness.

Why: the probe of a user with few labelled scans sees one body shape at one size and one
orientation; every other patient's organs are a little larger or smaller and turned a little in
the axial plane. nnU-Net trains every network with rotations and zooms for this reason (p 0.2 each,
rotation in-plane only for anisotropic data, "dummy 2D"). Here the image, the label map and the
guidance channels are resampled together (image and guidance linear, labels nearest), so the
body coordinates stay attached to the anatomy they describe. No mirroring: the body is not
left-right symmetric (left and right kidney are different classes).

Intensity (:class:`IntensityAugment`): HU are calibrated, but enhanced organs are not: contrast
timing and dose move them by tens of HU between patients. Measured on the shared real CTs
(soft-tissue mode, HU): 92-98 in the labelled case, 62-72 (crlm1004), 108-118 (crlm1006), 52-62
(pancreas001); in the labelled case spleen (median 80) and liver (93) differ by 13. A probe trained
on that one case called every soft tissue of crlm1004 "spleen" (2 L of it, 34 mL of liver).
``IntensityAugment`` scales HU about water (0 HU: air and fat move, water does not) and adds an
offset, per patch, in the units of the plans' CT window.

The transform maps an output voxel's offset from the patch centre to a source offset around the
same centre in the volume, in physical units (rotation about the cranio-caudal axis, then an
isotropic zoom), so a patch is taken from the same place it would be without augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates


@dataclass(frozen=True)
class SpatialAugment:
    """Rotation about z (±``max_degrees``) and zoom (source extent × ``zoom``), each with probability ``p``."""

    p: float = 0.2
    max_degrees: float = 15.0
    zoom: tuple[float, float] = (0.8, 1.25)

    def draw(self, rng: np.random.Generator, spacing: Sequence[float]) -> np.ndarray | None:
        """A 3×3 matrix (output voxel offset -> source voxel offset), or None for the identity.

        Always draws four numbers, so the stream of later patches does not depend on this one's luck.
        """
        do_rotate, do_zoom, angle_u, zoom_u = rng.random(4)
        rotate, zoom = do_rotate < self.p, do_zoom < self.p
        if not (rotate or zoom):
            return None
        angle = np.deg2rad((2 * angle_u - 1) * self.max_degrees) if rotate else 0.0
        lo, hi = np.log(self.zoom[0]), np.log(self.zoom[1])
        factor = float(np.exp(lo + zoom_u * (hi - lo))) if zoom else 1.0  # log-uniform: as likely smaller as larger
        c, s = np.cos(angle), np.sin(angle)
        rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        d = np.asarray(spacing, dtype=float)
        return (np.diag(1 / d) @ rotation @ np.diag(d)) * factor


def source_box(start: Sequence[int], patch: Sequence[int], matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) of the volume region the transformed patch reads, with one voxel to spare."""
    patch_a = np.asarray(patch, dtype=float)
    centre = np.asarray(start, dtype=float) + (patch_a - 1) / 2
    half = (patch_a - 1) / 2
    corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
    moved = matrix @ corners
    lo = np.floor(centre + moved.min(axis=1)).astype(int) - 1
    hi = np.ceil(centre + moved.max(axis=1)).astype(int) + 2
    return lo, hi - lo


def warp(array: np.ndarray, box_start: np.ndarray, start: Sequence[int], patch: Sequence[int],
         matrix: np.ndarray, order: int) -> np.ndarray:
    """``array`` (C, *box) read at ``box_start`` resampled onto the transformed patch at ``start``: (C, *patch)."""
    patch_a = np.asarray(patch, dtype=float)
    offsets = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch_a], indexing="ij")).reshape(3, -1)
    centre = np.asarray(start, dtype=float) + (patch_a - 1) / 2 - np.asarray(box_start, dtype=float)
    coords = centre[:, None] + matrix @ offsets
    out = np.empty((array.shape[0], *[int(p) for p in patch_a]), dtype=array.dtype)
    for c in range(array.shape[0]):
        out[c] = map_coordinates(array[c], coords, order=order, mode="nearest").reshape(out.shape[1:])
    return out


def augmented_region(read: Callable[[np.ndarray, tuple[int, ...]], np.ndarray], start: Sequence[int],
                     patch: Sequence[int], matrix: np.ndarray, order: int) -> np.ndarray:
    """The transformed patch of a volume that ``read(start, size)`` -> (C, *size) reads (with its own fill)."""
    box_start, box_size = source_box(start, patch, matrix)
    return warp(read(box_start, tuple(int(s) for s in box_size)), box_start, start, patch, matrix, order)


@dataclass(frozen=True)
class IntensityAugment:
    """With probability ``p``: HU -> HU × contrast + shift, contrast in ``contrast``, shift in ±``shift_hu``.

    ``unit_per_hu`` and ``water`` convert to the normalised values the patches hold (the plans' CT window:
    ``2 / (high - low)`` and the normalised value of 0 HU; for z-scored images 1 / 100 and 0 are used);
    build it with :meth:`for_normalization` from the plans, which own the window.
    """

    p: float
    unit_per_hu: float
    water: float
    contrast: tuple[float, float] = (0.75, 1.25)
    shift_hu: float = 30.0

    @classmethod
    def for_normalization(cls, p: float, normalization: dict) -> IntensityAugment:
        """The augmentation in the units of ``normalization`` (the plans' channel-0 block)."""
        if normalization.get("scheme") == "ct_window":
            lo, hi = (float(v) for v in normalization["window_hu"])
            return cls(p=p, unit_per_hu=2 / (hi - lo), water=-1 + 2 * (0 - lo) / (hi - lo))
        return cls(p=p, unit_per_hu=1 / 100, water=0.0)

    def draw(self, rng: np.random.Generator) -> tuple[float, float] | None:
        """(contrast, shift in normalised units) or None; always three numbers from ``rng``."""
        do, c_u, s_u = rng.random(3)
        if do >= self.p:
            return None
        contrast = self.contrast[0] + c_u * (self.contrast[1] - self.contrast[0])
        return float(contrast), float((2 * s_u - 1) * self.shift_hu * self.unit_per_hu)

    def apply(self, image: np.ndarray, drawn: tuple[float, float]) -> np.ndarray:
        """``image`` (normalised) with contrast about water and the shift; kept in [-1, 1] (the window)."""
        contrast, shift = drawn
        return np.clip((image - self.water) * contrast + self.water + shift, -1.0, 1.0).astype(np.float32)
