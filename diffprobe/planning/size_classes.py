"""Size classes: the planner input that says how big a model to plan (not a second configuration).

A size class fixes the *aims* the planner starts from — patch aim, network width, depth,
blocks, batch, learning rates and step budgets. The planner then derives the actual patch
(capped by the data, divisible by the strides, fitted to the memory target), the topology
and the BPR crop from them, and writes everything into plans.json. Every later stage reads
plans.json only; the class name is recorded there so a reader knows where the numbers came from.

- ``tiny``: trains in a few minutes on 2 CPU cores (tests, the phantom demo).
- ``cpu``: the CPU default, tens of minutes on 2 cores (what a laptop user gets). It never plans
  finer than 3 x 1.5 x 1.5 mm (z, y, x): at CT's native 0.8 mm in-plane a CPU spends its budget
  on voxels instead of steps, and a 64-voxel patch would see only 5 cm of anatomy.
- ``small``: a sensible single-GPU run.
- ``paper``: the paper (patch 128x128x32 voxels (x, y, z), batch 1, lr 1e-4, a long schedule).
"""

from __future__ import annotations

import copy
from typing import Any

from diffprobe.errors import DiffprobeError

SIZE_CLASSES: dict[str, dict[str, Any]] = {
    "tiny": {
        "patch_aim": [16, 48, 48], "batch_size": 2, "base_channels": 8, "max_channels": 64, "max_levels": 4,
        "blocks_per_level": 1, "bpr_width": 8,
        "training": {
            "bpr": {"steps": 800, "lr": 3e-3},
            "diffusion": {"steps": 500, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99},
            "probe": {"steps": 1000, "lr": 2e-2, "width": 32, "batch_size": 2},
            "checkpoint_every": 50, "num_workers": 1, "channels_last": True, "compile": False,
            "cuda_graphs": False,
        },
    },
    "cpu": {
        "patch_aim": [24, 64, 64], "batch_size": 2, "base_channels": 16, "max_channels": 128, "max_levels": 4,
        "min_spacing": [3.0, 1.5, 1.5],  # CPU: a whole abdomen at 1.5 mm is ~4x fewer voxels than at 0.8 mm
        "blocks_per_level": 1, "bpr_width": 16,
        "training": {
            "bpr": {"steps": 800, "lr": 3e-3},
            "diffusion": {"steps": 1500, "lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.995},
            "probe": {"steps": 1000, "lr": 2e-2, "width": 32, "batch_size": 2},
            "checkpoint_every": 100, "num_workers": 1, "channels_last": True, "compile": False,
            "cuda_graphs": False,
        },
    },
    "small": {
        "patch_aim": [32, 64, 64], "batch_size": 2, "base_channels": 16, "max_channels": 128, "max_levels": 5,
        "blocks_per_level": 2, "bpr_width": 16,
        "training": {
            "bpr": {"steps": 2000, "lr": 3e-3},
            "diffusion": {"steps": 20000, "lr": 1e-4, "warmup_steps": 500, "ema_decay": 0.999},
            "probe": {"steps": 3000, "lr": 2e-2, "width": 32, "batch_size": 2},
            "checkpoint_every": 500, "num_workers": 4, "channels_last": True, "compile": False,
            "cuda_graphs": False,
        },
    },
    "paper": {
        "patch_aim": [32, 128, 128], "batch_size": 1, "base_channels": 32, "max_channels": 256, "max_levels": 5,
        "blocks_per_level": 2, "bpr_width": 32,
        "training": {
            "bpr": {"steps": 10000, "lr": 3e-3},
            "diffusion": {"steps": 300000, "lr": 1e-4, "warmup_steps": 2000, "ema_decay": 0.9999},
            "probe": {"steps": 10000, "lr": 2e-2, "width": 32, "batch_size": 2},
            "checkpoint_every": 1000, "num_workers": 8, "channels_last": True, "compile": False,
            "cuda_graphs": False,
        },
    },
}


def size_class(name: str) -> dict[str, Any]:
    """A copy of the named size class (refuses an unknown name with the list)."""
    if name not in SIZE_CLASSES:
        raise DiffprobeError(f"unknown size class '{name}'", fix=f"use one of {', '.join(SIZE_CLASSES)}")
    return copy.deepcopy(SIZE_CLASSES[name])


def default_size_class(device: str) -> str:
    """No budget given: CPU -> a model that trains in tens of minutes, GPU -> the paper's."""
    return "paper" if str(device).startswith("cuda") else "cpu"
