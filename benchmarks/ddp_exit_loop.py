"""Run the two-rank gloo resume test's workers N times and count the runs a rank aborted in.

A rank that left its process group to interpreter finalization aborted now and then at exit
("terminate called without an active exception", SIGABRT); ``distributed.shutdown`` (called by the
`diffprobe` console script before it exits, and by the test's workers) frees it first. Too rare for one run to
show (2 of 64 runs before the fix), so it is counted here (docs/distributed.md, "Leaving together"):

    python benchmarks/ddp_exit_loop.py --runs 96
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=64)
    args = ap.parse_args()
    import torch.multiprocessing as mp
    from test_ddp import _free_port, _resume_worker

    failed = 0
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            try:
                mp.spawn(_resume_worker, args=(2, _free_port(), out), nprocs=2, join=True)
            except Exception as e:  # noqa: BLE001  (a rank's abort arrives as ProcessExitedException)
                failed += 1
                print(f"run {i}: {e}", flush=True)
    print(f"{failed} of {args.runs} runs had a rank abort", flush=True)


if __name__ == "__main__":
    main()
