"""Whether one set of plans can serve another: datasets pretrained together, a dataset probed
with a model pretrained on other plans.

Why it matters: a denoiser has learnt one spacing, one intensity normalisation and one noise
schedule. Features read at another spacing or window are out of distribution, silently; a
timestep means a different noise level under another schedule. So spacing, normalisation and
channels must match (else refuse, naming both), and timesteps are mapped by noise level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.diffusion import schedule as sch
from diffprobe.errors import DiffprobeError

SCHEDULE_KEYS = ("schedule", "num_timesteps", "beta_start", "beta_end")


def _normalization(plans: dict) -> dict:
    return {c: {k: v for k, v in n.items() if k != "why"} for c, n in plans["preprocessing"]["normalization"].items()}


def data_differences(a: dict, b: dict) -> list[str]:
    """What differs between two plans in what the network sees (spacing, normalisation, channels)."""
    diffs = []
    sa, sb = a["preprocessing"]["target_spacing"], b["preprocessing"]["target_spacing"]
    if not np.allclose(sa, sb, rtol=1e-4, atol=1e-6):
        diffs.append(f"spacing {sa} vs {sb}")
    if _normalization(a) != _normalization(b):
        diffs.append(f"normalisation {_normalization(a)} vs {_normalization(b)}")
    if len(a["channel_names"]) != len(b["channel_names"]):
        diffs.append(f"channels {a['channel_names']} vs {b['channel_names']}")
    return diffs


def same_schedule(a: dict, b: dict) -> bool:
    return all(a["diffusion"][k] == b["diffusion"][k] for k in SCHEDULE_KEYS)


def model_timesteps(dataset_plans: dict, model_plans: dict, timesteps: list[int], model_name: str,
                    plans_path: Path | None = None) -> list[int]:
    """The dataset's feature timesteps expressed in the pretrained model's schedule.

    Same schedule: unchanged. Another schedule: each timestep is replaced by the model's
    timestep with the closest noise std, so the denoiser sees the noise level the dataset
    planned (never ``t`` of one schedule fed to another). Refuses when spacing, normalisation
    or channels differ: no timestep mapping makes those features right.
    """
    diffs = data_differences(dataset_plans, model_plans)
    if diffs:
        raise DiffprobeError(f"the dataset's plans do not match the pretrained model '{model_name}': "
                             + "; ".join(diffs), plans_path,
                             "re-plan the dataset like the model (e.g. --target_spacing / --override "
                             "preprocessing.normalization...), or pretrain a model on this dataset")
    if same_schedule(dataset_plans, model_plans):
        return [int(t) for t in timesteps]
    steps = int(dataset_plans["diffusion"]["num_timesteps"])
    bad = [int(t) for t in timesteps if not 0 <= int(t) < steps]
    if bad:  # they are read in the dataset's schedule before mapping (an index error otherwise)
        raise DiffprobeError(f"timestep(s) {' '.join(map(str, bad))} outside the dataset's diffusion schedule, 0 to "
                             f"{steps - 1}, from which they are mapped to the model '{model_name}' by noise level",
                             plans_path, f"choose --t between 0 and {steps - 1}")
    abar_d = sch.alphas_cumprod(**{k: dataset_plans["diffusion"][k] for k in SCHEDULE_KEYS})
    abar_m = sch.alphas_cumprod(**{k: model_plans["diffusion"][k] for k in SCHEDULE_KEYS})
    levels = [float(sch.noise_std(abar_d, int(t))) for t in timesteps]
    return sch.timesteps_for_noise(levels, abar_m)
