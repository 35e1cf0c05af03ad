"""DDPM noise schedules and noise-level-based timestep planning.

Convention: timesteps are 0-indexed, ``alphas_cumprod[t] = prod_{i<=t} (1 - beta_i)``,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. The *noise std* of timestep t is
``sqrt(1 - abar_t)``, in units of the normalised intensity.

Why timesteps are planned: what the frozen denoiser "sees" at t depends on how much
noise t adds relative to the image's intensity scale, not on t itself. The paper's
t = 10, 30, 60 (linear schedule, beta 1e-4 -> 0.02, T = 1000, CT window [-1350, 1000]
HU -> [-1, 1]) add noise std 0.047, 0.111, 0.204, i.e. about 55, 130 and 240 HU. diffprobe
stores those target levels and picks, for the planned schedule and normalisation, the
timesteps whose noise std is closest, so changing either keeps the features' noise levels.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")
REFERENCE_SCHEDULE = {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
REFERENCE_TIMESTEPS = (10, 30, 60)  # the paper's feature timesteps under REFERENCE_SCHEDULE
# Intensity units per normalised unit for the reference normalisation: CT window
# [-1350, 1000] HU mapped to [-1, 1] -> 1175 HU per unit.
REFERENCE_HU_PER_UNIT = 1175.0


def betas(schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
          beta_end: float = 0.02, cosine_s: float = 0.008) -> np.ndarray:
    """Per-step betas (float64) of a linear or cosine (Nichol & Dhariwal 2021) schedule."""
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        return np.clip(1 - abar[1:] / abar[:-1], 0.0, 0.999)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def alphas_cumprod(**schedule: float | str | int) -> np.ndarray:
    return np.cumprod(1.0 - betas(**schedule))  # type: ignore[arg-type]


def noise_std(abar: np.ndarray, t: int | np.ndarray) -> np.ndarray | float:
    """Std of the noise added at timestep ``t``: sqrt(1 - abar_t)."""
    return np.sqrt(1.0 - abar[t])


def reference_noise_levels() -> list[float]:
    """Noise stds of the paper's timesteps under the reference schedule (normalised units)."""
    abar = alphas_cumprod(**REFERENCE_SCHEDULE)
    return [float(noise_std(abar, t)) for t in REFERENCE_TIMESTEPS]


def timesteps_for_noise(levels: list[float], abar: np.ndarray) -> list[int]:
    """For each target noise std, the timestep whose noise std is closest."""
    stds = np.sqrt(1.0 - abar)
    return [int(np.argmin(np.abs(stds - level))) for level in levels]


def schedule_dict(schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> dict:
    return {"schedule": schedule, "num_timesteps": num_timesteps, "beta_start": beta_start, "beta_end": beta_end}
