"""diffprobe plan_and_preprocess vs nnUNetv2_plan_and_preprocess, side by side on the same dataset.

Usage:
    python benchmarks/bench_preprocess.py [--cases 8] [--fov_mm 110] [-np 2] [--workdir /tmp/bench_pre]
        [--size_class paper]

Generates a labelled phantom dataset (nnU-Net needs a label for every training case), then
runs both tools from scratch on it in subprocesses, alternating, and prints cases/min and
peak RAM (RSS summed over all worker processes) with the ratios. Both use 3d_fullres-style
planning at the median spacing and their default resampling (diffprobe with planner size class
``--size_class``, default ``paper``; the ``cpu`` class, the CPU default, would coarsen the spacing
to 1.5 mm in-plane and so do less work than nnU-Net).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import run_measured  # noqa: E402

from diffprobe.phantoms import PhantomConfig, make_phantom_dataset  # noqa: E402

DATASET_ID = 901


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--fov_mm", type=float, default=110.0)
    ap.add_argument("-np", type=int, default=2, dest="num_processes")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_bench_preprocess"))
    ap.add_argument("--size_class", default="paper", help="diffprobe planner size class (default paper)")
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    raw = work / "raw"
    ds = raw / f"Dataset{DATASET_ID}_BenchPhantoms"
    make_phantom_dataset(ds, PhantomConfig(num_train_labelled=args.cases, num_train_unlabelled=0, num_test=0,
                                           fov_mm=args.fov_mm))
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(raw), "DIFFPROBE_RAW": str(raw),
                "nnUNet_preprocessed": str(work / "nnunet_pre"), "DIFFPROBE_PREPROCESSED": str(work / "dp_pre"),
                "nnUNet_results": str(work / "results"), "DIFFPROBE_RESULTS": str(work / "results"),
                "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": str(args.num_processes)})
    np_ = str(args.num_processes)
    commands = {
        "diffprobe": ["diffprobe", "plan_and_preprocess", "-d", str(DATASET_ID), "-np", np_, "--clean",
                      "--size_class", args.size_class],
        "nnU-Net": ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", np_,
                    "-npfp", np_, "--clean"],
    }
    results: dict[str, list] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            m = run_measured(cmd, env)
            if m.returncode != 0:
                sys.exit(f"{name} failed:\n{m.output_tail}")
            results[name].append(m)
    print(f"\n{args.cases} phantom cases, fov {args.fov_mm} mm, -np {args.num_processes}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'tool':<10} {'seconds':>8} {'cases/min':>10} {'peak RAM GB':>12}")
    best = {}
    for name, ms in results.items():
        t = min(m.seconds for m in ms)
        ram = max(m.peak_rss_gb for m in ms)
        best[name] = (t, ram)
        print(f"{name:<10} {t:8.1f} {args.cases / t * 60:10.1f} {ram:12.2f}")
    (t_dp, r_dp), (t_nn, r_nn) = best["diffprobe"], best["nnU-Net"]
    print(f"throughput ratio diffprobe/nnU-Net: {t_nn / t_dp:.2f}x   peak RAM ratio: {r_dp / r_nn:.2f}x")


if __name__ == "__main__":
    main()
