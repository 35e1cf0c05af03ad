"""Device resolution shared by every stage (``-device auto|cpu|cuda|cuda:N``)."""

from __future__ import annotations

import torch

from diffprobe.errors import DiffprobeError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffprobeError("CUDA was requested but no GPU is available", fix="use -device cpu")
    return device
