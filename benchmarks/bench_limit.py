"""How far the denoiser forward is from the hardware's limit: achieved FLOP/s vs the measured peak.

Usage:
    python benchmarks/bench_limit.py [--device cpu|cuda] [--dtypes fp32 bf16] [--size_classes tiny small paper]
        [--formats contiguous channels_last] [--threads 2] [--seconds 3]

In one run, on the chosen device:

* **peaks** per dtype, measured through torch: a square matmul (2048² on CPU, 8192² on GPU) and a
  large 3x3x3 convolution (64 -> 64 channels on a 2x64x32x64x64 input, the shape class of the
  denoiser's full-resolution stages); the larger of the two is "the peak" of that dtype;
* **the denoiser forward as predict runs it**: each planner size class's denoiser (planned from
  ``bench_features``' synthetic CT fingerprint or ``--dataset``; random weights; speed does not
  depend on them; physical guidance, planned attention) on a batch of 2 tiles x 3 feature
  timesteps (the predictor's default tile batch), for each memory format and dtype (bf16 through
  ``torch.autocast``), timed for ``--seconds`` after a warm-up. FLOPs are
  ``diffprobe.models.forward_flops`` (2 x multiply-accumulates of convs, linears and attention).

Prints, last, one table: size class, dtype, format, ms per forward, achieved TFLOP/s, and that as a
fraction of the conv peak and of the matmul peak of the same dtype. Anything far below 100 % is
time spent outside dense arithmetic (normalisation, activations, memory traffic, small kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_features import add_size_classes_argument, load_plans  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, seconds: float) -> float:
    """Median-free, steady-state seconds per call: one warm-up, then as many calls as fit in ``seconds``."""
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        if time.perf_counter() - t0 >= seconds:
            return (time.perf_counter() - t0) / n


def matmul_peak(device: str, dtype: torch.dtype, seconds: float) -> float:
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, seconds)


def conv_peak(device: str, dtype: torch.dtype, fmt: torch.memory_format, seconds: float) -> float:
    shape, c = (2, 64, 32, 64, 64), 64
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(c, c, 3, 3, 3, device=device, dtype=dtype).contiguous(memory_format=fmt)
    flops = 2 * shape[0] * c * c * 27 * shape[2] * shape[3] * shape[4]
    with torch.no_grad():
        return flops / timed(lambda: F.conv3d(x, w, padding=1), device, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"])
    add_size_classes_argument(ap, ["tiny", "small"])
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    ap.add_argument("--tiles", type=int, default=2, help="tiles per forward (predict's default 2)")
    ap.add_argument("--dataset", default=None, help="take the plans of a preprocessed dataset")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffprobe.models import forward_flops
    from diffprobe.planning.view import Plans
    from diffprobe.pretraining.pretrained_model import build_denoiser

    all_plans = {sc: Plans(load_plans(args.dataset, sc)) for sc in args.size_classes}
    timesteps = next(iter(all_plans.values())).feature_timesteps  # the diffusion plan does not follow the class
    dev = args.device
    peaks = {}
    for name in args.dtypes:
        dtype = DTYPES[name]
        mm = matmul_peak(dev, dtype, args.seconds)
        conv = max(conv_peak(dev, dtype, FORMATS[f], args.seconds) for f in args.formats)
        peaks[name] = (mm, conv)
        print(f"{name}: matmul {mm / 1e12:.3f} TFLOP/s, conv3d {conv / 1e12:.3f} TFLOP/s", flush=True)

    rows = []
    for size_class, plans in all_plans.items():
        torch.manual_seed(0)
        denoiser = build_denoiser(plans, "physical", "planned").eval().to(dev)
        batch = args.tiles * len(timesteps)
        shape = (batch, 1, *plans.patch_size)
        flops = forward_flops(denoiser, shape)
        for fmt_name in args.formats:
            fmt = FORMATS[fmt_name]
            denoiser = denoiser.to(memory_format=fmt)
            x = torch.rand(shape, device=dev).contiguous(memory_format=fmt)
            g = torch.rand((batch, 3, *plans.patch_size), device=dev).contiguous(memory_format=fmt)
            t = torch.tensor(timesteps * args.tiles, device=dev)
            for name in args.dtypes:
                def forward(x=x, g=g, t=t, name=name, denoiser=denoiser) -> None:
                    with torch.no_grad(), torch.autocast(torch.device(dev).type, dtype=DTYPES[name],
                                                         enabled=name != "fp32"):
                        denoiser(x, t, g)

                sec = timed(forward, dev, args.seconds)
                mm, conv = peaks[name]
                rows.append((size_class, plans.patch_size, name, fmt_name, sec * 1e3, flops / sec, flops / sec / conv,
                             flops / sec / mm))
                print(f"{size_class} {name} {fmt_name}: {sec * 1e3:.1f} ms", flush=True)

    where = (torch.cuda.get_device_name(dev) if dev.startswith("cuda")
             else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    print(f"\n{where}, torch {torch.__version__}; forward = {args.tiles} tiles x {len(timesteps)} timesteps "
          f"{timesteps} (predict's batch); FLOPs from forward_flops")
    print("| size class | patch | dtype | format | ms / forward | TFLOP/s | of conv3d peak | of matmul peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size_class, patch, name, fmt_name, ms, fl, of_conv, of_mm in rows:
        print(f"| {size_class} | {'×'.join(map(str, patch))} | {name} | {fmt_name} | {ms:.1f} | {fl / 1e12:.3f} "
              f"| {of_conv:.0%} | {of_mm:.0%} |")
    print("| peaks | | " + " | ".join(f"{n}: matmul {mm / 1e12:.3f}, conv3d {cv / 1e12:.3f} TFLOP/s"
                                      for n, (mm, cv) in peaks.items()) + " | | | | | |")


if __name__ == "__main__":
    main()
