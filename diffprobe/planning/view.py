"""A typed, read-only view of plans.json, so no stage digs through nested dicts.

Why a view and not a dataclass copy: plans.json stays the one editable source (people edit
it, ``--override`` edits it, model folders snapshot it); the view only names what the stages
read, in one place, with the types they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Plans:
    """Wraps a validated plans dict (see :func:`diffprobe.planning.plans.load_plans`)."""

    raw: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Plans:
        from diffprobe.planning.plans import load_plans

        return cls(load_plans(path))

    # ---- data ---------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return str(self.raw["dataset"])

    @property
    def target_spacing(self) -> list[float]:
        return [float(v) for v in self.raw["preprocessing"]["target_spacing"]]

    @property
    def normalization(self) -> dict[str, dict]:
        return self.raw["preprocessing"]["normalization"]

    @property
    def resampling(self) -> dict:
        return self.raw["preprocessing"]["resampling"]

    @property
    def labels(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.raw["labels"].items()}

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    @property
    def channel_names(self) -> dict[str, str]:
        return self.raw["channel_names"]

    # ---- networks -----------------------------------------------------------------------
    @property
    def size_class(self) -> str:
        return str(self.raw.get("size_class", "paper"))

    @property
    def patch_size(self) -> list[int]:
        return [int(p) for p in self.raw["patch_size"]]

    @property
    def batch_size(self) -> int:
        return int(self.raw["batch_size"])

    @property
    def network(self) -> dict:
        return self.raw["network"]

    @property
    def levels(self) -> list[dict]:
        return self.raw["network"]["levels"]

    @property
    def blocks_per_level(self) -> int:
        return int(self.raw["network"]["blocks_per_level"])

    @property
    def input_channels(self) -> int:
        return int(self.raw["network"]["input_channels"])

    # ---- diffusion ----------------------------------------------------------------------
    @property
    def diffusion(self) -> dict:
        return self.raw["diffusion"]

    @property
    def schedule(self) -> dict:
        d = self.raw["diffusion"]
        return {k: d[k] for k in ("schedule", "num_timesteps", "beta_start", "beta_end")}

    @property
    def feature_timesteps(self) -> list[int]:
        return [int(t) for t in self.raw["diffusion"]["feature_timesteps"]]

    def noise_std(self, timesteps: list[int]) -> list[float]:
        """Noise std sqrt(1 - abar_t) of these timesteps under this plan's schedule (normalised units)."""
        from diffprobe.diffusion import schedule as sch

        abar = sch.alphas_cumprod(**self.schedule)
        return [float(np.sqrt(1.0 - abar[int(t)])) for t in timesteps]

    # ---- training budgets -----------------------------------------------------------------
    @property
    def training(self) -> dict:
        return self.raw["training"]

    def stage(self, name: str) -> dict:
        """Step budget and learning settings of one trained stage: 'bpr', 'diffusion' or 'probe'."""
        return dict(self.raw["training"][name])
