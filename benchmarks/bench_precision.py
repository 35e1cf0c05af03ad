"""CPU bf16: detection, peaks, denoiser forward, profile and predict agreement, fp32 vs bf16 side by side.

On CPUs with bf16 units (``avx512_bf16`` / ``amx_bf16``) oneDNN runs bf16 convolutions natively; without
them bf16 is emulated and was ~40x slower (docs/performance.md). ``-precision auto`` follows
``diffprobe.predict.acceleration.cpu_bf16_native`` (detected, never assumed). This script measures, in one
run on one machine:

1. detection: the /proc/cpuinfo flags, torch's own probes, and what ``auto`` resolves to on the CPU;
2. peaks per dtype: a 2048² matmul and a 3x3x3 conv3d (64 -> 64 channels, channels_last_3d), as
   ``bench_limit.py``;
3. the denoiser forward as ``predict`` runs it (2 tiles x 3 timesteps, channels_last_3d) per size class,
   fp32 vs bf16 autocast: ms, TFLOP/s (``forward_flops``), fraction of the same dtype's peak;
4. a torch.profiler breakdown of that forward (convolution, GroupNorm, SiLU, upsampling, attention,
   copies/conversions, elementwise, other) for both dtypes;
5. predict with a trained tiny probe, fp32 vs bf16 (``Predictor.predict_folder``, the same loaded probe,
   alternating, after a warm-up case), on phantom test cases and on the real-CT held-out slab (dataset
   built as ``real_ct.py`` does): seconds per case (window) and label agreement (fraction of equal voxels;
   the bar for ``auto`` = bf16 is >= 99.9 %).

    python benchmarks/bench_precision.py --workdir /tmp/diffprobe_bench_precision --size_classes tiny cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CATEGORIES = (  # (category, substrings of aten op names), first match wins
    ("convolution", ("conv", "mkldnn_convolution")),
    ("group_norm", ("group_norm",)),
    ("silu", ("silu",)),
    ("upsample", ("upsample",)),
    ("attention", ("softmax", "bmm", "matmul", "baddbmm", "scaled_dot", "linear", "addmm", "mm")),
    ("copies/conversions", ("copy_", "to_copy", "contiguous", "clone", "cat", "pad", "empty_like")),
    ("elementwise", ("add", "mul", "div", "sub", "sqrt", "exp", "cos", "sin", "rsqrt", "where")),
)


def detection() -> dict:
    from diffprobe.predict.acceleration import BF16_CPU_FLAGS, InferenceSettings, _read_cpuinfo, cpuinfo_flags

    flags = cpuinfo_flags(_read_cpuinfo()) or set()
    probes = {n: bool(getattr(torch.cpu, n, lambda: None)()) for n in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported")}
    return {"cpuinfo_bf16_flags": sorted(f for f in flags if f in BF16_CPU_FLAGS or "bf16" in f),
            "torch_probes": probes, "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "auto_on_cpu": str(InferenceSettings().dtype(torch.device("cpu")))}


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile(fn, repeats: int = 3) -> dict[str, float]:
    """Fraction of self CPU time per category over ``repeats`` calls (after one warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    fn()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        totals[category(ev.key)] = totals.get(category(ev.key), 0.0) + ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def forward_section(args: argparse.Namespace) -> dict:
    from bench_features import load_plans
    from bench_limit import conv_peak, matmul_peak, timed

    from diffprobe.models import forward_flops
    from diffprobe.planning.view import Plans
    from diffprobe.pretraining.pretrained_model import build_denoiser

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    fmt = torch.channels_last_3d
    peaks = {}
    for name, dt in dtypes.items():
        mm, cv = matmul_peak("cpu", dt, args.seconds), conv_peak("cpu", dt, fmt, args.seconds)
        peaks[name] = {"matmul": mm, "conv3d": cv, "peak": max(mm, cv)}
        print(f"peak {name}: matmul {mm / 1e12:.3f}, conv3d {cv / 1e12:.3f} TFLOP/s", flush=True)
    rows = []
    for sc in args.size_classes:
        plans = Plans(load_plans(None, sc))
        timesteps = plans.feature_timesteps
        torch.manual_seed(0)
        denoiser = build_denoiser(plans, "physical", "planned").eval()
        batch = 2 * len(timesteps)
        shape = (batch, 1, *plans.patch_size)
        flops = forward_flops(denoiser, shape)
        denoiser = denoiser.to(memory_format=fmt)
        x = torch.rand(shape).contiguous(memory_format=fmt)
        g = torch.rand((batch, 3, *plans.patch_size)).contiguous(memory_format=fmt)
        t = torch.tensor(timesteps * 2)
        outs = {}
        for name, dt in dtypes.items():
            def forward(dt=dt, net=denoiser, x=x, t=t, g=g) -> torch.Tensor:
                with torch.no_grad(), torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                    return net(x, t, g)
            sec = timed(forward, "cpu", args.seconds)
            outs[name] = forward().float()
            row = {"size_class": sc, "patch": plans.patch_size, "dtype": name, "ms": round(sec * 1e3, 1),
                   "tflops": round(flops / sec / 1e12, 4), "of_peak": round(flops / sec / peaks[name]["peak"], 3),
                   "profile": profile(forward) if args.profile else None}
            rows.append(row)
            print(f"{sc} {name}: {row['ms']} ms, {row['tflops']} TFLOP/s, {row['of_peak']:.0%} of peak; "
                  f"profile {row['profile']}", flush=True)
        rel = ((outs["bf16"] - outs["fp32"]).norm() / outs["fp32"].norm()).item()
        rows[-1]["rel_diff_vs_fp32"] = round(rel, 4)
    return {"peaks": {k: {kk: round(vv / 1e12, 4) for kk, vv in v.items()} for k, v in peaks.items()}, "rows": rows}


# ---- predict agreement -------------------------------------------------------------------------
def ensure_probe(base: Path, dataset: int, make_raw, args: argparse.Namespace) -> Path:
    """Plans (tiny), a short pretraining and a trained probe in ``base``'s own data roots."""
    from diffprobe.paths import roots_at
    from diffprobe.probe.model import probe_dir

    with roots_at(base):
        make_raw(base / "raw")  # first: probe_dir looks the dataset up in the raw root
        folder = probe_dir(dataset, "prec__fpn", "all")
        if (folder / "checkpoint_final.pt").is_file():
            return folder
        from diffprobe.pretraining.pretrain import pretrain
        from diffprobe.pretraining.pretrained_model import PretrainedModel
        from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
        from diffprobe.workflows.train_probe import train_probe

        plan_and_preprocess(dataset, num_processes=1, show_progress=False, plan_kwargs={"size_class": "tiny"})
        if not PretrainedModel("prec").finished:
            pretrain([str(dataset)], name="prec", device="cpu", show_progress=False,
                     overrides={"bpr_steps": args.pretrain_steps, "diffusion_steps": args.pretrain_steps,
                                "num_workers": 0})
        train_probe(dataset, "all", "prec", device="cpu", show_progress=False, final_validation=False,
                    overrides={"steps": args.probe_steps, "validate_every": 0})
        return folder


def phantom_raw(raw: Path) -> None:
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    if (raw / "Dataset001_Phantoms" / "dataset.json").is_file():
        return
    make_phantom_dataset(raw / "Dataset001_Phantoms", PhantomConfig(num_train_labelled=4, num_train_unlabelled=0,
                                                                    num_test=3))


def realct_raw(raw: Path) -> None:
    from real_ct import make_dataset

    make_dataset(raw, holdout_slices=6)


def agreement_section(args: argparse.Namespace) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from diffprobe.paths import roots_at
    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import Predictor
    from diffprobe.probe.model import load_trained_probe

    out = {}
    for name, dataset, make_raw, test in (("phantoms", 1, phantom_raw, "Dataset001_Phantoms"),
                                          ("realct_slab", 10, realct_raw, "Dataset010_RealCT")):
        if name not in args.agreement:
            continue
        base = args.workdir / name
        folder = ensure_probe(base, dataset, make_raw, args)
        inputs = base / "raw" / test / "imagesTs"
        with roots_at(base):
            probe = load_trained_probe(folder, "cpu")
            preds = {p: Predictor([probe], "cpu", InferenceSettings(precision=p), prepare=p == "fp32")
                     for p in ("fp32", "bf16")}
            res: dict = {"seconds": {"fp32": [], "bf16": []}, "window_s": {"fp32": [], "bf16": []}}
            for rnd in range(args.rounds):
                for p, pred in preds.items():
                    timings: list[dict] = []
                    t0 = time.perf_counter()
                    pred.predict_folder(inputs, base / f"pred_{p}", show_progress=False, timings=timings)
                    res["seconds"][p].append(round(time.perf_counter() - t0, 2))
                    res["window_s"][p].append(round(sum(t.get("window_s", 0.0) for t in timings), 2))
                    print(f"{name} round {rnd} {p}: {res['seconds'][p][-1]} s (window {res['window_s'][p][-1]})",
                          flush=True)
        equal = total = fg_equal = fg_total = 0
        classes_fp32: set[int] = set()
        for f in sorted((base / "pred_fp32").glob("*.nii.gz")):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(base / "pred_bf16" / f.name)))
            equal += int((a == b).sum())
            total += a.size
            fg = (a > 0) | (b > 0)
            fg_equal += int((a == b)[fg].sum())
            fg_total += int(fg.sum())
            classes_fp32 |= set(np.unique(a).tolist())
        res.update({"cases": len(list(inputs.glob("*_0000.nii.gz"))), "voxels": total,
                    "agreement": equal / max(total, 1), "foreground_agreement": fg_equal / max(fg_total, 1),
                    "classes_predicted_fp32": sorted(classes_fp32)})
        print(f"{name}: label agreement {res['agreement']:.5f} (foreground {res['foreground_agreement']:.5f}), "
              f"classes {res['classes_predicted_fp32']}", flush=True)
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_bench_precision"))
    ap.add_argument("--size_classes", nargs="+", default=["tiny", "cpu"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing window per forward / peak measurement")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--agreement", nargs="*", default=["phantoms", "realct_slab"],
                    help="predict agreement datasets (none: skip)")
    ap.add_argument("--rounds", type=int, default=2, help="predict rounds per precision (alternating)")
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--probe-steps", type=int, default=150)
    ap.add_argument("--skip-forward", action="store_true")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from diffprobe.host_allocator import tune_host_allocator

    # as every stage does when it resolves its device (DIFFPROBE_MALLOC_TUNING=0: glibc's defaults)
    report = {"malloc_tuned": tune_host_allocator(), "cpu_count": os.cpu_count(), "threads": args.threads,
              "torch": torch.__version__,
              "load_before": [round(x, 2) for x in os.getloadavg()], "detection": detection()}
    print(f"detection: {report['detection']}", flush=True)
    if not args.skip_forward:
        report["forward"] = forward_section(args)
    if args.agreement:
        report["agreement"] = agreement_section(args)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    (args.workdir / "bench_precision.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
