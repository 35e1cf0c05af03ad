"""nnU-Net's resampling, slice by slice: the same numbers without its whole-volume temporaries.

For anisotropic CT (slice thickness > 3x the pixel size, i.e. most clinical CT) nnU-Net's
``resample_data_or_seg_to_shape`` resamples each slice in-plane (order 3 for images, order 1
one-hot for label maps) and then picks along the thick axis with order 0 (``order_z=0``).
Its implementation converts the whole input to float64, keeps the whole in-plane-resampled
volume in float64, and builds a ``np.mgrid`` coordinate map (3 x int64 + 3 x float64 + a
stacked copy, ~56 bytes a voxel) over the *output* just to pick slices with
``map_coordinates(order=0)``. Mapping a 512x512x600 CT's label map back from the
preprocessed grid costs ~12 GB that way: the top source of diffprobe's (and nnU-Net's)
prediction RAM.

With ``order_z == 0`` the thick-axis step is a nearest-slice pick, so this module computes
the slice index map once (1D, with nnU-Net's own formula and ``map_coordinates`` rounding),
resamples each *needed* source slice in-plane with nnU-Net's own ``resize`` /
``resize_segmentation`` and writes it straight into the output. The result is bitwise
identical (tested) and the extra memory is one slice. Other cases (isotropic data,
``order_z > 0``) fall back to nnU-Net's function unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import (
    determine_do_sep_z_and_axis,
    resample_data_or_seg_to_shape,
)
from scipy.ndimage import map_coordinates


def nearest_source_indices(n_in: int, n_out: int) -> np.ndarray:
    """For each of ``n_out`` output positions along an axis, the nearest of ``n_in`` source positions.

    nnU-Net's coordinate formula (align_corners=False: ``scale * (i + 0.5) - 0.5``) evaluated by
    ``map_coordinates(order=0, mode="nearest")`` on the index ramp, so ties round exactly as there.
    """
    if n_in == n_out:
        return np.arange(n_out)
    coords = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5
    picked = map_coordinates(np.arange(n_in, dtype=float), coords[None], order=0, mode="nearest")
    return picked.astype(np.int64)


def resample_to_shape(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                      new_spacing: Sequence[float], is_seg: bool, order: int, order_z: int,
                      anisotropy_threshold: float) -> np.ndarray:
    """``resample_data_or_seg_to_shape(..., force_separate_z=None)`` of nnU-Net, slice by slice.

    ``data`` is (C, z, y, x); returns (C, *new_shape) in ``data``'s dtype (``data`` itself when
    nothing changes, as nnU-Net does).
    """
    from batchgenerators.augmentations.utils import resize_segmentation
    from skimage.transform import resize

    new_shape = np.asarray(new_shape, dtype=int)
    do_separate_z, axis = determine_do_sep_z_and_axis(None, current_spacing, new_spacing, anisotropy_threshold)
    if not do_separate_z or order_z != 0 or axis is None:
        return resample_data_or_seg_to_shape(
            data, new_shape, current_spacing, new_spacing, is_seg=is_seg, order=order, order_z=order_z,
            force_separate_z=None, separate_z_anisotropy_threshold=anisotropy_threshold)
    if data.ndim != 4:
        raise ValueError(f"data must be (c, z, y, x), got shape {data.shape}")
    shape = np.asarray(data.shape[1:])
    if np.all(shape == new_shape):
        return data
    axis = int(axis)
    plane_shape = tuple(int(v) for i, v in enumerate(new_shape) if i != axis)
    source = nearest_source_indices(int(shape[axis]), int(new_shape[axis]))
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        channel = data[c]
        for j in np.unique(source):
            plane = np.take(channel, j, axis=axis).astype(float)
            if is_seg:
                resized = resize_segmentation(plane, plane_shape, order)
            else:
                resized = resize(plane, plane_shape, order, mode="edge", anti_aliasing=False)
            targets = np.flatnonzero(source == j)
            index = [slice(None)] * 3
            for k in targets:
                index[axis] = k
                out[(c, *index)] = resized
    return out
