"""Crop to the body.

CT: the body is the largest connected component above -500 HU (as in vox2vec); this
drops air, the table (a separate component) and most of the empty field of view.
Other modalities: nnU-Net's non-zero mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_HU_THRESHOLD = -500.0


def body_mask(ct_zyx: np.ndarray, threshold: float = BODY_HU_THRESHOLD) -> np.ndarray:
    """Largest connected component of ``ct > threshold`` (6-connectivity), holes in-plane kept."""
    mask = ct_zyx > threshold
    if not mask.any():
        return mask
    # label on a 2x-subsampled grid for speed on large CTs, then map back
    step = 2 if min(mask.shape) >= 64 else 1
    small = mask[::step, ::step, ::step]
    labels, n = ndimage.label(small)
    if n == 0:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    keep = labels == int(np.argmax(counts))
    if step > 1:
        keep = np.repeat(np.repeat(np.repeat(keep, step, 0), step, 1), step, 2)
        keep = keep[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
        keep = ndimage.binary_dilation(keep, iterations=1) & mask
    return keep


def fill_in_plane(mask_zyx: np.ndarray) -> np.ndarray:
    """Fill the holes of each axial plane: the lungs and the gas of stomach and bowel are body."""
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask_zyx])


def filled_body(ct_zyx: np.ndarray) -> np.ndarray:
    """The body as the crop finds it, its in-plane holes filled: outside lie air, the table and padding."""
    return fill_in_plane(body_mask(np.asarray(ct_zyx, dtype=np.float32)))


def nonzero_mask(data_czyx: np.ndarray) -> np.ndarray:
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    return create_nonzero_mask(data_czyx)


def foreground_mask(data_czyx: np.ndarray, ct_channels: list[int]) -> np.ndarray:
    """Body mask from the first CT channel, else the non-zero mask of all channels."""
    if ct_channels:
        return body_mask(data_czyx[ct_channels[0]])
    return nonzero_mask(data_czyx)


def bounding_box(mask: np.ndarray, margin: int = 0) -> list[list[int]]:
    """[[lo, hi), ...] per axis of the mask's non-zero region; the full array if empty."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append([max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[axis])])
    return box


def crop(array: np.ndarray, box: list[list[int]]) -> np.ndarray:
    """Crop the last len(box) axes of ``array`` to ``box``."""
    lead = array.ndim - len(box)
    sl = (slice(None),) * lead + tuple(slice(lo, hi) for lo, hi in box)
    return array[sl]
