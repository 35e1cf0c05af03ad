"""Peak RAM of ``diffprobe predict`` on a large CT, against diffprobe's own documented bound.

Usage:
    python benchmarks/bench_memory.py [--volume ct600] [--step-size 1.0] [--threads 2]
        [--workdir /tmp/diffprobe_bench_predict] [--code OTHER_CHECKOUT ...]
    python benchmarks/bench_memory.py --preprocess-np 1 2 4 [--pp-cases 4] [--pp-fov 400] [--pp-size-class paper]

``--preprocess-np``: instead, ``plan_and_preprocess --clean --size_class paper`` of ``--pp-cases``
large phantoms (fov ``--pp-fov`` mm, ~500 voxels in-plane; ``paper`` resamples to the median
spacing as before size classes; ``cpu`` would coarsen to 1.5 mm in-plane) with each worker count;
peak RAM as summed RSS and as summed PSS (forked workers share the parent's pages; PSS counts them
once). Without multiplication, RAM grows by about one case's working set per extra worker.

Reuses bench_predict.py's set-up (phantom dataset 902, a tiny pretrained model and probe, the
volumes; generated once in the work dir: ct600 = 512x512x600 at 0.8x0.8x1.5 mm takes ~3 min and
~13 GB RAM to generate). Runs ``diffprobe predict -device cpu`` on the volume in a subprocess and
samples the RSS summed over its process tree every 50 ms. ``--code`` runs the same command with
other checkouts first on PYTHONPATH (e.g. a ``git worktree`` of an older commit), side by side in
one run, so a change's effect on RAM is measured, not asserted.

The sliding window's buffers do not depend on the tile step, only on the volume: ``--step-size 1``
(8x fewer tiles than the default 0.5) measures the same peak in minutes instead of an hour on CPU.
The table printed last gives, per code version: seconds, peak RAM, and the bound that
``diffprobe.predict.memory.estimate_predict_bytes`` states for this input (the number predict
checks against the available RAM before it allocates anything).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import run_measured  # noqa: E402
from bench_predict import (  # noqa: E402
    CT_VOLUMES,
    DATASET_ID,
    FOLD,
    add_setup_arguments,
    ensure_models,
    ensure_volume,
    roots_env,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", default="ct600", choices=["phantom", *CT_VOLUMES])
    ap.add_argument("--step-size", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--code", type=Path, nargs="*", default=[], help="other checkouts to measure side by side")
    add_setup_arguments(ap)
    ap.add_argument("--preprocess-np", type=int, nargs="+", default=None)
    ap.add_argument("--pp-cases", type=int, default=4)
    ap.add_argument("--pp-fov", type=float, default=400.0)
    ap.add_argument("--pp-size-class", default="paper", help="planner size class of the --preprocess-np runs")
    args = ap.parse_args()
    if args.preprocess_np:
        preprocess_scaling(args)
        return
    env = roots_env(args.workdir, args.threads)
    config = ensure_models(args, env)["diffprobe"]["configuration"]
    folder, info = ensure_volume(args.volume, args.workdir)

    from diffprobe.predict.memory import estimate_for_input
    from diffprobe.probe.model import probe_dir
    from diffprobe.utils import read_json

    os.environ.update({k: v for k, v in env.items() if k.startswith("DIFFPROBE_")})
    bound = estimate_for_input(next(folder.iterdir()), read_json(probe_dir(DATASET_ID, config, FOLD) / "probe.json"))
    print(f"{args.volume}: {info}; documented bound {bound.total_gb:.2f} GB ({bound.describe()})", flush=True)
    here = Path(__file__).resolve().parents[1]
    rows = []
    for code in [*args.code, here]:
        out = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.workdir))
        run_env = dict(env, PYTHONPATH=f"{code}{os.pathsep}{env.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "diffprobe", "predict", "-i", str(folder), "-o", str(out), "-d", str(DATASET_ID),
               "-f", FOLD, "-device", "cpu", "-step_size", str(args.step_size)]
        print(f"running {code}: {' '.join(cmd)}", flush=True)
        m = run_measured(cmd, env=run_env)
        if m.returncode != 0:
            print(m.output_tail)
        rows.append((str(code), m))
    print(f"\n{args.volume} {info['shape_zyx']} voxels, -step_size {args.step_size}, {args.threads} threads")
    print("| code | exit | seconds | peak RAM GB (summed RSS) | bound GB | peak / bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    for code, m in rows:
        print(f"| {code} | {m.returncode} | {m.seconds:.0f} | {m.peak_rss_gb:.2f} | {bound.total_gb:.2f} "
              f"| {m.peak_rss_gb / bound.total_gb:.2f} |")


def preprocess_scaling(args: argparse.Namespace) -> None:
    """Peak RAM of plan_and_preprocess per worker count, on the same large phantoms."""
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    work = args.workdir / "preprocess_np"
    raw = work / "raw" / "Dataset903_LargePhantoms"
    if not (raw / "dataset.json").is_file():
        print(f"making {args.pp_cases} phantoms at fov {args.pp_fov} mm in {raw}", flush=True)
        make_phantom_dataset(raw, PhantomConfig(num_train_labelled=args.pp_cases, num_train_unlabelled=0,
                                                num_test=0, fov_mm=args.pp_fov))
    env = dict(os.environ, DIFFPROBE_RAW=str(work / "raw"), DIFFPROBE_PREPROCESSED=str(work / "pre"),
               DIFFPROBE_RESULTS=str(work / "results"), OMP_NUM_THREADS="1")
    rows = []
    for n in args.preprocess_np:
        cmd = [sys.executable, "-m", "diffprobe", "plan_and_preprocess", "-d", "903", "-np", str(n), "--clean",
               "--size_class", args.pp_size_class]
        m = run_measured(cmd, env=env, pss=True)
        print(f"-np {n}: {m.seconds:.1f} s, RSS {m.peak_rss_gb:.2f} GB, PSS {m.peak_pss_gb:.2f} GB", flush=True)
        rows.append((n, m))
    one = rows[0][1]
    print(f"\nplan_and_preprocess --clean --size_class {args.pp_size_class}, {args.pp_cases} phantoms at fov "
          f"{args.pp_fov} mm")
    print("| -np | exit | seconds | peak RSS GB (summed) | peak PSS GB (summed) | PSS / first row's | workers ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, m in rows:
        print(f"| {n} | {m.returncode} | {m.seconds:.1f} | {m.peak_rss_gb:.2f} | {m.peak_pss_gb:.2f} | "
              f"{m.peak_pss_gb / one.peak_pss_gb:.2f} | {n / rows[0][0]:.0f} |")


if __name__ == "__main__":
    main()
