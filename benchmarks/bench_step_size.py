"""The sliding window's tile step against time and labels, on whole real CTs (issue 16: a whole
abdominal CT in <= 120 s on 2 CPU cores).

``predict -step_size`` (nnU-Net's option; default 0.5 of the patch) sets how far apart the tiles
start: the tile count falls with the cube of the step, and every tile of diffprobe costs one
denoiser forward per feature timestep. This script predicts the same whole scans with one trained
probe of ``benchmarks/real_ct.py``'s work folder at each step, times each run, and compares the
labels with those of the default step (voxel agreement over the scan, Dice per organ against the
default's labels). Nobody has these scans' labels: agreement says what the faster step changes, not
whether it is right.

    python benchmarks/bench_step_size.py --work /tmp/realct3 --name realct__fpn --steps 0.5 0.75 1.0

Appends one JSON line per (step, scan) to ``<work>/bench_step_size.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, ORGANS, use_work_roots  # noqa: E402
from real_ct_whole_scans import scan_inputs  # noqa: E402


def agreement(seg: np.ndarray, reference: np.ndarray, labels: dict[str, int]) -> dict:
    """Share of voxels with the same label, and Dice per organ present in either map."""
    out: dict = {"voxels_same": round(float((seg == reference).mean()), 5)}
    for organ in ORGANS:
        a, b = seg == labels[organ], reference == labels[organ]
        total = int(a.sum()) + int(b.sum())
        if total:
            out[organ] = round(2 * float(np.logical_and(a, b).sum()) / total, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--name", required=True, help="trained probe configuration (e.g. realct__fpn)")
    ap.add_argument("--steps", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                    help="tile steps to compare; the first is the reference")
    ap.add_argument("--scans", nargs="*", default=["crlm1004", "crlm1006"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    use_work_roots(work)
    import SimpleITK as sitk

    from diffprobe.predict.predictor import predict

    labels, inputs = scan_inputs(work, "step_size", args.scans)
    reference: dict[str, np.ndarray] = {}
    rows = []
    for step in args.steps:
        for scan in args.scans:  # one scan per call: seconds per case, not per folder
            single = work / "step_size" / "one"
            shutil.rmtree(single, ignore_errors=True)
            single.mkdir(parents=True)
            os.symlink(inputs / f"{scan}_0000.nii.gz", single / f"{scan}_0000.nii.gz")
            out = work / "step_size" / f"{args.name}_step{step:g}"
            started = time.perf_counter()
            predict(single, out, DATASET, args.name, ["all"], "cpu", step_size=step, show_progress=False)
            seconds = round(time.perf_counter() - started, 1)
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{scan}.nii.gz")))
            reference.setdefault(scan, seg)
            row = {"name": args.name, "scan": scan, "step_size": step, "seconds": seconds,
                   "load_average": round(os.getloadavg()[0], 2), "threads": args.threads,
                   "agreement_with_first_step": agreement(seg, reference[scan], labels)}
            rows.append(row)
            with open(work / "bench_step_size.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\n{'scan':10s} {'step':>5s} {'s':>7s} {'same voxels':>12s}  Dice vs step {args.steps[0]:g} per organ")
    for r in rows:
        agree = dict(r["agreement_with_first_step"])
        same = agree.pop("voxels_same")
        organs = " ".join(f"{k[:6]} {v:.3f}" for k, v in agree.items())
        print(f"{r['scan']:10s} {r['step_size']:5.2f} {r['seconds']:7.1f} {same:12.5f}  {organs}")


if __name__ == "__main__":
    main()
