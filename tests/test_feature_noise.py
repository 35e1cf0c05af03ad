"""The feature diagnostics of ``benchmarks/real_ct_feature_noise.py``: nearest-class-mean accuracy and the
stitched features of a slab thinner than the patch (shapes, determinism, independent noise draws)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_nearest_class_mean_separates_separable_classes_and_not_noise():
    from real_ct_feature_noise import ncm_accuracy

    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, 3000)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    a = (centres[seg] + rng.normal(0, 0.3, (3000, 2))).T
    b = (centres[seg] + rng.normal(0, 0.3, (3000, 2))).T
    assert ncm_accuracy(a, b, seg) > 0.99
    noise = rng.normal(0, 1, (2, 3000))
    assert ncm_accuracy(noise, rng.normal(0, 1, (2, 3000)), seg) == pytest.approx(1 / 3, abs=0.05)


def test_slab_features_cover_the_slab_per_level_and_the_draws_differ():
    from real_ct_feature_noise import slab_features

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.models import DiffusionUNet
    from diffprobe.probe.features import FeatureExtractor

    torch.manual_seed(0)
    levels = [{"stride_from_previous": [1, 1, 1], "channels": 8, "attention": "linear"},
              {"stride_from_previous": [2, 2, 2], "channels": 16, "attention": "linear"}]
    ex = FeatureExtractor(DiffusionUNet(1, 3, levels, blocks_per_level=1).eval(),
                          GaussianDiffusion(num_timesteps=100), [5, 20]).eval()
    data = np.random.default_rng(1).normal(size=(1, 4, 12, 20)).astype(np.float32)  # 4 slices < patch 8
    guide = np.random.default_rng(2).normal(size=(3, 4, 12, 20)).astype(np.float32)
    patch = [8, 8, 8]
    a = slab_features(ex, data, guide, patch, 0, draw=0)
    assert a["dec0"].shape == (2 * 8, 4, 12, 20)  # timesteps x channels, the slab's own voxels
    assert a["dec1"].shape == (2 * 16, 2, 6, 10)
    again = slab_features(ex, data, guide, patch, 0, draw=0)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    b = slab_features(ex, data, guide, patch, 0, draw=1)
    assert not np.allclose(a["dec0"], b["dec0"])
    low = slab_features(ex, data, guide, patch, 4, draw=0)
    assert low["dec0"].shape == a["dec0"].shape and not np.allclose(a["dec0"], low["dec0"])
