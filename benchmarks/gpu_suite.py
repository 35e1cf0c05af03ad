"""GPU suite: the figures a GPU day must produce, in one command of at most 8 minutes (issue 16).

Usage:
    benchmarks/gpu_suite.sh                               # CUDA: the real run (hard 8-minute timeout)
    benchmarks/gpu_suite.sh --device cpu --dry-run        # CPU: the same code paths at tiny sizes (< 2 min)
    python benchmarks/gpu_suite.py [--device cuda] [--size-class paper] [--volume 300 512 512]
        [--steps 10] [--budget-s 440] [--workdir /tmp/diffprobe_gpu_suite] [--json out.json]
        [--compile-backend inductor] [--skip SECTION ...] [--ddp-on-cpu]

Self-contained: it writes its own small phantom dataset, plans it with the GPU size class
(``default_size_class("cuda")`` = ``paper``; ``--dry-run``: ``tiny``), pretrains and trains a probe
for a few steps (random-ish weights: speed and agreement do not depend on quality) and synthesises
a CT-sized volume. Nothing is downloaded. Sections, in priority order (a section that would not
fit in what is left of ``--budget-s`` is skipped with a message, so the JSON is complete even when
the wrapper's hard timeout is close; the JSON is rewritten after every section):

1. ``agreement`` -- the same weights on the CPU (fp32) and on the device, on a fixed input: the
   denoiser forward (fp32, and bf16 autocast as predict runs it on CUDA), the probe's logits, and a
   small ``predict`` (label agreement of the two label maps). Why: a CUDA kernel, TF32 or bf16
   that changes the answer must show up before any speed figure is trusted.
2. ``peak`` -- a bf16 (CPU: fp32) square matmul, the reference of "achieved FLOP/s".
3. ``pretrain`` -- one diffusion training step of the planned denoiser (forward + backward + AdamW,
   bf16 autocast on CUDA) on a batch held in memory: patches/s and TFLOP/s with channels_last_3d on
   and off, and ``torch.compile`` on and off. FLOPs of the step are counted once with
   ``torch.utils.flop_counter.FlopCounterMode`` (conv3d, linear, matmul, attention: forward and
   backward) and checked against ``diffprobe.models.forward_flops`` x 3. Goal: >= 30 % of the peak.
4. ``predict`` -- ``Predictor.predict_folder`` (default settings: bf16, channels_last, tile batch 2)
   on a 512x512x300 CT-sized volume at 0.8x0.8x1.5 mm: seconds (read, preprocess, BPR guidance,
   window, softmax, export; model already loaded), per phase. Goal: <= 10 s.
5. ``ddp`` -- 2-process DDP (``torch.distributed.run``, NCCL, the project's ``init_from_env`` and
   ``wrap_ddp``) of the same training step when 2 GPUs are present: patches/s of both ranks and
   the scaling efficiency against the 1-GPU figure. Skipped with a message otherwise
   (``--ddp-on-cpu``: run it with gloo on the CPU, to check the code path).

The CPU dry run keeps every code path at tiny sizes: agreement compares the CPU with itself,
``torch.compile`` uses the ``eager`` backend (dynamo traces, no inductor code generation: inductor on
2 CPU cores compiles for minutes), fp32 instead of bf16 (no bf16 units on the development CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the sections live in gpu_suite_common / _model / _train (one file each, < 400 lines); names other
# benchmarks import from here are re-exported
from gpu_suite_common import (  # noqa: F401
    CT_FINGERPRINT,
    DATASET_ID,
    PEAK_GOAL,
    PREDICT_GOAL_S,
    PRETRAINED,
    SECTION_COST_S,
    Suite,
    device_name,
    machine_load,
)
from gpu_suite_model import (  # noqa: F401
    ct_like_volume,
    phantom_config,
    section_agreement,
    section_predict,
    setup_model,
    write_volume,
)
from gpu_suite_train import (  # noqa: F401
    ddp_worker,
    make_step,
    section_ddp,
    section_peak,
    section_pretrain,
    section_profile,
    training_plans,
)


# ---- report ------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def table_rows(report: dict) -> Iterator[tuple[str, str, str]]:
    """(measure, value, goal) rows of the printed table."""
    s = report["sections"]
    ag = s.get("agreement", {})
    if "denoiser_fp32" in ag:
        yield ("denoiser forward fp32: max |diff| (relative)",
               f"{ag['denoiser_fp32']['max_abs_diff']:.2e} ({ag['denoiser_fp32']['relative']:.1e})", "report")
        d = ag["denoiser_autocast"]
        yield (f"denoiser forward {d['dtype']} autocast: max |diff| (relative)",
               f"{d['max_abs_diff']:.2e} ({d['relative']:.1e})", "report")
        for key in ("probe_logits_fp32", "probe_logits_autocast"):
            p = ag[key]
            yield (f"{key.replace('_', ' ')}: max |diff|, argmax agreement",
                   f"{p['max_abs_diff']:.2e}, {p['argmax_agreement']:.2%}", "report")
        sp = ag["small_predict"]
        clear = sp["label_agreement_clear_voxels"]
        clear_pct = fmt(clear and 100 * clear, ".3f")
        yield (f"small predict {'x'.join(map(str, sp['shape_zyx']))}: label agreement (where the CPU's top-2 "
               f"margin > 0.05), max prob diff, classes", f"{sp['label_agreement']:.3%} ({clear_pct} %), "
               f"{sp['probabilities_max_abs_diff']:.2e}, {len(sp['classes_cpu'])}", "report")
    pk = s.get("peak", {})
    if "matmul_tflops" in pk:
        yield (f"{pk['dtype']} matmul peak (TFLOP/s)", f"{pk['matmul_tflops']:.2f}", "-")
    rows = [r for key in ("pretrain", "compile") for r in s.get(key, {}).get("rows", [])]
    for r in rows:
        name = f"pretrain step, channels_last {'on' if r['channels_last'] else 'off'}, compile " \
               f"{'on' if r['compile'] else 'off'}" + (", cudnn.benchmark on" if r.get("cudnn_benchmark") else "")
        if "skipped" in r or "error" in r:
            yield (name, f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error'][:80]}",
                   ">= 30 % of peak")
        else:
            goal = "-" if r["of_peak"] is None else "met" if r["of_peak"] >= PEAK_GOAL else "NOT met"
            yield (name, f"{r['patches_per_s']:.2f} patches/s, {r['tflops']:.3f} TFLOP/s, "
                   f"{fmt(r['of_peak'] and 100 * r['of_peak'], '.1f')} % of peak (first step "
                   f"{r['first_step_s']:.1f} s)", f">= {PEAK_GOAL:.0%} of peak: {goal}")
    pr = s.get("predict", {})
    if "best_s" in pr:
        yield (f"predict {'x'.join(map(str, pr['volume_zyx'][::-1]))} ({pr['size_class']})",
               f"{pr['best_s']:.1f} s", f"<= {PREDICT_GOAL_S:.0f} s: {'met' if pr['goal_met'] else 'NOT met'}")
    for key, what in (("train_step", "training step"), ("inference_forward_batch2", "inference forward, 2 tiles")):
        pf = s.get("profile", {}).get(key)
        if pf:
            busy = pf.get("device_busy_share")
            yield (f"profile: {what}", f"{pf['wall_ms_per_step']:.1f} ms, {pf['cpu_ops_per_step']:.0f} ops"
                   + (f", device busy {busy:.0%}" if busy is not None else ""), "report")
    dd = s.get("ddp", {})
    if "patches_per_s" in dd:
        eff = dd.get("scaling_efficiency")
        yield ("DDP 2 processes", f"{dd['patches_per_s']:.2f} patches/s"
               + (f", {eff:.0%} scaling efficiency" if eff is not None else ""), "report")
    for name, sec in s.items():
        if "skipped" in sec:
            yield (name, f"skipped: {sec['skipped']}", "-")
        elif "error" in sec:
            yield (name, f"FAILED: {sec['error'][:80]}", "-")


def print_table(report: dict) -> None:
    rows = list(table_rows(report))
    env = report.get("environment", {})
    print(f"\n{env.get('device_name', '?')}, torch {env.get('torch', '?')}, load {report.get('load_before')} -> "
          f"{report.get('load_after')}, {report.get('elapsed_s', 0):.0f} s")
    print("| measure | value | goal |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


# ---- entry --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes and few steps (CPU check of the code paths)")
    ap.add_argument("--size-class", default=None, help="default: the planner's GPU class (paper); dry run: tiny")
    ap.add_argument("--volume", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="predict volume (default 300 512 512; dry run 24 64 64)")
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="override the training patch (z y x)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10; dry run 1)")
    ap.add_argument("--setup-steps", type=int, default=None, help="pretraining / probe steps of the set-up model "
                    "(default 2; dry run 1)")
    ap.add_argument("--predict-repeats", type=int, default=None, help="predict runs (default 2; dry run 1)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="training step dtype (default: bf16 "
                    "on CUDA, fp32 on the CPU, which has no bf16 units)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run "
                    "eager: dynamo only)")
    ap.add_argument("--budget-s", type=float, default=440.0, help="skip sections that no longer fit (default 440)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["agreement", "peak", "pretrain", "profile",
                                                                "compile", "predict", "ddp"])
    ap.add_argument("--ddp-on-cpu", action="store_true", help="run the DDP section with gloo on the CPU")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_gpu_suite"))
    ap.add_argument("--json", type=Path, default=None, help="report (default WORKDIR/gpu_suite.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; dry run 1: "
                    "on a shared 2-core machine 2 threads made single steps up to 10x slower)")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry_run
    from diffprobe.planning.size_classes import default_size_class

    args.size_class = args.size_class or ("tiny" if dry else default_size_class(args.device))
    args.volume = args.volume or ([24, 64, 64] if dry else [300, 512, 512])
    args.steps = args.steps or (1 if dry else 10)
    args.setup_steps = args.setup_steps or (1 if dry else 2)
    args.threads = args.threads or (1 if dry else None)
    args.patch = args.patch or ([16, 32, 32] if dry else None)
    args.predict_repeats = args.predict_repeats or (1 if dry else 2)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.compile_backend = args.compile_backend or ("eager" if dry else "inductor")
    args.workdir = args.workdir.resolve()
    args.json = args.json or args.workdir / "gpu_suite.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible: run `benchmarks/gpu_suite.sh --device cpu --dry-run` for the CPU check",
              file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    for k in ("raw", "preprocessed", "results"):
        os.environ[f"DIFFPROBE_{k.upper()}"] = str(args.workdir / "roots" / k)
    suite = Suite(args)
    suite.report["environment"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                   "device_name": device_name(args.device), "gpus": torch.cuda.device_count(),
                                   "cpu_count": os.cpu_count(), "platform": platform.platform()}
    needs_model = not {"agreement", "predict"} <= set(args.skip)
    setup = suite.run("setup", lambda: setup_model(args), cost_s=0) if needs_model else None
    have_model = setup is not None and "error" not in setup
    if needs_model and not have_model:
        for name in ("agreement", "predict"):
            suite.report["sections"][name] = {"skipped": "the set-up (model) failed"}
    if have_model:
        suite.run("agreement", lambda: section_agreement(args, setup))
    peak_out = suite.run("peak", lambda: section_peak(args))
    peak = peak_out.get("matmul_tflops", 0) * 1e12 if peak_out else None
    counted: dict = {}
    pre = suite.run("pretrain", lambda: section_pretrain(args, peak or None, False, suite, counted))
    suite.run("profile", lambda: section_profile(args))
    if have_model:
        suite.run("predict", lambda: section_predict(args, setup))
    suite.run("compile", lambda: section_pretrain(args, peak or None, True, suite, counted))
    single = next((r["patches_per_s"] for r in (pre or {}).get("rows", [])
                   if r.get("channels_last") and not r.get("cudnn_benchmark") and "patches_per_s" in r), None)
    suite.run("ddp", lambda: section_ddp(args, single, suite))
    suite.report["load_after"] = machine_load()
    suite.write()
    print_table(suite.report)
    print(f"\nreport: {args.json}")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
