"""Size presets for pretraining, in one place, recorded in every checkpoint.

``tiny`` trains in minutes on 2 CPU cores (demo, tests); ``small`` is a sensible single-GPU
run; ``paper`` follows the paper (patch 128x128x32 voxels (x, y, z), batch 1, lr 1e-4, a long
schedule). The network topology is re-derived from the plans' spacing for the preset's
patch size with the planner's rules, so anisotropic data still get per-axis strides.
"""

from __future__ import annotations

import copy
from typing import Any

from diffprobe.errors import DiffprobeError
from diffprobe.planning import planner

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "patch_size": [16, 48, 48], "batch_size": 2, "base_channels": 8, "max_channels": 64, "max_levels": 4,
        "blocks_per_level": 1, "diffusion_steps": 500, "diffusion_lr": 1e-3, "bpr_steps": 200, "bpr_lr": 1e-3,
        "bpr_width": 8, "bpr_crop": [16, 48, 48], "warmup_steps": 20, "ema_decay": 0.99, "checkpoint_every": 50,
        "num_workers": 1, "compile": False, "channels_last": True,
    },
    "small": {
        "patch_size": [32, 64, 64], "batch_size": 2, "base_channels": 16, "max_channels": 128, "max_levels": 5,
        "blocks_per_level": 2, "diffusion_steps": 20000, "diffusion_lr": 1e-4, "bpr_steps": 2000, "bpr_lr": 1e-3,
        "bpr_width": 16, "bpr_crop": [32, 64, 64], "warmup_steps": 500, "ema_decay": 0.999,
        "checkpoint_every": 500, "num_workers": 4, "compile": False, "channels_last": True,
    },
    "paper": {
        "patch_size": [32, 128, 128], "batch_size": 1, "base_channels": 32, "max_channels": 256, "max_levels": 5,
        "blocks_per_level": 2, "diffusion_steps": 300000, "diffusion_lr": 1e-4, "bpr_steps": 10000, "bpr_lr": 1e-3,
        "bpr_width": 32, "bpr_crop": [32, 128, 128], "warmup_steps": 2000, "ema_decay": 0.9999,
        "checkpoint_every": 1000, "num_workers": 8, "compile": False, "channels_last": True,
    },
}


def resolve_preset(plans: dict, preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset values + overrides, with the network levels derived for the preset's patch size."""
    if preset not in PRESETS:
        raise DiffprobeError(f"unknown preset '{preset}'", fix=f"use one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in cfg:
            raise DiffprobeError(f"unknown preset override '{key}'", fix=f"use one of {', '.join(cfg)}")
        cfg[key] = value
    spacing = plans["preprocessing"]["target_spacing"]
    patch = [int(p) for p in cfg["patch_size"]]
    levels = planner.topology(patch, spacing, cfg["max_levels"], cfg["base_channels"], cfg["max_channels"])
    stride = planner.total_stride(levels)
    patch = [max(k, (p // k) * k) for p, k in zip(patch, stride)]
    levels = planner.topology(patch, spacing, cfg["max_levels"], cfg["base_channels"], cfg["max_channels"])
    cfg.update({"preset": preset, "patch_size": patch, "levels": levels, "total_stride": planner.total_stride(levels)})
    return cfg
