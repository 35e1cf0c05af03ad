"""Launch overhead on a GPU, measured and removed: CUDA graphs and tile/batch sizes (issue 16).

The first GPU day measured the paper-class training step at 2.4 % of the H200's bf16 peak and the
512x512x300 predict at 54.9 s (window 46.6 s), with the `tiny` and `cpu` classes' steps costing the
same ~60 ms: a fixed host cost per step. This script answers, in one short run on the device:

1. ``window``: predict's real per-tile-batch function (``ensemble.group_patch_predictor``, the suite's
   paper-class probe) at tile batch 2 and 8, eager and with CUDA graphs (``predict.cuda_graphs``):
   ms per tile, the graph's logits against eager's (max |diff|, argmax agreement), the host time of
   the tile noise, and a profile (device busy share, top kernels) of eager and graphed tile batches.
2. ``train``: the diffusion training step (paper class, bf16 autocast, channels_last_3d) at batch 1
   and 4, eager and captured whole (forward, backward, AdamW(capturable)) as one CUDA graph: ms per
   step, patches/s, TFLOP/s and share of the bf16 matmul peak; a profile of the eager step.
3. ``predict``: ``Predictor.predict_folder`` on the 512x512x300 CT-like volume with CUDA graphs at tile
   batch 2 and 8 (the eager tile-batch-2 figure is the GPU day's 54.9 s; ``--eager-predict`` reruns it).

Usage (device, after the GPU day's packed wheels are installed; see benchmarks/gpu_day.sh):
    python benchmarks/gpu_graphs.py --json $OUT/gpu_graphs.json
    python benchmarks/gpu_graphs.py --device cpu --dry-run       # CPU: the code paths at tiny sizes, no graphs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from gpu_profile import print_profile, profile_step
from gpu_suite_common import sync, timed
from gpu_suite_model import section_predict, setup_model
from gpu_suite_train import matmul_peak, step_flops, training_plans

REPORT: dict[str, Any] = {"sections": {}}
STARTED = [time.perf_counter()]


def write(args: argparse.Namespace) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(REPORT, indent=1, default=str))


def section(name: str, args: argparse.Namespace, fn) -> Any:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
        import traceback

        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"[:800]}
    out["section_s"] = round(time.perf_counter() - t0, 1)
    REPORT["sections"][name] = out
    write(args)
    return out


# ---- 1. the window's tile function -------------------------------------------------------------
def window_section(args: argparse.Namespace, setup: dict) -> dict:
    import torch

    from diffprobe.predict.acceleration import InferenceSettings, memory_format
    from diffprobe.predict.ensemble import group_patch_predictor
    from diffprobe.predict.predictor import Predictor

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    patch = tuple(setup["patch_size"])
    out: dict[str, Any] = {"patch_size": list(patch), "rows": []}
    reference: dict[int, torch.Tensor] = {}
    configs = args.window_configs if cuda else [(2, False, "auto", False), (4, False, "auto", False)]
    for tb, graphs, gn, profile in configs:
        os.environ["DIFFPROBE_GROUP_NORM"] = gn
        g = torch.Generator().manual_seed(tb)  # the same tiles in every row of a tile batch
        settings = InferenceSettings(tile_batch=tb, cuda_graphs=graphs)
        predictor = Predictor.from_folders([Path(setup["probe_folder"])], device, settings)
        group = predictor.groups[0]
        fn = group_patch_predictor(group, device, settings)
        fmt = memory_format(settings)
        tiles = torch.randn((tb, 1, *patch), generator=g).to(device).contiguous(memory_format=fmt)
        gtiles = torch.randn((tb, 3, *patch), generator=g).to(device).contiguous(memory_format=fmt)
        row, logits, first_s = time_tiles(args, fn, group, tiles, gtiles, graphs, reference, profile and cuda)
        row["group_norm"] = gn
        out["rows"].append(row)
        vs = row.get("reference")
        print(f"  tile batch {tb:2d} graphs {graphs!s:5} group norm {gn:6}: {row['ms_per_tile']:8.2f} ms/tile "
              f"(first call {first_s:.2f} s, host noise {row['noise_host_ms_per_batch']} ms/batch)"
              + (f", vs {vs}: max|diff| {row['max_abs_diff']:.2e}, argmax {row['argmax_agreement']:.4%}" if vs else ""),
              flush=True)
        del predictor, group, fn, logits
        if cuda:
            torch.cuda.empty_cache()
        write(args)
    os.environ["DIFFPROBE_GROUP_NORM"] = "auto"
    return out


def time_tiles(args: argparse.Namespace, fn, group, tiles, gtiles, graphs: bool, reference: dict, profile: bool):
    """One row of the window section: timing, agreement with the tile batch's first row, profile."""
    tb = tiles.shape[0]
    starts = [(0, 0, 16 * i) for i in range(tb)]

    def call():
        return fn(tiles, gtiles, starts)

    t0 = time.perf_counter()
    logits = call()  # graphs: warm-up + capture
    sync(args.device)
    first_s = time.perf_counter() - t0
    sec = timed(call, args.device, args.repeats)
    row = {"tile_batch": tb, "cuda_graphs": graphs, "ms_per_batch": round(sec * 1e3, 2),
           "ms_per_tile": round(sec * 1e3 / tb, 2), "first_call_s": round(first_s, 2)}
    if tb in reference:
        ref, row["reference"] = reference[tb]
        row["max_abs_diff"] = float((logits.detach().float() - ref.float()).abs().max())
        row["argmax_agreement"] = float((logits.argmax(1) == ref.argmax(1)).float().mean())
    else:
        reference[tb] = (logits, f"graphs {graphs}, group norm {os.environ.get('DIFFPROBE_GROUP_NORM')}")
    if graphs:
        state = _graph_state(fn)
        row["graph_failed"] = state.failed if state is not None else "no graph in the predictor"
        row["graphs_captured"] = len(state.graphs) if state is not None else 0
    seeds = list(range(tb))
    row["noise_host_ms_per_batch"] = round(timed(lambda: group.extractor.noisy_inputs(tiles, seeds),
                                                 args.device, 3) * 1e3, 2)
    if profile:
        row["profile"] = profile_step(call, args.device, steps=3)
        print(f"  tile batch {tb}, graphs {graphs}:", flush=True)
        print_profile(row["profile"])
    return row, logits, first_s


def _graph_state(fn):
    """The GraphedForward inside a group_patch_predictor closure (None when eager)."""
    for cell in fn.__closure__ or ():
        obj = cell.cell_contents
        if hasattr(obj, "graphed"):
            return obj.graphed
    return None


# ---- 2. the training step ----------------------------------------------------------------------
def train_step(plans, device: str, batch: int, graphed: bool):
    """(step function, FLOPs multiplier) of one diffusion step at ``batch``; ``graphed``: captured whole."""
    import torch

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.pretraining.pretrained_model import build_denoiser

    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    model = build_denoiser(plans, "bpr", "planned").to(device).to(memory_format=fmt)
    diffusion = GaussianDiffusion.from_plans(plans.raw)
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graphed and cuda)
    g = torch.Generator().manual_seed(0)
    shape = (batch, 1, *plans.patch_size)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
    guide = torch.randn((batch, 3, *plans.patch_size), generator=g).to(device).contiguous(memory_format=fmt)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    xt = diffusion.q_sample(x0, t, noise).contiguous(memory_format=fmt)
    dtype = torch.bfloat16 if cuda else torch.float32

    def body() -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=cuda, cache_enabled=not graphed):
            eps = model(xt, t, guide)
            loss = torch.mean((eps.float() - noise.float()) ** 2)
        loss.backward()
        opt.step()

    def eager() -> None:
        opt.zero_grad(set_to_none=True)
        body()

    if not (graphed and cuda):
        return eager
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def train_section(args: argparse.Namespace, peak: float | None) -> dict:
    import torch

    plans = training_plans(args)
    flops_1, _ = step_flops(plans, args.device, "bf16" if args.device.startswith("cuda") else "fp32")
    flops_per_patch = flops_1 / plans.batch_size
    out: dict[str, Any] = {"patch_size": plans.patch_size, "planned_batch": plans.batch_size,
                           "flops_per_patch": flops_per_patch, "rows": []}
    cuda = args.device.startswith("cuda")
    configs = args.train_configs if cuda else [(1, False, "auto", False), (2, False, "auto", False)]
    for batch, graphed, gn, profile in configs:
        os.environ["DIFFPROBE_GROUP_NORM"] = gn
        row: dict[str, Any] = {"batch": batch, "cuda_graph": graphed, "group_norm": gn}
        out["rows"].append(row)
        try:
            t0 = time.perf_counter()
            step = train_step(plans, args.device, batch, graphed)
            sync(args.device)
            row["setup_s"] = round(time.perf_counter() - t0, 2)
            sec = timed(step, args.device, args.steps)
            if profile and cuda:
                row["profile"] = profile_step(step, args.device, steps=3)
                print_profile(row["profile"])
        except Exception as e:  # noqa: BLE001 - e.g. a capture refused: the other rows still count
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  batch {batch} graph {graphed} group norm {gn}: FAILED {row['error']}", flush=True)
            continue
        tflops = flops_per_patch * batch / sec / 1e12
        row.update({"ms_per_step": round(sec * 1e3, 2), "patches_per_s": round(batch / sec, 2),
                    "tflops": round(tflops, 2), "of_peak": round(tflops * 1e12 / peak, 4) if peak else None})
        print(f"  batch {batch} graph {graphed!s:5} group norm {gn:6}: {row['ms_per_step']:8.1f} ms/step "
              f"{row['patches_per_s']:7.2f} patches/s {tflops:7.2f} TFLOP/s"
              + (f" ({tflops * 1e12 / peak:.1%} of peak)" if peak else ""), flush=True)
        del step
        if cuda:
            torch.cuda.empty_cache()
        write(args)
    os.environ["DIFFPROBE_GROUP_NORM"] = "auto"
    return out


# ---- 3. predict ----------------------------------------------------------------------------------
def predict_section(args: argparse.Namespace, setup: dict) -> dict:
    """The suite's predict (CT-like volume, model loaded and warmed up) per (tile batch, graphs) setting."""
    from diffprobe.predict import predictor as predictor_module
    from diffprobe.predict.acceleration import InferenceSettings

    out: dict[str, Any] = {"rows": []}
    configs = args.predict_configs if args.device.startswith("cuda") else [(2, True, "auto")]
    original = predictor_module.Predictor.from_folders
    for tb, graphs, gn in configs:
        if time.perf_counter() - STARTED[0] > args.budget_s:
            out["rows"].append({"tile_batch": tb, "cuda_graphs": graphs, "group_norm": gn, "skipped": "budget"})
            continue
        os.environ["DIFFPROBE_GROUP_NORM"] = gn
        settings = InferenceSettings(tile_batch=tb, cuda_graphs=graphs)

        def from_folders(folders, device="auto", settings_=None, postprocess=True, _s=settings):
            return original(folders, device, _s, postprocess)

        predictor_module.Predictor.from_folders = staticmethod(from_folders)
        try:
            row = section_predict(args, setup)
        finally:
            predictor_module.Predictor.from_folders = original
        row.update({"tile_batch": tb, "cuda_graphs": graphs, "group_norm": gn})
        out["rows"].append(row)
        print(f"  tile batch {tb} graphs {graphs} group norm {gn}: best {row['best_s']:.1f} s", flush=True)
        write(args)
    os.environ["DIFFPROBE_GROUP_NORM"] = "auto"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, few repeats (CPU check of the code paths)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_gpu_graphs"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["window", "train", "predict"])
    ap.add_argument("--budget-s", type=float, default=330.0, help="no new predict run after this many seconds")
    ap.add_argument("--eager-predict", action="store_true", help="also predict eagerly at tile batch 2")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.size_class = "tiny" if dry else "paper"
    args.patch = [16, 32, 32] if dry else None
    args.setup_steps = 1 if dry else 2
    args.steps = 1 if dry else 10
    args.repeats = 1 if dry else 10
    # (tile batch, CUDA graphs, DIFFPROBE_GROUP_NORM, profile): the first row of a tile batch is the one
    # the others are compared with
    args.window_configs = [(2, False, "native", False), (2, False, "auto", True), (2, True, "auto", True),
                           (8, False, "auto", False), (8, True, "auto", False)]
    args.train_configs = [(1, False, "native", False), (1, False, "auto", True), (1, True, "auto", False),
                          (4, False, "native", False), (4, False, "auto", False)]  # (batch, graph, norm, profile)
    args.predict_configs = [(2, True, "auto"), (8, True, "auto"), (8, True, "native")]
    args.volume = [24, 64, 64] if dry else [300, 512, 512]
    args.predict_repeats = 1
    args.workdir = args.workdir.resolve()
    args.json = args.json or args.workdir / "gpu_graphs.json"
    import torch

    if dry:
        torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for k in ("raw", "preprocessed", "results"):
        os.environ[f"DIFFPROBE_{k.upper()}"] = str(args.workdir / "roots" / k)
    REPORT["environment"] = {"torch": torch.__version__, "device": args.device,
                             "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    started = STARTED[0] = time.perf_counter()
    peak = matmul_peak(args.device, "bf16" if args.device.startswith("cuda") else "fp32", dry)
    REPORT["peak_tflops"] = peak / 1e12
    print(f"matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    setup = None
    if {"window", "predict"} - set(args.skip):
        setup = section("setup", args, lambda: setup_model(args))
    if "window" not in args.skip and setup and "error" not in setup:
        section("window", args, lambda: window_section(args, setup))
    if "train" not in args.skip:
        section("train", args, lambda: train_section(args, peak))
    if "predict" not in args.skip and setup and "error" not in setup:
        section("predict", args, lambda: predict_section(args, setup))
    REPORT["elapsed_s"] = round(time.perf_counter() - started, 1)
    write(args)
    print(f"report: {args.json} ({REPORT['elapsed_s']} s)")
    return 1 if any("error" in s for s in REPORT["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
