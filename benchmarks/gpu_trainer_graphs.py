"""The trainer's diffusion step, eager against ``pretrain --cuda_graphs``, on one GPU (issue 16).

GPU day 2 measured a bare step (forward, backward, AdamW) captured whole as a CUDA graph at 2.6x the
eager step's speed (paper class, H200; ``benchmarks/gpu_graphs.py``). The trainer now offers that
capture (``diffprobe.training.graphed_step``) with everything a real run adds: the split diffusion
loss (host noise, eager copies into static buffers), gradient clipping, the learning-rate schedule
on a device tensor, the EMA after each replay. This script runs the real ``Trainer`` both ways from
the same initial weights on the same batches (random patches and guidance, fixed per step) and reports:

* ms per step after the first steps (each step timed between synchronised batch reads), patches/s;
* the loss of every step, eager against graphed (largest relative difference), and the weights after
  the last step (largest difference relative to the weights' scale);
* whether the capture succeeded (``graphed.failed``);
* a third run, graphed with ``DIFFPROBE_GROUP_NORM=native``: the native GroupNorm captured instead of the
  reduction path the graphed step uses (measured GPU day 2 only as graph + reduction).

bf16 autocast differs in rounding between any two runs of different kernels, so the losses agree to
bf16 precision, not bit for bit (the CPU tests check the bit-exact logic with a stand-in capture).

    python benchmarks/gpu_trainer_graphs.py --json $OUT/gpu_trainer_graphs.json            # device
    python benchmarks/gpu_trainer_graphs.py --device cpu --dry-run --json /tmp/tg.json    # CPU: code paths
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RUNS = [("eager", False, "auto"), ("cuda_graphs", True, "auto"), ("cuda_graphs_native_norm", True, "native")]


def run_trainer(plans, device: str, graphs: bool, steps: int, seed: int = 0) -> dict:
    """``steps`` steps of the real trainer; per-step seconds, losses, final weights (on the CPU)."""
    import torch

    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.pretraining.pretrain import DiffusionLoss
    from diffprobe.pretraining.pretrained_model import build_denoiser
    from diffprobe.training.trainer import Trainer, TrainerConfig

    torch.manual_seed(seed)
    model = build_denoiser(plans, "bpr", "planned")
    cfg = plans.stage("diffusion")
    config = TrainerConfig(total_steps=steps, lr=float(cfg["lr"]), warmup_steps=2, ema_decay=float(cfg["ema_decay"]),
                           log_every=1, checkpoint_every=10 ** 9, channels_last=True, cuda_graphs=graphs)
    loss = DiffusionLoss(GaussianDiffusion.from_plans(plans.raw), seed, 0, channels_last=True)
    marks: list[float] = []
    shape = (plans.batch_size, 1, *plans.patch_size)

    def batches(start: int):
        for step in range(start, steps):
            g = torch.Generator().manual_seed(1000 + step)
            batch = {"image": torch.rand(shape, generator=g) * 2 - 1,
                     "guidance": torch.randn((shape[0], 3, *shape[2:]), generator=g)}
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            yield batch

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, loss, config, out, device, name="graphs" if graphs else "eager")
        trainer.fit(batches, show_progress=False)
    # step k's time: from batch k's read to batch k+1's (the last step also saves and plots: not counted)
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    steady = per_step[3:] or per_step
    graphed = trainer.graphed
    return {"ms_per_step": round(1e3 * statistics.median(steady), 2), "first_steps_ms": [round(1e3 * s, 1) for s in
                                                                                       per_step[:3]],
            "patches_per_s": round(plans.batch_size / statistics.median(steady), 2),
            "losses": [h["loss"] for h in trainer.history],
            "capture": None if graphed is None else (graphed.failed or "ok"),
            "weights": [p.detach().float().cpu() for p in trainer.model.parameters()]}


def compare(eager: dict, graphed: dict) -> dict:
    rel_loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager["losses"], graphed["losses"]))
    scale = max(float(w.abs().max()) for w in eager["weights"])
    weights = max(float((a - b).abs().max()) for a, b in zip(eager["weights"], graphed["weights"])) / scale
    return {"loss_max_rel_diff": rel_loss, "weights_max_diff_rel_to_scale": weights,
            "speedup": round(eager["ms_per_step"] / graphed["ms_per_step"], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny size class and patch, few steps (CPU check)")
    ap.add_argument("--size-class", default="paper")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", type=Path, default=Path("/tmp/diffprobe_gpu_trainer_graphs.json"))
    args = ap.parse_args(argv)
    import torch
    from gpu_suite_common import device_name
    from gpu_suite_train import training_plans

    args.size_class, args.patch = ("tiny", [16, 32, 32]) if args.dry_run else (args.size_class, None)
    steps = 4 if args.dry_run else args.steps
    if args.dry_run:
        torch.set_num_threads(1)
    plans = training_plans(args)
    report: dict = {"device": device_name(args.device), "torch": torch.__version__, "size_class": args.size_class,
                    "patch_size": plans.patch_size, "batch": plans.batch_size, "steps": steps}
    runs = {}
    # (name, --cuda_graphs, DIFFPROBE_GROUP_NORM): the graphed step with its reduction GroupNorm, and with the
    # native op captured instead (is the reduction path what the graph needs?)
    for name, graphs, norm in RUNS:
        os.environ["DIFFPROBE_GROUP_NORM"] = norm
        runs[name] = r = run_trainer(plans, args.device, graphs, steps)
        print(f"{name:22s}: {r['ms_per_step']:8.1f} ms/step, {r['patches_per_s']:6.2f} patches/s, "
              f"first steps {r['first_steps_ms']} ms, capture {r['capture']}", flush=True)
        report[name] = {k: v for k, v in r.items() if k != "weights"}
    os.environ["DIFFPROBE_GROUP_NORM"] = "auto"
    report["comparison"] = {name: compare(runs["eager"], runs[name]) for name, _, _ in RUNS[1:]}
    print(json.dumps(report["comparison"]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"report: {args.json}")
    return 0 if all(runs[name]["capture"] in (None, "ok") for name, _, _ in RUNS[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
