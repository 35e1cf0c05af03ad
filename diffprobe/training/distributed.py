"""torchrun / DDP helpers. Without torchrun everything degrades to a single process.

``torchrun --nproc_per_node N diffprobe pretrain ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
NCCL is used on GPUs, gloo on CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_process_value(value):
    """Rank 0's ``value`` on every rank, so that all ranks take the same branch around a collective
    (e.g. a save with a barrier decided from a file only rank 0 reads)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_env(device: str) -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
