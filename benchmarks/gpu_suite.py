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
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DATASET_ID = 990
PRETRAINED = "gpu_suite"
PREDICT_GOAL_S = 10.0
PEAK_GOAL = 0.30
# What each section needs at least on a GPU (seconds), to decide whether it still fits the budget.
SECTION_COST_S = {"agreement": 40, "peak": 10, "pretrain": 30, "profile": 20, "compile": 120, "predict": 60,
                  "ddp": 60}
CT_FINGERPRINT = {  # an abdominal CT: no size class's patch aim is capped by the median shape
    "spacings": [[1.5, 0.8, 0.8]] * 4, "shapes_after_crop": [[300, 400, 400]] * 4, "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1}, "dataset": "synthetic", "median_spacing": [1.5, 0.8, 0.8],
    "num_cases": 4, "num_labelled": 4}


# ---- small helpers -----------------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for queued CUDA kernels: a wall time without it measures the launch, not the work."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Seconds per call after one warm-up call (cuDNN autotuning, lazy allocations, compilation)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def machine_load() -> list[float]:
    """1/5/15-minute load averages: the 2-core development VM is shared, its figures must say so."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def diff_stats(ref, other) -> dict[str, float]:
    """Max |a-b|, max |a| and their ratio of two tensors (compared in float32 on the CPU)."""
    a, b = ref.detach().float().cpu(), other.detach().float().cpu()
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    return {"max_abs_diff": diff, "max_abs_ref": scale, "relative": diff / scale if scale else diff}


class Suite:
    """Runs sections against a time budget and keeps the report (rewritten to JSON after each section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sections": {},
                                       "load_before": machine_load()}
        self.failed = False

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[], dict], cost_s: float | None = None) -> dict | None:
        """Run one section unless skipped or out of budget; a failure is recorded, the suite goes on."""
        if name in self.args.skip:
            self.report["sections"][name] = {"skipped": "--skip"}
            print(f"[{name}] skipped (--skip)", flush=True)
            return None
        need = 0.0 if self.args.dry_run else (cost_s if cost_s is not None else SECTION_COST_S.get(name, 30))
        if self.left_s() < need:
            msg = f"not enough budget left ({self.left_s():.0f} s < {need:.0f} s)"
            self.report["sections"][name] = {"skipped": msg}
            print(f"[{name}] skipped: {msg}", flush=True)
            return None
        print(f"[{name}] ... ({self.left_s():.0f} s of budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' figures
            self.failed = True
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{name}] FAILED: {out['error']}\n{out['traceback']}", file=sys.stderr, flush=True)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["sections"][name] = out
        self.write()
        print(f"[{name}] done in {out['seconds']:.1f} s", flush=True)
        return out

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        self.args.json.write_text(json.dumps(self.report, indent=2, default=str))


# ---- set-up: dataset, model, volume -------------------------------------------------------------
def phantom_config(dry_run: bool):
    """The suite's phantom dataset. GPU: CT spacing (0.8 mm in-plane, 1.5 mm slices) and volumes larger
    than the paper patch (32x128x128) after the body crop, so the planned patch is not capped by the
    data; dry run: the tests' tiny phantoms."""
    from diffprobe.phantoms import PhantomConfig

    if dry_run:
        return PhantomConfig(num_train_labelled=2, num_train_unlabelled=1, num_test=1, fov_mm=60,
                             spacing_inplane=(1.0, 1.3), spacing_slice=(2.0, 3.0), scan_length_mm=(50, 70))
    return PhantomConfig(num_train_labelled=2, num_train_unlabelled=1, num_test=1, fov_mm=200,
                         spacing_inplane=(0.8, 0.8), spacing_slice=(1.5, 1.5), scan_length_mm=(66, 66))


def setup_model(args: argparse.Namespace, config=None, dataset_id: int = DATASET_ID) -> dict:
    """Phantoms (``config``, default :func:`phantom_config`) -> plan_and_preprocess (``args.size_class``) ->
    pretrain -> probe, each for ``args.setup_steps`` steps, in the data roots the caller set."""
    from diffprobe.phantoms import make_phantom_dataset
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.probe.model import configuration_name, probe_dir
    from diffprobe.utils import read_json
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
    from diffprobe.workflows.train_probe import train_probe

    name, roots = f"Dataset{dataset_id:03d}_GpuSuite", args.workdir / "roots"
    for old in (roots / "raw" / name, roots / "preprocessed" / name, roots / "results" / name,
                roots / "results" / "pretrained" / PRETRAINED):  # this set-up's folders only
        shutil.rmtree(old, ignore_errors=True)
    raw = roots / "raw" / name
    times = {}
    t0 = time.perf_counter()
    make_phantom_dataset(raw, config or phantom_config(args.dry_run))
    times["phantoms_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan_and_preprocess(dataset_id, num_processes=2, show_progress=False, plan_kwargs={"size_class": args.size_class})
    times["plan_and_preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = args.setup_steps
    pretrain([str(dataset_id)], name=PRETRAINED, device=args.device, show_progress=False,
             overrides={"bpr_steps": steps, "diffusion_steps": steps, "num_workers": 0})
    times["pretrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a near-initial head (low lr, as the tests' fixture): label maps with several classes, so that the
    # agreement check compares decisions, not two all-background maps
    train_probe(dataset_id, "all", PRETRAINED, device=args.device, show_progress=False, final_validation=False,
                overrides={"steps": steps, "validate_every": 0, "lr": 1e-3, "warmup_steps": 0}, seed=9)
    times["train_probe_s"] = time.perf_counter() - t0
    folder = probe_dir(dataset_id, configuration_name(PRETRAINED, "fpn", False), "all")
    meta = read_json(folder / "probe.json")
    test = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0]
    return {"probe_folder": str(folder), "test_image": str(test), "size_class": args.size_class,
            "patch_size": meta["patch_size"], "timesteps": meta["timesteps"], "guidance": meta["guidance"],
            "num_classes": meta["num_classes"],
            "target_spacing": meta["plans"]["preprocessing"]["target_spacing"],
            **{k: round(v, 2) for k, v in times.items()}}


def ct_like_volume(shape_zyx: tuple[int, int, int], seed: int = 0):
    """A CT-like int16 HU volume (air, fat, soft tissue, organs, spine, lungs cranially), built slice-wise
    from a few 2D templates: seconds for 512x512x300, where the phantom generator takes minutes and GBs.
    Content only has to look like a body to the crop and the BPR; prediction time does not depend on it."""
    import numpy as np

    nz, ny, nx = shape_zyx
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, ny, dtype=np.float32), np.linspace(-1, 1, nx, dtype=np.float32),
                       indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    inner = (x / 0.75) ** 2 + (y / 0.55) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1
    lungs = (((np.abs(x) - 0.35) / 0.25) ** 2 + ((y + 0.05) / 0.35) ** 2 < 1) & inner
    liver = (((x + 0.35) / 0.3) ** 2 + ((y + 0.05) / 0.3) ** 2 < 1) & inner
    kidneys = (((np.abs(x) - 0.3) / 0.09) ** 2 + ((y - 0.25) / 0.12) ** 2 < 1)
    base = np.full((ny, nx), -1000, np.int16)
    base[body] = -100
    base[inner] = 40
    vol = np.empty(shape_zyx, np.int16)
    for k in range(nz):
        f = k / max(1, nz - 1)
        sl = base.copy()
        if f < 0.3:
            sl[lungs] = -850
        elif f < 0.6:
            sl[liver] = 60
        else:
            sl[kidneys] = 30
        sl[spine] = 700
        vol[k] = sl
    for k in range(0, nz, 16):  # noise in blocks of slices: float32 noise for 78 M voxels at once is 300 MB
        block = vol[k:k + 16]
        block += rng.normal(0, 12, block.shape).astype(np.int16)
    return vol


def write_volume(path: Path, vol, spacing_zyx: tuple[float, float, float]) -> Path:
    """Uncompressed NIfTI: gzip of a 150 MB volume would time the compressor, not the predictor."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=False)
    return path


# ---- sections ----------------------------------------------------------------------------------
def section_agreement(args: argparse.Namespace, setup: dict) -> dict:
    """CPU fp32 vs the device on fixed inputs: denoiser forward, probe logits, a small predict."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import Predictor
    from diffprobe.probe.model import load_trained_probe

    folder = Path(setup["probe_folder"])
    cpu = load_trained_probe(folder, "cpu")
    dev = load_trained_probe(folder, args.device)
    patch, timesteps = tuple(setup["patch_size"]), setup["timesteps"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((1, 1, *patch), generator=g) * 2 - 1
    gch = cpu.model.extractor.denoiser.guidance_channels
    guide = torch.randn((1, gch, *patch), generator=g) if gch else None
    t = torch.tensor([timesteps[0]])
    out: dict[str, Any] = {"compared": f"cpu fp32 vs {args.device}",
                           "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                           "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    device_type = torch.device(args.device).type
    bf16 = device_type == "cuda"  # what predict's "auto" precision runs on this device

    def on(x):
        return None if x is None else x.to(args.device)

    with torch.no_grad():
        ref = cpu.model.extractor.denoiser(x0, t, guide)
        got = dev.model.extractor.denoiser(on(x0), on(t), on(guide))
        out["denoiser_fp32"] = diff_stats(ref, got)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            got = dev.model.extractor.denoiser(on(x0), on(t), on(guide))
        out["denoiser_autocast"] = {"dtype": "bf16" if bf16 else "fp32", **diff_stats(ref, got)}
        ref_logits = cpu.model(x0, guide, [0])
        got_logits = dev.model(on(x0), on(guide), [0])
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            got_auto = dev.model(on(x0), on(guide), [0])
        out["probe_logits_fp32"] = {**diff_stats(ref_logits, got_logits), "argmax_agreement": float(
            (ref_logits.argmax(1) == got_logits.argmax(1).cpu()).float().mean())}
        out["probe_logits_autocast"] = {**diff_stats(ref_logits, got_auto), "argmax_agreement": float(
            (ref_logits.argmax(1) == got_auto.argmax(1).cpu()).float().mean())}
    del cpu, dev

    # a small predict: the test phantom cut to one patch in-plane and 1.5 along z (two tiles: the window's
    # blending runs), so that the CPU side stays short on a GPU machine (paper class: ~0.5 TFLOP a forward)
    image = sitk.ReadImage(setup["test_image"])
    size = image.GetSize()  # x, y, z
    want = [min(s, int(f * p)) for s, p, f in zip(size, patch[::-1], (1, 1, 1.5))]
    lo = [(s - w) // 2 for s, w in zip(size, want)]
    small = sitk.RegionOfInterest(image, want, lo)
    inputs = args.workdir / "agreement_in"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    sitk.WriteImage(small, str(inputs / "small_0000.nii.gz"))
    labels, probs = {}, {}
    for name, device, settings in (("cpu", "cpu", InferenceSettings(precision="fp32", pipeline=False)),
                                   ("device", args.device, InferenceSettings())):
        predictor = Predictor.from_folders([folder], device, settings)
        t0 = time.perf_counter()
        out_dir = args.workdir / f"agreement_out_{name}"
        shutil.rmtree(out_dir, ignore_errors=True)
        written = predictor.predict_folder(inputs, out_dir, show_progress=False, save_probabilities=True)
        out[f"small_predict_{name}_s"] = round(time.perf_counter() - t0, 2)
        labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(written[0])))
        with np.load(out_dir / "small.npz") as z:
            probs[name] = z["probabilities"].astype(np.float32)
        del predictor
    a, b = labels["cpu"], labels["device"]
    top2 = np.sort(probs["cpu"], axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 0.05  # voxels where the CPU's decision is not a near-tie
    out["small_predict"] = {"shape_zyx": list(a.shape), "label_agreement": float(np.mean(a == b)),
                            "label_agreement_clear_voxels": float(np.mean((a == b)[clear])) if clear.any() else None,
                            "clear_fraction": float(clear.mean()),
                            "probabilities_max_abs_diff": float(np.abs(probs["cpu"] - probs["device"]).max()),
                            "classes_cpu": sorted(int(v) for v in np.unique(a)),
                            "classes_device": sorted(int(v) for v in np.unique(b))}
    return out


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


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


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


def section_predict(args: argparse.Namespace, setup: dict) -> dict:
    """Seconds of predict on a CT-sized volume with the size class's model (loaded and warmed up first)."""
    import torch

    from diffprobe.predict.predictor import Predictor

    shape = tuple(args.volume)
    spacing = (1.5, 0.8, 0.8)
    t0 = time.perf_counter()
    inputs = args.workdir / "predict_in"
    shutil.rmtree(inputs, ignore_errors=True)
    write_volume(inputs / "ct_0000.nii", ct_like_volume(shape), spacing)
    make_s = time.perf_counter() - t0
    predictor = Predictor.from_folders([Path(setup["probe_folder"])], args.device)
    # warm-up on the small agreement input: CUDA context, cuDNN plans for the tile shape
    warm = args.workdir / "agreement_in"
    if warm.is_dir():
        predictor.predict_folder(warm, args.workdir / "predict_warm", show_progress=False)
    runs = []
    for r in range(args.predict_repeats):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timings: list[dict] = []
        out_dir = args.workdir / f"predict_out_{r}"
        shutil.rmtree(out_dir, ignore_errors=True)
        t0 = time.perf_counter()
        predictor.predict_folder(inputs, out_dir, show_progress=False, timings=timings)
        sync(args.device)
        run = {"seconds": round(time.perf_counter() - t0, 2),
               "phases_s": {k: round(v, 2) for k, v in timings[0].items() if k.endswith("_s")}}
        if args.device.startswith("cuda"):
            run["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        runs.append(run)
        print(f"  run {r}: {run['seconds']:.1f} s {run['phases_s']}", flush=True)
    best = min(r["seconds"] for r in runs)
    return {"volume_zyx": list(shape), "spacing_zyx_mm": list(spacing), "size_class": setup["size_class"],
            "patch_size": setup["patch_size"], "make_volume_s": round(make_s, 2), "runs": runs, "best_s": best,
            "goal_s": PREDICT_GOAL_S, "goal_met": best <= PREDICT_GOAL_S}


def section_ddp(args: argparse.Namespace, single: float | None, suite: Suite) -> dict:
    """2-process DDP of the training step on 2 GPUs (or, with --ddp-on-cpu, 2 gloo processes on the CPU)."""
    import torch

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if gpus < 2 and not args.ddp_on_cpu:
        return {"skipped": f"{gpus} GPU(s) visible: 2-process DDP needs 2 (--ddp-on-cpu runs it with gloo on the CPU)"}
    result = args.workdir / "ddp.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--ddp-worker", "--device", "cuda" if gpus >= 2 else "cpu",
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
