"""DDPM: forward process, ε-prediction loss, DDPM and DDIM samplers (``ddpm``); schedule maths (``schedule``).

``GaussianDiffusion`` is imported lazily: the planner needs only the schedule maths (numpy),
and must not pull in torch and the network layer by importing this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffprobe.diffusion.ddpm import GaussianDiffusion

__all__ = ["GaussianDiffusion"]


def __getattr__(name: str) -> Any:
    if name == "GaussianDiffusion":
        from diffprobe.diffusion.ddpm import GaussianDiffusion

        return GaussianDiffusion
    raise AttributeError(f"module 'diffprobe.diffusion' has no attribute {name!r}")
