"""Keep freed tensor memory in the process: glibc malloc settings for torch's CPU work.

Why: torch allocates every CPU tensor with ``malloc``. With glibc's defaults a block of a few MB
or more is either mapped fresh from the OS (``mmap``) and unmapped when freed, or handed back by
trimming the heap, and the next forward touches new pages again: every page of every activation
is a page fault, zero-filled by the kernel. On the 2-core VM this project is measured on, that was
a third of predict's CPU time: a whole real CT (crlm1004, the ``cpu`` class) took 50-58 s with
37-44 s of it in the kernel (23 M minor faults); with the settings below 33-38 s, under 1.5 s in
the kernel (``benchmarks/bench_allocator.py``, ``docs/performance.md``). The same label maps:
the arithmetic is untouched, only where the bytes live.

The settings (``mallopt``, process-wide, set once):

* ``M_MMAP_MAX = 0``: no block is served by ``mmap``; freed blocks stay in the heap for reuse
  (glibc's ceiling for its mmap threshold is 32 MiB, below a tile batch's full-resolution maps).
* ``M_TRIM_THRESHOLD = 1 GiB``: the heap's free top is handed back only above 1 GiB.
* ``M_TOP_PAD = 256 MiB``: each heap grows, and is kept, with that much room; without it the
  per-thread heaps are unmapped as soon as they empty.

What it costs: up to ~1 GiB of freed memory stays with the process until it is reused (peak RSS of
the crlm1004 predict: 1.0-1.4 GB either way). :func:`release_free_memory` hands it back before the
RAM checks read what the OS has available. ``DIFFPROBE_MALLOC_TUNING=0`` turns the settings off
(for a side-by-side measurement, or under another allocator). Other C libraries: nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

ENV = "DIFFPROBE_MALLOC_TUNING"
# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (``gnu_get_libc_version`` exists), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl, macOS, ...
    except (OSError, AttributeError):
        return None
    return libc


def tuning_wanted() -> bool:
    """False when ``DIFFPROBE_MALLOC_TUNING`` is 0/false/off/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@functools.lru_cache(maxsize=1)
def tune_host_allocator() -> bool:
    """Apply :data:`SETTINGS` once per process; True when glibc took every one of them.

    Called where a stage resolves its compute device (``devices.resolve_device``), before its torch
    work; processes forked from this one (data loaders) inherit the settings."""
    libc = _glibc()
    if libc is None or not tuning_wanted():
        return False
    return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in SETTINGS.items())


def release_free_memory() -> None:
    """Hand the heap's free memory back to the OS (``malloc_trim``), e.g. before reading how much RAM is
    available: memory this process keeps for reuse would otherwise count as used."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
