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


def run_measured(cmd: list[str], env: dict | None = None, poll_s: float = 0.05) -> Measurement:
    """Start ``cmd``; poll the RSS of it and all descendants; return time and summed peak."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        peak = max(peak, total)
        time.sleep(poll_s)
    out, _ = proc.communicate()
    return Measurement(time.perf_counter() - start, peak / 1024**3, proc.returncode, (out or "")[-2000:])
