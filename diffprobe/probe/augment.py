"""Spatial augmentation of probe training patches: in-plane rotation and zoom.

Why: the probe of a user with few labelled scans sees one body shape at one size and one
orientation; every other patient's organs are a little larger or smaller and turned a little in
the axial plane. nnU-Net trains every network with rotations and zooms for this reason (p 0.2 each,
rotation in-plane only for anisotropic data, "dummy 2D"). Here the image, the label map and the
guidance channels are resampled together (image and guidance linear, labels nearest), so the
body coordinates stay attached to the anatomy they describe. No mirroring: the body is not
left-right symmetric (left and right kidney are different classes). No intensity changes: CT
intensities are calibrated (HU) and the frozen denoiser was pretrained on them as they are.

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
