"""The GPU suite's matmul peak, training-step, profile and DDP sections (``gpu_suite.py``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_suite_common import CT_FINGERPRINT, PEAK_GOAL, SECTION_COST_S, Suite, device_name, sync, timed


def matmul_peak(device: str, dtype_name: str, dry_run: bool) -> float:
    """FLOP/s of a square matmul (8192^2 on CUDA; 512^2 in a dry run), the peak the step is measured against."""
    import torch

    n = 1024 if dry_run else (8192 if device.startswith("cuda") else 2048)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 5 if dry_run else 20
    return 2 * n**3 / timed(lambda: a @ b, device, reps)


def section_peak(args: argparse.Namespace) -> dict:
    peak = matmul_peak(args.device, args.dtype, args.dry_run)
    return {"dtype": args.dtype, "matmul_tflops": peak / 1e12,
            "device_name": device_name(args.device)}


def training_plans(args: argparse.Namespace):
    """The size class planned on an abdominal-CT fingerprint (the patch the class aims at, not capped by
    the suite's small phantoms); ``--patch`` overrides it (dry run: a tiny patch)."""
    from diffprobe.planning.planner import plan
    from diffprobe.planning.view import Plans

    kwargs = {"patch_size": list(args.patch)} if args.patch else {}
    return Plans(plan(CT_FINGERPRINT, size_class=args.size_class, **kwargs))


def make_step(plans, device: str, dtype_name: str, channels_last: bool, compile_backend: str | None,
              seed: int = 0, data_seed: int = 0, wrap: Callable | None = None):
    """One diffusion training step (forward + backward + AdamW) on a batch held in memory, as the
    trainer runs it (bf16 autocast on CUDA). ``wrap``: e.g. DDP around the model (before compiling).
    Returns (step function, bare model, batch size)."""
    import torch

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.guidance import guidance_channels
    from diffprobe.pretraining.pretrained_model import build_denoiser

    torch.manual_seed(seed)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = build_denoiser(plans, "bpr", "planned").to(device).to(memory_format=fmt)
    run = wrap(model) if wrap else model
    run = torch.compile(run, backend=compile_backend) if compile_backend else run
    diffusion = GaussianDiffusion.from_plans(plans.raw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = plans.batch_size
    g = torch.Generator().manual_seed(data_seed)
    x0 = (torch.rand((b, 1, *plans.patch_size), generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
    guide = torch.randn((b, guidance_channels("bpr"), *plans.patch_size), generator=g).to(device)
    guide = guide.contiguous(memory_format=fmt)
    t = torch.randint(0, diffusion.num_timesteps, (b,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    device_type = torch.device(device).type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
            loss = diffusion.training_loss(run, x0, guide, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model, b


def step_flops(plans, device: str, dtype_name: str) -> tuple[int, int]:
    """FLOPs of one training step counted by FlopCounterMode (forward + backward of convs, linears,
    matmuls, attention), and 3 x ``forward_flops`` (the hook-based count of the forward) as a check."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffprobe.models import forward_flops

    step, model, b = make_step(plans, device, dtype_name, False, None)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    sync(device)
    est = 3 * forward_flops(model, (b, 1, *plans.patch_size))
    del step, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return int(counter.get_total_flops()), int(est)


def section_pretrain(args: argparse.Namespace, peak: float | None, compiled: bool, suite: Suite,
                     counted: dict) -> dict:
    """Patches/s and achieved TFLOP/s of the training step, channels_last off and on, eager (``compiled``
    False) or through ``torch.compile``, against the peak. ``counted`` caches the step's FLOPs."""
    import torch

    plans = training_plans(args)
    if "step_flops" not in counted:
        counted["step_flops"], counted["step_flops_3x_forward_flops"] = step_flops(plans, args.device, args.dtype)
    flops = counted["step_flops"]
    out: dict[str, Any] = {"size_class": args.size_class, "patch_size": plans.patch_size,
                           "batch_size": plans.batch_size, "dtype": args.dtype, **counted,
                           "peak_tflops": peak / 1e12 if peak else None, "rows": []}
    if compiled:
        out["compile_backend"] = args.compile_backend
    # (channels_last, cudnn.benchmark): the project leaves cudnn.benchmark off (default); one row shows what
    # autotuning the 3D convolutions would give. Compiled: channels_last first, the likely best, in case
    # the budget only fits one compilation.
    configs = [(True, False), (False, False)] if compiled else [(False, False), (True, False), (True, True)]
    for channels_last, autotune in configs:
        row: dict[str, Any] = {"channels_last": channels_last, "compile": compiled, "cudnn_benchmark": autotune}
        out["rows"].append(row)
        if compiled and not args.dry_run and suite.left_s() < SECTION_COST_S["compile"] * 0.75:
            row["skipped"] = f"budget ({suite.left_s():.0f} s left)"
            continue
        benchmark_before = torch.backends.cudnn.benchmark
        try:
            torch.backends.cudnn.benchmark = autotune
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if compiled:
                torch._dynamo.reset()
            step, _, b = make_step(plans, args.device, args.dtype, channels_last,
                                   args.compile_backend if compiled else None)
            t0 = time.perf_counter()
            step()  # compilation (compile on), cuDNN autotuning, allocations
            sync(args.device)
            row["first_step_s"] = round(time.perf_counter() - t0, 2)
            sec = timed(step, args.device, args.steps)
        except Exception as e:  # noqa: BLE001 - e.g. a compile failure: the other rows still count
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  channels_last {channels_last} compile {compiled}: FAILED {row['error']}", flush=True)
            continue
        finally:
            torch.backends.cudnn.benchmark = benchmark_before
        row.update({"step_s": sec, "patches_per_s": b / sec, "tflops": flops / sec / 1e12,
                    "of_peak": flops / sec / peak if peak else None})
        if args.device.startswith("cuda"):
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        print(f"  channels_last {channels_last!s:5} compile {compiled!s:5} cudnn.benchmark {autotune!s:5}: "
              f"{b / sec:8.2f} patches/s {flops / sec / 1e12:8.3f} TFLOP/s"
              + (f" ({flops / sec / peak:.1%} of peak)" if peak else ""), flush=True)
        del step
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        # a run killed by the wrapper's hard timeout during a long compilation keeps the rows done so far
        suite.report["sections"]["compile" if compiled else "pretrain"] = {**out, "partial": True}
        suite.write()
    done = [r for r in out["rows"] if r.get("of_peak") is not None]
    if done:
        best = max(done, key=lambda r: r["of_peak"])
        out["best"] = {k: best[k] for k in ("channels_last", "compile", "cudnn_benchmark", "patches_per_s", "tflops",
                                            "of_peak")}
        out["goal_met"] = best["of_peak"] >= PEAK_GOAL
    return out


def section_profile(args: argparse.Namespace) -> dict:
    """Where the time of a training step and of an inference forward goes (``gpu_profile.py``): GPU busy
    share, top kernels, top CPU operators. The first GPU day found a fixed ~60 ms per step."""
    import torch
    from gpu_profile import print_profile, profile_step

    plans = training_plans(args)
    step, model, _ = make_step(plans, args.device, args.dtype, True, None)
    out = {"train_step": profile_step(step, args.device)}
    print("  training step (channels_last on, eager):", flush=True)
    print_profile(out["train_step"])
    del step
    model.eval()
    g = torch.Generator().manual_seed(1)
    fmt_ = torch.channels_last_3d
    x = torch.randn((2, 1, *plans.patch_size), generator=g).to(args.device).contiguous(memory_format=fmt_)
    guide = torch.randn((2, 3, *plans.patch_size), generator=g).to(args.device).contiguous(memory_format=fmt_)
    t = torch.full((2,), 30, dtype=torch.long, device=args.device)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                                             enabled=args.dtype == "bf16"):
            model(x, t, guide)

    out["inference_forward_batch2"] = profile_step(forward, args.device)
    print("  inference forward, 2 tiles (as predict's window):", flush=True)
    print_profile(out["inference_forward_batch2"])
    return out


def section_ddp(args: argparse.Namespace, single: float | None, suite: Suite) -> dict:
    """2-process DDP of the training step on 2 GPUs (or, with --ddp-on-cpu, 2 gloo processes on the CPU)."""
    import torch

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if gpus < 2 and not args.ddp_on_cpu:
        return {"skipped": f"{gpus} GPU(s) visible: 2-process DDP needs 2 (--ddp-on-cpu runs it with gloo on the CPU)"}
    result = args.workdir / "ddp.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve().with_name("gpu_suite.py")), "--ddp-worker",
           "--device", "cuda" if gpus >= 2 else "cpu",
           "--size-class", args.size_class, "--steps", str(args.steps), "--dtype", args.dtype,
           "--json", str(result), *(["--patch", *map(str, args.patch)] if args.patch else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's diffprobe, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(30, int(suite.left_s())))
    if done.returncode != 0 or not result.is_file():
        raise RuntimeError(f"DDP run failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    out = json.loads(result.read_text())
    if single:
        out["single_process_patches_per_s"] = single
        out["scaling_efficiency"] = out["patches_per_s"] / (2 * single)
    return out


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of section 5: ``make_step`` under the project's DDP helpers (``init_from_env``, ``wrap_ddp``),
    each rank on its own batch."""
    import torch.distributed as dist

    from diffprobe.training import distributed as dist_utils

    device = dist_utils.init_from_env(args.device)
    plans = training_plans(args)
    step, _, b = make_step(plans, str(device), args.dtype, True, None, seed=0, data_seed=1 + dist.get_rank(),
                           wrap=lambda m: dist_utils.wrap_ddp(m, device))
    sec = timed(step, str(device), args.steps)
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        args.json.write_text(json.dumps({"world_size": world, "backend": dist.get_backend(), "step_s": sec,
                                         "patches_per_s": world * b / sec, "batch_per_rank": b,
                                         "patch_size": plans.patch_size}))
    dist.barrier()
    dist.destroy_process_group()


