"""Compute budgets for the controls: what the method cost, and how many steps a rival gets for it.

The supervised-from-scratch control (``ablate controls``, row ``from_scratch``) is only fair if
it may spend as much compute as the method: the pretraining (BPR + diffusion) plus the probe.
Those times are read from the trainers' logs: the shared Trainer logs ``step`` and
``samples_per_s`` (samples since the start of the last (re)started segment over its wall time,
everything in the loop included: data, checkpoints, validation), and the checkpoint records
``samples_per_step``, so a stage took ``steps * samples_per_step / samples_per_s`` — the last
segment's throughput applied to every step, which stays right when a run was resumed. A model
installed from an archive has no logs: then a few steps of each stage are timed here on
synthetic batches of the planned shapes (data loading excluded) and scaled to the planned steps.

All times are of the machine that ran each stage; compare on one machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.training.trainer import LOG_FILENAME


def logged_seconds(folder: Path, samples_per_step: int | None = None) -> float | None:
    """Training-loop seconds of the Trainer run in ``folder`` from its log, or None without a usable log.

    ``samples_per_step`` defaults to the one recorded in the folder's final checkpoint.
    """
    log = folder / LOG_FILENAME
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("samples_per_s")]
    if not records:
        return None
    if samples_per_step is None:
        final = folder / "checkpoint_final.pt"
        if not final.is_file():
            return None
        samples_per_step = int(load_checkpoint(final, "cpu")["config"].get("samples_per_step", 1))
    last = records[-1]
    return float(last["step"]) * samples_per_step / float(last["samples_per_s"])


def _time_steps(step, n: int) -> float:
    """Seconds per call of ``step()``: one untimed warm-up call, then the mean of ``n``."""
    step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def timed_pretrain_seconds(model: PretrainedModel, device: torch.device | str = "cpu", n: int = 2) -> dict:
    """Pretraining seconds per stage estimated from ``n`` timed steps on synthetic batches of the
    planned shapes, times the planned step counts (for models without training logs)."""
    from diffprobe.diffusion import GaussianDiffusion

    plans, dev = model.plans, torch.device(device)
    out: dict[str, float] = {}
    den = model.build_denoiser().to(dev).train()
    opt = torch.optim.AdamW(den.parameters(), lr=1e-6)
    diffusion = GaussianDiffusion.from_plans(plans.raw)
    b, patch = plans.batch_size, plans.patch_size
    x0 = torch.randn(b, plans.input_channels, *patch, device=dev)
    g = torch.randn(b, den.guidance_channels, *patch, device=dev) if den.guidance_channels else None

    def diffusion_step():
        t = torch.randint(0, diffusion.num_timesteps, (b,), device=dev)
        loss = diffusion.training_loss(den, x0, g, t, torch.randn_like(x0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["diffusion"] = _time_steps(diffusion_step, n) * int(plans.stage("diffusion")["steps"])
    if model.guidance == "bpr" and model.bpr_checkpoint.is_file():
        bpr, crop = model.load_bpr(dev)
        bpr.train()
        bopt = torch.optim.AdamW(bpr.parameters(), lr=1e-6)
        crops = torch.randn(2 * max(2, b), 1, *crop, device=dev)

        def bpr_step():
            loss = bpr(crops).float().pow(2).mean()
            bopt.zero_grad()
            loss.backward()
            bopt.step()

        out["bpr"] = _time_steps(bpr_step, n) * int(plans.stage("bpr")["steps"])
    return out


def pretrain_seconds(model: PretrainedModel, device: torch.device | str = "cpu") -> tuple[float, dict]:
    """(total seconds, details) of ``model``'s pretraining: from the logs, else timed (see module doc)."""
    stages = ("bpr", "diffusion") if model.guidance == "bpr" else ("diffusion",)
    logged = {s: logged_seconds(model.stage_dir(s)) for s in stages}
    if all(v is not None for v in logged.values()):
        return float(sum(logged.values())), {"source": "training logs", **{f"{s}_seconds": v for s, v in
                                                                           logged.items()}}
    timed = timed_pretrain_seconds(model, device)
    return float(sum(timed.values())), {"source": "timed steps (no training logs)",
                                        **{f"{s}_seconds": v for s, v in timed.items()}}


def steps_within(budget_seconds: float, step_seconds: float, minimum: int = 1) -> int:
    """The number of steps of ``step_seconds`` each that fit ``budget_seconds`` (at least ``minimum``)."""
    if step_seconds <= 0:
        return minimum
    return max(minimum, int(budget_seconds // step_seconds))
