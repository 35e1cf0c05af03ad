"""The slice-by-slice resampler equals nnU-Net's resample_data_or_seg_to_shape bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from diffprobe.preprocessing.resampling import nearest_source_indices, resample_to_shape

CASES = [  # (shape, current spacing, new spacing, new shape): thick axis z, down and up, thick axis x, isotropic
    ((7, 20, 18), (3.0, 0.8, 0.8), (1.5, 0.8, 0.8), (14, 20, 18)),
    ((13, 20, 18), (1.0, 0.7, 0.7), (3.1, 0.9, 0.9), (4, 16, 14)),
    ((9, 17, 23), (3.9, 0.8, 0.8), (1.0, 0.9, 0.8), (35, 15, 23)),
    ((12, 14, 6), (0.8, 0.8, 4.0), (0.8, 0.8, 1.6), (12, 14, 15)),
    ((10, 12, 14), (1.0, 1.0, 1.0), (1.4, 1.4, 1.4), (7, 9, 10)),
]


@pytest.mark.parametrize("shape, spacing, new_spacing, new_shape", CASES)
@pytest.mark.parametrize("is_seg", [False, True])
def test_equals_nnunet(shape, spacing, new_spacing, new_shape, is_seg) -> None:
    rng = np.random.default_rng(0)
    if is_seg:
        data = rng.integers(0, 4, size=(1, *shape)).astype(np.uint8)
        order = 1
    else:
        data = rng.normal(0, 100, size=(2, *shape)).astype(np.float32)
        order = 3
    ours = resample_to_shape(data, new_shape, spacing, new_spacing, is_seg, order, 0, 3.0)
    ref = resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, is_seg=is_seg, order=order, order_z=0,
                                        force_separate_z=None, separate_z_anisotropy_threshold=3.0)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_same_shape_returns_input() -> None:
    data = np.zeros((1, 5, 6, 7), np.float32)
    assert resample_to_shape(data, (5, 6, 7), (3.0, 1.0, 1.0), (3.0, 1.0, 1.0), False, 3, 0, 3.0) is data


def test_nearest_source_indices_cover_the_axis() -> None:
    up = nearest_source_indices(4, 9)
    assert up[0] == 0 and up[-1] == 3 and np.all(np.diff(up) >= 0)
    assert list(nearest_source_indices(5, 5)) == [0, 1, 2, 3, 4]
