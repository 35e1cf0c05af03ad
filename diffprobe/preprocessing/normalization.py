"""Intensity normalisation as planned, and its inverse.

CT (default): clip to the HU window [-1350, 1000] and map linearly to [-1, 1] (vox2vec's
window). Chosen over nnU-Net's percentile clip + z-score because a DDPM assumes data in a
bounded range around [-1, 1], and because a fixed HU mapping is identical across datasets,
which lets several datasets be pretrained together and keeps planned noise levels
meaningful in HU. Other channels: per-image z-score (no absolute intensity scale).
"""

from __future__ import annotations

import numpy as np


def normalize(data_czyx: np.ndarray, normalization: dict) -> np.ndarray:
    """Normalise each channel per its plan entry (keys are channel numbers as strings)."""
    out = np.empty_like(data_czyx, dtype=np.float32)
    for c in range(data_czyx.shape[0]):
        spec = normalization[str(c)]
        x = data_czyx[c].astype(np.float32, copy=False)
        if spec["scheme"] == "ct_window":
            lo, hi = spec["window_hu"]
            out_lo, out_hi = spec["output_range"]
            out[c] = (np.clip(x, lo, hi) - lo) / (hi - lo) * (out_hi - out_lo) + out_lo
        elif spec["scheme"] == "zscore_per_image":
            std = float(x.std())
            out[c] = (x - float(x.mean())) / max(std, 1e-8)
        else:  # validated in plans.validate_plans
            raise ValueError(f"unknown normalization scheme {spec['scheme']!r}")
    return out


def denormalize_ct(x: np.ndarray, spec: dict) -> np.ndarray:
    """Inverse of the CT window mapping (values outside the window come back clipped)."""
    lo, hi = spec["window_hu"]
    out_lo, out_hi = spec["output_range"]
    return (x - out_lo) / (out_hi - out_lo) * (hi - lo) + lo
