"""bench_scaling's shared pieces: constants, slopes, data roots, process-tree memory, measured workers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

PREDICT_DATASET = 920
SCALING_DATASET_BASE = 930  # + index of the count
PREPROCESS_DATASET = 921
SPACING_ZYX = (1.5, 0.8, 0.8)
VOLUME_SHAPE = (24, 48, 48)
STARTUP_PATCH = [16, 32, 32]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Log-log slope (exponent of y ~ x^k) by least squares; None with fewer than 2 usable points."""
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def roots_env(work: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({f"DIFFPROBE_{k.upper()}": str(work / "roots" / k) for k in ("raw", "preprocessed", "results")})
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def tree_memory() -> dict[str, float]:
    """RSS and PSS (GB) summed over this process and its children (the loader workers)."""
    import contextlib

    import psutil

    root = psutil.Process()
    rss = pss = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
    return {"rss_gb": rss / 1024**3, "pss_gb": pss / 1024**3}


def run_worker(args_list: list[str], env: dict[str, str], timeout_s: float) -> dict:
    """bench_scaling.py as a worker subprocess (measured); its last stdout line is its JSON result."""
    from _measure import run_measured

    cmd = ["timeout", "--kill-after=10", str(int(timeout_s)), sys.executable,
           str(Path(__file__).resolve().with_name("bench_scaling.py")),
           *args_list]
    m = run_measured(cmd, env, poll_s=0.1, pss=True)
    out: dict[str, Any] = {"wall_s": round(m.seconds, 2), "peak_rss_gb": round(m.peak_rss_gb, 3),
                           "peak_pss_gb": round(m.peak_pss_gb, 3), "returncode": m.returncode}
    if m.returncode != 0:
        out["error"] = m.output_tail[-1500:]
        return out
    last = [line for line in m.output_tail.splitlines() if line.startswith("{")]
    out.update(json.loads(last[-1]) if last else {"error": "no result line"})
    return out

