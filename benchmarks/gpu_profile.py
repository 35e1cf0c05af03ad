"""Where a training step's time goes: the GPU suite's ``profile`` section (``gpu_suite.py``).

The first GPU day (H200, docs/performance.md) measured the paper denoiser's step at 2.4 % of the bf16
peak, and the `tiny` and `cpu` classes' steps at the same 60 ms: a fixed cost per step rather than
arithmetic. What a profile must answer, in one run of a few seconds:

- **GPU busy share**: the summed time of the device kernels over the wall time of the profiled steps.
  Low: the GPU waits for the CPU (launch overhead, Python, synchronisations, the loader) -> fewer,
  larger kernels (CUDA graphs, ``torch.compile``), fewer synchronisations. High: the kernels themselves
  are slow -> which ones (below).
- **Top device kernels** by their own time, and **top CPU-side operators** by their own time, with call
  counts (a few thousand launches of microsecond kernels per step is the launch-bound signature).

Without CUDA (the dry run) only the CPU side is profiled; the busy share is then not defined.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

TOP = 15


def _row(event: Any, device_attr: str | None) -> dict[str, Any]:
    row = {"name": event.key[:120], "calls": int(event.count),
           "self_cpu_ms": round(event.self_cpu_time_total / 1e3, 3)}
    if device_attr:
        row["self_device_ms"] = round(getattr(event, device_attr) / 1e3, 3)
    return row


def profile_step(step: Callable[[], None], device: str, steps: int = 5) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step`` (after one warm-up call); per-step figures and top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_attr = None
    if cuda:  # the attribute's name changed across torch versions
        sample = events[0] if len(events) else None
        device_attr = next((a for a in ("self_device_time_total", "self_cuda_time_total")
                            if sample is not None and hasattr(sample, a)), None)
    out: dict[str, Any] = {"steps": steps, "wall_ms_per_step": round(wall / steps * 1e3, 3),
                           "cpu_ops_per_step": round(sum(e.count for e in events) / steps, 1)}
    if device_attr:
        kernel_us = sum(getattr(e, device_attr) for e in events)
        out["device_busy_ms_per_step"] = round(kernel_us / 1e3 / steps, 3)
        out["device_busy_share"] = round(kernel_us / 1e6 / wall, 4)
        by_device = sorted(events, key=lambda e: getattr(e, device_attr), reverse=True)
        out["top_device"] = [_row(e, device_attr) for e in by_device[:TOP] if getattr(e, device_attr) > 0]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    out["top_cpu"] = [_row(e, device_attr) for e in by_cpu[:TOP]]
    return out


def print_profile(out: dict[str, Any]) -> None:
    share = out.get("device_busy_share")
    print(f"  {out['wall_ms_per_step']:.1f} ms per step, {out['cpu_ops_per_step']:.0f} profiled ops per step"
          + (f", device busy {out['device_busy_ms_per_step']:.1f} ms ({share:.0%})" if share is not None else ""),
          flush=True)
    for title, key, col in (("device kernels", "top_device", "self_device_ms"), ("CPU operators", "top_cpu",
                                                                                  "self_cpu_ms")):
        rows = out.get(key) or []
        if rows:
            print(f"  top {title} (ms over {out['steps']} steps, calls):", flush=True)
            for r in rows[:8]:
                print(f"    {r[col]:9.2f}  {r['calls']:6d}  {r['name']}", flush=True)
