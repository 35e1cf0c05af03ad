"""nnU-Net's resample_data_or_seg_to_shape vs diffprobe's slice-by-slice equivalent: seconds and peak RAM.

Usage:
    python benchmarks/bench_resampling.py [--shape 600 512 512] [--spacing 1.5 0.8 0.8] [--target 3.12 0.8 0.8]

The two resamplings a CT prediction does, on a synthetic volume of ``--shape`` (z, y, x):
    image    the raw float32 CT -> the planned grid (order 3 in-plane, nearest along z)
    labels   the uint8 label map on the planned grid -> back to the raw grid (order 1 one-hot in-plane)
Each (operation, implementation) runs in its own subprocess; peak RAM is the process's VmHWM
(reset just before the call) minus its RSS then (so the input array and imports are not
counted), i.e. what the resampling itself allocates, its output included. Both implementations
are also checked to give identical arrays (a hash of the output is printed per run). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WORKER = r"""
import hashlib, json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
from diffprobe.preprocessing.resampling import resample_to_shape

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

raw, spacing, target = args["shape"], args["spacing"], args["target"]
grid = [int(v) for v in compute_new_shape(raw, spacing, target)]
rng = np.random.default_rng(0)
if args["op"] == "image":
    data = rng.normal(0, 200, size=(1, *raw)).astype(np.float32)
    src, dst, new_shape, is_seg, order = spacing, target, grid, False, 3
else:
    data = rng.integers(0, 7, size=(1, *grid)).astype(np.uint8)
    src, dst, new_shape, is_seg, order = target, spacing, raw, True, 1
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the input's float64 temporaries do not count
base = rss("VmRSS:")
t0 = time.perf_counter()
if args["impl"] == "nnU-Net":
    out = resample_data_or_seg_to_shape(data, new_shape, src, dst, is_seg=is_seg, order=order, order_z=0,
                                        force_separate_z=None, separate_z_anisotropy_threshold=3.0)
else:
    out = resample_to_shape(data, new_shape, src, dst, is_seg, order, 0, 3.0)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "extra_gb": (rss("VmHWM:") - base) / 1e9, "out_gb": out.nbytes / 1e9,
                  "shape": list(out.shape), "md5": hashlib.md5(out.tobytes()).hexdigest()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[600, 512, 512])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.5, 0.8, 0.8])
    ap.add_argument("--target", type=float, nargs=3, default=[3.12, 0.8, 0.8])
    ap.add_argument("--ops", nargs="+", default=["labels", "image"], choices=["labels", "image"])
    args = ap.parse_args()
    rows = []
    for op in args.ops:
        for impl in ("nnU-Net", "diffprobe"):
            payload = json.dumps({"op": op, "impl": impl, "shape": args.shape, "spacing": args.spacing,
                                  "target": args.target})
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", WORKER, payload], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{op} {impl} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{op} {impl}: {r} (process {time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append((op, impl, r))
    print(f"\nvolume {args.shape} at {args.spacing} mm, planned grid at {args.target} mm")
    print("| resampling | implementation | seconds | extra RAM GB | output GB | time / nnU-Net | RAM / nnU-Net "
          "| same output |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ref = {op: r for op, impl, r in rows if impl == "nnU-Net"}
    for op, impl, r in rows:
        b = ref[op]
        print(f"| {op} | {impl} | {r['seconds']:.1f} | {r['extra_gb']:.2f} | {r['out_gb']:.2f} | "
              f"{r['seconds'] / b['seconds']:.2f} | {r['extra_gb'] / b['extra_gb']:.2f} | {r['md5'] == b['md5']} |")


if __name__ == "__main__":
    main()
