"""Run a command and record wall time and peak RSS summed over its whole process tree."""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measurement:
    seconds: float
    peak_rss_gb: float
    returncode: int
    output_tail: str
    peak_pss_gb: float = float("nan")  # proportional set size: pages shared by forked workers counted once


def run_measured(cmd: list[str], env: dict | None = None, poll_s: float = 0.05, pss: bool = False) -> Measurement:
    """Start ``cmd``; poll the RSS of it and all descendants; return time and summed peak.

    ``pss``: also the summed proportional set size (Linux smaps; slower to poll), which counts
    pages that forked workers share with their parent once instead of once per process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = peak_pss = 0
    while proc.poll() is None:
        total = total_pss = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                if pss:
                    info = p.memory_full_info()
                    total += info.rss
                    total_pss += info.pss
                else:
                    total += p.memory_info().rss
        peak, peak_pss = max(peak, total), max(peak_pss, total_pss)
        time.sleep(poll_s)
    out, _ = proc.communicate()
    return Measurement(time.perf_counter() - start, peak / 1024**3, proc.returncode, (out or "")[-2000:],
                       peak_pss / 1024**3 if pss else float("nan"))
