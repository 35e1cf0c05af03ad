"""The fixed cost of one denoiser training step: operator dispatch, measured where arithmetic is nil.

On the H200 (docs/performance.md, "GPU day") a training step took ~60 ms for the `tiny` and the `cpu`
size classes alike: a cost that does not grow with the network's arithmetic. A candidate is the
host side of the step: every operator of the forward, backward, gradient clipping, AdamW and EMA
update is dispatched one by one from Python. This script measures that side on the CPU, with the
smallest input each planned network accepts (one voxel per level at the coarsest stride, batch 2),
so the arithmetic is negligible and what remains is dispatch:

- forward + backward, then gradient clipping + AdamW, then the EMA update (``trainer.EMA``): ms each,
  1 thread, and profiled operator calls each (aten, nested included). Clipping, AdamW and EMA do real
  arithmetic over every weight (millions), so their time grows with the class; forward + backward at
  this input is the dispatch floor.

On a GPU each of those calls also launches kernels asynchronously; when the host takes longer per
step than the device, the device idles (a few thousand launches at ~5-20 us each add up to tens of
ms). Remedies, to be measured on a GPU: ``torch.compile`` (fusion; CUDA graphs with mode
"reduce-overhead"), more samples per step.

    python benchmarks/bench_step_overhead.py --size_classes tiny cpu paper
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_features import add_size_classes_argument, load_plans  # noqa: E402


def measure(size_class: str, repeats: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from diffprobe.planning.view import Plans
    from diffprobe.pretraining.pretrained_model import build_denoiser
    from diffprobe.training.trainer import EMA

    plans = Plans(load_plans(None, size_class))
    torch.manual_seed(0)
    net = build_denoiser(plans, "bpr", "planned")
    shape = tuple(net.total_stride)
    x, g = torch.randn(2, 1, *shape), torch.randn(2, net.guidance_channels, *shape)
    t = torch.randint(0, 1000, (2,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ema = EMA(net, 0.999)

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=True)
        (net(x, t, g) ** 2).mean().backward()

    def optimiser() -> None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e3

    for _ in range(3):
        forward_backward()
        optimiser()
        ema.update(net)
    fb = timed(forward_backward)
    opt_ms = timed(optimiser)
    ema_ms = timed(lambda: ema.update(net))
    counts = {}
    steps = (("forward_backward", forward_backward), ("optimiser", optimiser), ("ema", lambda: ema.update(net)))
    for name, fn in steps:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        counts[name] = sum(e.count for e in prof.key_averages())
    return {"size_class": size_class, "input": list(shape), "parameters": len(list(net.parameters())),
            "weights_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            "forward_backward_ms": round(fb, 1), "optimiser_ms": round(opt_ms, 1), "ema_ms": round(ema_ms, 1),
            "ops": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_classes_argument(ap, ["tiny", "cpu", "small", "paper"])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'class':<7}{'input':>9}{'tensors':>8}{'weights M':>10}  {'fwd+bwd ms (ops)':>17}"
          f"{'clip+AdamW ms (ops)':>21}{'EMA ms (ops)':>15}")
    for sc in args.size_classes:
        r = measure(sc, args.repeats)
        o = r["ops"]
        print(f"{sc:<7}{'x'.join(map(str, r['input'])):>9}{r['parameters']:>8}{r['weights_m']:>10}  "
              f"{r['forward_backward_ms']:>8} ({o['forward_backward']:>6}){r['optimiser_ms']:>12} ({o['optimiser']:>6})"
              f"{r['ema_ms']:>7} ({o['ema']:>5})", flush=True)


if __name__ == "__main__":
    main()
