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
        torch.save(payload, tmp)


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
