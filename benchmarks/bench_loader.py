"""Data loading per pretraining batch, per size class: what one loader process costs per step.

    python benchmarks/bench_loader.py [--size_classes tiny cpu small paper] [--repeats 3]

Uses compute-budget planning's own loader timing (``step_timing.time_loaders``: the stages' batch
classes on a synthetic case of the planned shape, median of several batches) on plans made for an
abdominal-CT fingerprint, one process, no torch threads involved. Compare commits by running it at each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite_common import CT_FINGERPRINT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size_classes", nargs="+", default=["tiny", "cpu", "small", "paper"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from diffprobe.planning.planner import plan
    from diffprobe.workflows.step_timing import time_loaders

    print(f"{'class':8s} {'patch':>14s} {'batch':>5s} {'diffusion ms/batch':>19s} {'bpr ms/batch':>13s}")
    for name in args.size_classes:
        plans = plan(CT_FINGERPRINT, size_class=name)
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(time_loaders(plans, Path(tmp)))
        diff = statistics.median(r["diffusion"] for r in runs) * 1e3
        bpr = statistics.median(r["bpr"] for r in runs) * 1e3
        print(f"{name:8s} {'x'.join(map(str, plans['patch_size'])):>14s} {plans['batch_size']:5d} {diff:19.1f} "
              f"{bpr:13.1f}", flush=True)


if __name__ == "__main__":
    main()
