"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

Only tensors, numbers, strings, lists and dicts are stored: no pickled objects, so a
checkpoint from an untrusted source cannot execute code. RNG states are stored as
tensors / plain lists for the same reason.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.utils import atomic_path

CHECKPOINT_FORMAT = 1


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename)."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    with atomic_path(path, ".pt") as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as e:  # torch's writer reports a full disk / failed write as RuntimeError
            raise DiffprobeError(f"cannot write this checkpoint ({str(e).strip().splitlines()[0][:160]}); "
                                 "its previous version is unchanged", path,
                                 "free disk space (or make the folder writable), then resume with --c") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DiffprobeError("checkpoint does not exist", path, "train first, or check the model name")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file or disallowed (pickled) content
        raise DiffprobeError(f"checkpoint cannot be loaded safely ({type(e).__name__}: {str(e)[:160]})", path,
                             "use a checkpoint written by diffprobe (this one may be truncated)") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DiffprobeError("checkpoint has an unknown format/version", path,
                             "retrain with this diffprobe version")
    return payload


def load_state_checked(module: nn.Module, state: dict[str, Any], path: str | Path, made_by: str) -> None:
    """``module.load_state_dict(state)``, refusing a checkpoint made for another network.

    Why: a checkpoint copied from another dataset, configuration or version loads fine with
    ``weights_only=True`` but its tensors do not fit; PyTorch's RuntimeError lists every
    mismatching key, which says nothing about what to do. ``made_by`` names the command that
    writes a matching checkpoint (e.g. "diffprobe train").
    """
    if not isinstance(state, dict):
        raise DiffprobeError("checkpoint holds no weights (not a state dict)", path,
                             f"use a checkpoint written by `{made_by}`")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise DiffprobeError(f"checkpoint does not fit this network: it was made for another dataset, "
                             f"configuration or diffprobe version ({detail[:200]})", path,
                             f"use the checkpoint of this dataset and configuration, or rerun `{made_by}`") from None
