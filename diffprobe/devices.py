"""Device resolution shared by every stage (``-device auto|cpu|cuda|cuda:N``), and CUDA graph capture."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.host_allocator import tune_host_allocator


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when there is a GPU, else cpu; a CUDA request without a GPU is a user error.

    Every stage resolves its device before its torch work, so this is also where the host's memory
    allocator is set up for it, once per process (:func:`diffprobe.host_allocator.tune_host_allocator`:
    page faults were a third of a CPU predict's time)."""
    tune_host_allocator()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffprobeError("CUDA was requested but no GPU is available", fix="use -device cpu")
    return device


# nnU-Net's default number of data-augmentation processes per GPU (nnUNet_n_proc_DA)
GPU_LOADER_WORKERS = 12
WORKERS_ENV = "DIFFPROBE_N_PROC_DA"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask on Linux, e.g. inside a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(planned: int, device: str | torch.device) -> int:
    """Data-loading processes of a training run on ``device``.

    On a CPU the plans' number (the loaders share the cores with torch's threads; compute-budget
    planning times exactly that). On a GPU the cores are otherwise idle, and one loader process cannot
    keep up: measured on an H200, one process took 160-365 ms per batch for a 60 ms step, and the
    budget planner chose the smallest network because of it. So a GPU run uses at least
    ``GPU_LOADER_WORKERS`` (nnU-Net's default), at most one core per process less than it has (cores
    shared by the ``LOCAL_WORLD_SIZE`` processes of a DDP run). ``DIFFPROBE_N_PROC_DA`` sets the number
    outright, as ``nnUNet_n_proc_DA`` does for nnU-Net; ``pretrain --num_workers`` overrides both.
    """
    if os.environ.get(WORKERS_ENV):
        try:
            return max(0, int(os.environ[WORKERS_ENV]))
        except ValueError:
            raise DiffprobeError(f"{WORKERS_ENV}={os.environ[WORKERS_ENV]!r} is not a number of processes",
                                 fix=f"set {WORKERS_ENV} to an integer, e.g. 8, or unset it") from None
    if torch.device(device).type != "cuda":
        return int(planned)
    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(int(planned), min(GPU_LOADER_WORKERS, per_process - 1))


def capture_cuda_graph(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int,
                       pool: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn()`` recorded as one CUDA graph on ``device``: (graph, the static output ``graph.replay()`` rewrites).

    ``warmup`` eager calls on a side stream come first (cuDNN/cuBLAS workspaces, lazy initialisation: what a
    capture may not do); ``pool``: another graph's memory pool to share. The capture is thread-local: another
    thread's CUDA work (predict's read-ahead and export, a progress bar) does not void it. Used by predict's
    tile graphs (``predict.cuda_graphs``) and the trainer's graphed step (``training.graphed_step``)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
    return graph, out
