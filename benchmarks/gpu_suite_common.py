"""The GPU suite's shared pieces: constants, timing helpers and the section runner (``gpu_suite.py``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

DATASET_ID = 990
PRETRAINED = "gpu_suite"
PREDICT_GOAL_S = 10.0
PEAK_GOAL = 0.30
# What each section needs at least on a GPU (seconds), to decide whether it still fits the budget.
SECTION_COST_S = {"agreement": 40, "peak": 10, "pretrain": 30, "profile": 20, "compile": 120, "predict": 60,
                  "ddp": 60}
CT_FINGERPRINT = {  # an abdominal CT: no size class's patch aim is capped by the median shape
    "spacings": [[1.5, 0.8, 0.8]] * 4, "shapes_after_crop": [[300, 400, 400]] * 4, "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1}, "dataset": "synthetic", "median_spacing": [1.5, 0.8, 0.8],
    "num_cases": 4, "num_labelled": 4}


# ---- small helpers -----------------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for queued CUDA kernels: a wall time without it measures the launch, not the work."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Seconds per call after one warm-up call (cuDNN autotuning, lazy allocations, compilation)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def machine_load() -> list[float]:
    """1/5/15-minute load averages: the 2-core development VM is shared, its figures must say so."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def diff_stats(ref, other) -> dict[str, float]:
    """Max |a-b|, max |a| and their ratio of two tensors (compared in float32 on the CPU)."""
    a, b = ref.detach().float().cpu(), other.detach().float().cpu()
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    return {"max_abs_diff": diff, "max_abs_ref": scale, "relative": diff / scale if scale else diff}


class Suite:
    """Runs sections against a time budget and keeps the report (rewritten to JSON after each section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sections": {},
                                       "load_before": machine_load()}
        self.failed = False

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[], dict], cost_s: float | None = None) -> dict | None:
        """Run one section unless skipped or out of budget; a failure is recorded, the suite goes on."""
        if name in self.args.skip:
            self.report["sections"][name] = {"skipped": "--skip"}
            print(f"[{name}] skipped (--skip)", flush=True)
            return None
        need = 0.0 if self.args.dry_run else (cost_s if cost_s is not None else SECTION_COST_S.get(name, 30))
        if self.left_s() < need:
            msg = f"not enough budget left ({self.left_s():.0f} s < {need:.0f} s)"
            self.report["sections"][name] = {"skipped": msg}
            print(f"[{name}] skipped: {msg}", flush=True)
            return None
        print(f"[{name}] ... ({self.left_s():.0f} s of budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' figures
            self.failed = True
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{name}] FAILED: {out['error']}\n{out['traceback']}", file=sys.stderr, flush=True)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["sections"][name] = out
        self.write()
        print(f"[{name}] done in {out['seconds']:.1f} s", flush=True)
        return out

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        self.args.json.write_text(json.dumps(self.report, indent=2, default=str))


# ---- set-up: dataset, model, volume -------------------------------------------------------------
def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


