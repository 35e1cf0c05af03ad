"""Pretraining throughput per planner size class: training step alone, data loader alone, peak memory, FLOP/s.

Usage:
    python benchmarks/bench_pretrain.py [--size_classes tiny paper] [--steps 5] [--device cpu]
        [--formats contiguous channels_last]   # memory formats of the step, side by side
        [--dataset 1]   # a preprocessed dataset (default: generate small phantoms in a temp root)

For each size class, in one run, with the plans that ``plan_and_preprocess --size_class`` would
write for the dataset (re-planned from its fingerprint, only the size class changed; the patch is
capped by the dataset's median shape, so small phantoms get a smaller ``paper`` patch than
32x128x128; the cases stay as preprocessed): (1) patches/s of the diffusion training step on a
batch held in memory (forward + backward + AdamW) of the planned denoiser, (2) patches/s of the
data loader alone with the plans' worker count, (3) peak RSS of this process (CPU) or peak CUDA
memory, (4) achieved FLOP/s of the step (3x the forward FLOPs) against the measured matmul peak of
the same dtype.
The loader must be faster than the step (ratio > 1), or it is the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def ensure_dataset(spec: str | None) -> str:
    if spec:
        return spec
    base = Path(tempfile.mkdtemp(prefix="dp_bench_pretrain_"))
    for k in ("raw", "preprocessed", "results"):
        os.environ[f"DIFFPROBE_{k.upper()}"] = str(base / k)
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    make_phantom_dataset(base / "raw" / "Dataset001_Phantoms", PhantomConfig(num_train_labelled=2,
                                                                            num_train_unlabelled=4, num_test=0))
    # planned like before size classes existed (median spacing, paper patch aim as the storage chunk);
    # the cpu class would resample to 1.5 mm in-plane. Each size class is re-planned from it in main().
    plan_and_preprocess(1, num_processes=2, show_progress=False, plan_kwargs={"size_class": "paper"})
    return "1"


def main() -> None:
    from bench_features import add_size_classes_argument, load_plans  # here: bench_features imports this file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_classes_argument(ap, ["tiny", "paper"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--formats", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous"],
                    help="memory formats of the training step, timed side by side (loader timed once)")
    args = ap.parse_args()
    dataset = ensure_dataset(args.dataset)

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.models import forward_flops
    from diffprobe.planning.view import Plans
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.pretraining import data as pdata
    from diffprobe.pretraining.pretrained_model import build_denoiser

    data_dir, _, ids = preprocessed_cases(dataset)
    refs = pdata.volume_refs(data_dir, ids)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    peak = matmul_peak(args.device, dtype)
    rows = []
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
    for size_class in args.size_classes:
        plans = Plans(load_plans(dataset, size_class))
        patch, batch_size, workers = plans.patch_size, plans.batch_size, int(plans.training["num_workers"])
        diffusion = GaussianDiffusion.from_plans(plans.raw)
        source = pdata.PatchBatches(refs, patch, batch_size, "physical", True, 0)
        batch = source.batch(0)
        it = pdata.loader(source, 1, workers)
        next(it)
        t0 = time.perf_counter()
        n_load = max(args.steps, 2 * workers)
        for _ in range(n_load):
            next(it)
        load_s = (time.perf_counter() - t0) / n_load
        for fmt_name in args.formats:
            fmt = formats[fmt_name]
            torch.manual_seed(0)
            model = build_denoiser(plans, "physical", "planned").to(args.device).to(memory_format=fmt)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x0 = batch["image"].to(args.device).contiguous(memory_format=fmt)
            guide = batch["guidance"].to(args.device).contiguous(memory_format=fmt)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()

            def step(model=model, opt=opt, diffusion=diffusion, x0=x0, guide=guide) -> None:
                t = torch.randint(0, 1000, (x0.shape[0],), device=args.device)
                with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16,
                                    enabled=dtype == torch.bfloat16):
                    loss = diffusion.training_loss(model, x0, guide, t, torch.randn_like(x0))
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - t0) / args.steps
            flops = 3 * forward_flops(model, (batch_size, 1, *patch))
            mem = (torch.cuda.max_memory_allocated() / 1024**3 if args.device.startswith("cuda")
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
            rows.append((size_class, fmt_name, patch, batch_size, batch_size / step_s, batch_size / load_s, mem,
                         flops / step_s / 1e12, flops / step_s / peak))
    print(f"\ndevice {args.device}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
          f"matmul peak {peak / 1e12:.2f} TFLOP/s ({dtype})")
    print(f"{'size class':<10} {'format':<14} {'patch (z,y,x)':<15} {'batch':>5} {'step patches/s':>15} "
          f"{'loader patches/s':>17} {'loader/step':>12} {'peak mem GB':>12} {'TFLOP/s':>8} {'of peak':>8}")
    for p, fmt_name, patch, bs, sps, lps, mem, tf, frac in rows:
        print(f"{p:<10} {fmt_name:<14} {'x'.join(map(str, patch)):<15} {bs:>5} {sps:>15.2f} {lps:>17.2f} "
              f"{lps / sps:>12.1f} {mem:>12.2f} {tf:>8.3f} {frac:>8.1%}")


if __name__ == "__main__":
    main()
