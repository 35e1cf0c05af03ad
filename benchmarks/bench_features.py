"""Probe features: all timesteps in one batched denoiser forward vs one forward per timestep.

Usage:
    python benchmarks/bench_features.py [--presets tiny small] [--repeats 3] [--batch 2] [--threads 2]
        [--dataset 1]   # take the plans of a preprocessed dataset (default: plan a synthetic fingerprint)

For each preset, in one run: the preset's denoiser (random weights: speed does not depend on
them; physical guidance, planned attention) under a ``FeatureExtractor`` with the plans'
feature timesteps and every decoder level, on ``--batch`` patches of the preset's patch size
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

# A phantom-like dataset (3 mm slices, 0.8 mm in-plane): only the target spacing matters here,
# since each preset re-derives its network topology from it for its own patch size.
FINGERPRINT = {"spacings": [[3.0, 0.8, 0.8]] * 4, "shapes_after_crop": [[40, 110, 110]] * 4,
               "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "dataset": "synthetic",
               "median_spacing": [3.0, 0.8, 0.8], "num_cases": 4, "num_labelled": 4}


def load_plans(dataset: str | None) -> dict:
    if dataset is None:
        from diffprobe.planning.planner import plan

        return plan(FINGERPRINT)
    from diffprobe.preprocessing.access import preprocessed_cases

    return preprocessed_cases(dataset)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="patches per call (probe and predictor use 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.models import forward_flops
    from diffprobe.pretraining.presets import resolve_preset
    from diffprobe.pretraining.pretrain import build_denoiser
    from diffprobe.probe.features import FeatureExtractor

    plans = load_plans(args.dataset)
    diffusion = GaussianDiffusion.from_plans(plans)
    timesteps = [int(t) for t in plans["diffusion"]["feature_timesteps"]]
    peak = matmul_peak("cpu", torch.float32)
    rows = []
    for preset in args.presets:
        cfg = resolve_preset(plans, preset)
        torch.manual_seed(0)
        denoiser = build_denoiser(cfg, plans, "physical", "planned").eval()
        extractor = FeatureExtractor(denoiser, diffusion, timesteps)
        b, patch = args.batch, cfg["patch_size"]
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
        flops = forward_flops(denoiser, (b * len(timesteps), 1, *patch))
        med = {mode: statistics.median(ts) for mode, ts in times.items()}
        rows.append((preset, patch, med[True] / b * 1e3, med[False] / b * 1e3, med[False] / med[True],
                     flops / med[True] / 1e9, flops / med[False] / 1e9, diff))

    print(f"\n{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, batch {args.batch} patches x "
          f"{len(timesteps)} timesteps {timesteps}, median of {args.repeats}; fp32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    print(f"{'preset':<7} {'patch (z,y,x)':<14} {'batched ms/patch':>17} {'per-t ms/patch':>15} {'per-t/batched':>14} "
          f"{'batched GFLOP/s':>16} {'per-t GFLOP/s':>14} {'batched of peak':>16} {'max |diff|':>11}")
    for p, patch, ms_b, ms_u, ratio, gf_b, gf_u, diff in rows:
        print(f"{p:<7} {'x'.join(map(str, patch)):<14} {ms_b:>17.1f} {ms_u:>15.1f} {ratio:>14.2f} {gf_b:>16.1f} "
              f"{gf_u:>14.1f} {gf_b * 1e9 / peak:>16.1%} {diff:>11.2e}")


if __name__ == "__main__":
    main()
