"""BPR guidance of a whole volume: windows one at a time vs batched, side by side in one run.

Usage:
    python benchmarks/bench_guidance.py [--volume ct256] [--batches 1 8] [--repeats 2] [--threads 2]
        [--workdir /tmp/diffprobe_bench_predict] [--size_class tiny]

Uses bench_predict.py's set-up (Dataset902 and its probe with BPR guidance, planner size class
``--size_class``, default tiny; made when missing) and volume. The volume is read and preprocessed
once exactly as ``predict`` does (``load_case``); then ``predict_coordinates`` (what ``predict``
calls once per volume) is timed for each ``tile_batch``, alternating, ``--repeats`` rounds. Prints
the times, the ratio to the first batch size and the largest difference between the coordinate maps
(float rounding only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import (  # noqa: E402
    CT_VOLUMES,
    DATASET_ID,
    add_setup_arguments,
    ensure_models,
    ensure_volume,
    roots_env,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", default="ct256", choices=["phantom", *CT_VOLUMES])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    add_setup_arguments(ap)
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    env = roots_env(args.workdir, args.threads)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("DIFFPROBE_", "nnUNet_", "OMP_", "MKL_"))})
    models = ensure_models(args, env)
    import torch

    from diffprobe.bpr import predict_coordinates
    from diffprobe.predict.predictor import input_cases, load_case, select_model
    from diffprobe.probe.model import load_trained_probe

    torch.set_num_threads(args.threads)
    probe = load_trained_probe(select_model(DATASET_ID, models["diffprobe"]["configuration"], None)[0])
    inputs, info = ensure_volume(args.volume, args.workdir)
    loaded = load_case([probe], input_cases(inputs, 1)[0])
    times: dict[int, list[float]] = {b: [] for b in args.batches}
    maps = {}
    for _ in range(args.repeats):
        for b in args.batches:
            t0 = time.perf_counter()
            maps[b] = predict_coordinates(probe.bpr, loaded.data, tuple(probe.bpr_crop), tile_batch=b)
            times[b].append(time.perf_counter() - t0)
            print(f"tile_batch {b}: {times[b][-1]:.1f} s", flush=True)
    first = args.batches[0]
    base = statistics.median(times[first])
    print(f"\n{args.volume}: {'x'.join(map(str, info['shape_zyx']))} voxels, preprocessed "
          f"{'x'.join(map(str, loaded.data.shape[1:]))}; BPR window {probe.bpr_crop}; {args.threads} threads; "
          f"median of {args.repeats}")
    print("| tile_batch | seconds | ÷ tile_batch " + str(first) + " | max difference |")
    print("| --- | --- | --- | --- |")
    for b in args.batches:
        diff = (maps[b] - maps[first]).abs().max().item()
        med = statistics.median(times[b])
        print(f"| {b} | {med:.1f} | {med / base:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
