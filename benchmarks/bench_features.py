"""Probe features: all timesteps in one batched denoiser forward vs one forward per timestep.

Usage:
    python benchmarks/bench_features.py [--size_classes tiny small] [--repeats 3] [--batch 2] [--threads 2]
        [--dataset 1]   # re-plan a preprocessed dataset (default: plan a synthetic CT fingerprint)

For each planner size class, in one run: the planned denoiser (``build_denoiser`` of the plans;
random weights: speed does not depend on them; physical guidance, planned attention) under a
``FeatureExtractor`` with the plans' feature timesteps and every decoder level, on ``--batch``
patches of the planned patch size
(the probe's and the predictor's batch is 2). Timed, alternating, after one warm-up each:
``batched=True`` (one forward of batch B*T) and ``batched=False`` (T forwards of batch B).
Prints ms per patch for both, their ratio, the largest difference between the two outputs
(they must agree), and the achieved GFLOP/s of the denoiser forwards (``forward_flops`` at
batch B*T, the same total for both modes) against the fp32 matmul peak measured in the same
run (``bench_pretrain.matmul_peak``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_pretrain import matmul_peak  # noqa: E402

# An abdominal-CT-like dataset (3 mm slices, 0.8 mm in-plane, 100x400x400 voxels after crop): large
# enough that no size class's patch aim is capped by the median shape, so each class plans its aim
# (tiny 16x48x48, cpu 24x64x64 at its 3x1.5x1.5 mm floor, small 32x64x64, paper 32x128x128).
FINGERPRINT = {"spacings": [[3.0, 0.8, 0.8]] * 4, "shapes_after_crop": [[100, 400, 400]] * 4,
               "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "dataset": "synthetic",
               "median_spacing": [3.0, 0.8, 0.8], "num_cases": 4, "num_labelled": 4}


def load_plans(dataset: str | None, size_class: str = "tiny") -> dict:
    """Plans of a size class: planned from the synthetic fingerprint, or, with ``dataset``, re-planned
    from that preprocessed dataset's fingerprint with only the size class changed (what
    ``diffprobe plan_and_preprocess -d DATASET --size_class SIZE_CLASS`` would write)."""
    if dataset is None:
        from diffprobe.planning.planner import plan

        return plan(FINGERPRINT, size_class=size_class)
    from diffprobe import paths
    from diffprobe.planning.replan import replan
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.utils import read_json
    from diffprobe.workflows.plan_and_preprocess import FINGERPRINT_FILENAME

    plans = preprocessed_cases(dataset)[1]
    fingerprint = read_json(paths.preprocessed_dir(dataset) / FINGERPRINT_FILENAME)
    return replan(fingerprint, plans, {"size_class": size_class})


def add_size_classes_argument(ap, default: list[str]) -> None:
    """``--size_classes`` (old name ``--presets`` kept as an alias): planner size classes to compare."""
    from diffprobe.planning.size_classes import SIZE_CLASSES

    ap.add_argument("--size_classes", "--size-classes", "--presets", dest="size_classes", nargs="+",
                    choices=list(SIZE_CLASSES), default=default, help="planner size classes (default: %(default)s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_classes_argument(ap, ["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="patches per call (probe and predictor use 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.models import forward_flops
    from diffprobe.planning.view import Plans
    from diffprobe.pretraining.pretrained_model import build_denoiser
    from diffprobe.probe.features import FeatureExtractor

    all_plans = {sc: Plans(load_plans(args.dataset, sc)) for sc in args.size_classes}
    timesteps = next(iter(all_plans.values())).feature_timesteps  # the diffusion plan does not follow the class
    peak = matmul_peak("cpu", torch.float32)
    rows = []
    for size_class, plans in all_plans.items():
        diffusion = GaussianDiffusion.from_plans(plans.raw)
        torch.manual_seed(0)
        denoiser = build_denoiser(plans, "physical", "planned").eval()
        extractor = FeatureExtractor(denoiser, diffusion, plans.feature_timesteps)
        b, patch = args.batch, plans.patch_size
        gen = torch.Generator().manual_seed(0)
        x0 = torch.rand((b, 1, *patch), generator=gen) * 2 - 1
        guidance = torch.rand((b, 3, *patch), generator=gen) * 2 - 1
        seeds = list(range(b))

        def run(batched: bool, extractor=extractor, x0=x0, guidance=guidance, seeds=seeds) -> dict:
            with torch.no_grad():
                return extractor(x0, guidance, seeds, batched=batched)

        outs = {mode: run(mode) for mode in (True, False)}  # warm-up, and the outputs to compare
        diff = max((outs[True][k] - outs[False][k]).abs().max().item() for k in outs[True])
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for mode in (True, False):
                t0 = time.perf_counter()
                run(mode)
                times[mode].append(time.perf_counter() - t0)
        flops = forward_flops(denoiser, (b * len(plans.feature_timesteps), 1, *patch))
        med = {mode: statistics.median(ts) for mode, ts in times.items()}
        rows.append((size_class, patch, med[True] / b * 1e3, med[False] / b * 1e3, med[False] / med[True],
                     flops / med[True] / 1e9, flops / med[False] / 1e9, diff))

    print(f"\n{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, batch {args.batch} patches x "
          f"{len(timesteps)} timesteps {timesteps}, median of {args.repeats}; fp32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    print(f"{'size class':<10} {'patch (z,y,x)':<14} {'batched ms/patch':>17} {'per-t ms/patch':>15} "
          f"{'per-t/batched':>14} {'batched GFLOP/s':>16} {'per-t GFLOP/s':>14} {'batched of peak':>16} "
          f"{'max |diff|':>11}")
    for p, patch, ms_b, ms_u, ratio, gf_b, gf_u, diff in rows:
        print(f"{p:<10} {'x'.join(map(str, patch)):<14} {ms_b:>17.1f} {ms_u:>15.1f} {ratio:>14.2f} {gf_b:>16.1f} "
              f"{gf_u:>14.1f} {gf_b * 1e9 / peak:>16.1%} {diff:>11.2e}")


if __name__ == "__main__":
    main()
