"""The shared training loop: small on purpose.

What it does and nothing more: AdamW, warm-up + cosine/poly LR, gradient clipping, AMP
(bf16 autocast on CUDA, fp32 on CPU), optional EMA weights, ``checkpoint_latest`` every N
steps and ``checkpoint_final``, exact resume (model, optimiser, scheduler, EMA, step, RNG
states) that may extend the step budget, a stop with a clear message on a non-finite loss
(the last good checkpoint is kept), a JSON-lines log, a loss-curve PNG and a progress bar.

Under DDP every rank stops together: each step's batch and loss are computed inside
``dist_utils.together`` blocks (one tiny all-reduce each), so a data error, a non-finite loss or
a Ctrl-C/SIGTERM on any rank stops every rank with the same message before the gradient
all-reduce, instead of leaving the others blocked in it (``diffprobe.training.distributed``).

Stage-specific work stays outside: the caller passes ``loss_fn(model, batch, step)`` and a
``batches(start_step)`` iterator. Randomness that affects the result is expected to come
from generators seeded by (seed, step, rank) inside those callables, which makes resumed
runs equal uninterrupted ones regardless of worker processes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.parallel import progress_bar
from diffprobe.training import distributed as dist_utils
from diffprobe.training import graphed_step, stop_signals
from diffprobe.training.checkpoint import (
    load_checkpoint,
    load_state_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from diffprobe.utils import atomic_path, remove_interrupted_writes, save_figure

LOG_FILENAME = "training_log.jsonl"
LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainerConfig:
    total_steps: int
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # or "poly"
    grad_clip: float = 1.0
    ema_decay: float | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    samples_per_step: int = 1  # for patches/s reporting
    compile: bool = False  # torch.compile the model's forward (GPU runs; slow to compile on CPU)
    channels_last: bool = False  # channels_last_3d memory format (faster cuDNN 3D convs on GPU)
    cuda_graphs: bool = False  # CUDA: replay the whole step from one graph (training.graphed_step); needs a SplitLoss
    validate_every: int = 0  # run the validation callback every N steps (and at the end); 0 = never
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in checkpoints (preset, stage, plans...)


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "poly":
        return (1 - progress) ** 0.9
    return 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The floating-point tensors move in one multi-tensor ``lerp`` (``torch._foreach_lerp_``: one fused
    launch per chunk on a GPU) rather than one ``lerp_`` per tensor, read through ``parameters()`` and
    ``buffers()`` rather than ``state_dict()`` (a ``detach`` per tensor): the old update dispatched ~1100
    operator calls per step for the `tiny` denoiser, ~2000 for `paper` (``benchmarks/bench_step_overhead.py``)
    -- host time a GPU step waits for. Same arithmetic, bit for bit (on a CPU the multi-tensor call runs
    the per-tensor kernel).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # parameters, then buffers: the same order in the copy as in the model (no state_dict: its
        # per-tensor detach is host time too)
        averaged: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for e, m in zip([*self.model.parameters(), *self.model.buffers()], [*model.parameters(), *model.buffers()]):
            if e.dtype.is_floating_point:
                averaged[0].append(e)
                averaged[1].append(m)
            else:
                e.copy_(m)
        if averaged[0]:
            torch._foreach_lerp_(*averaged, 1 - self.decay)


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: LossFn, config: TrainerConfig, out_dir: str | Path,
                 device: torch.device | str = "cpu", name: str = "model",
                 validate: Callable[[nn.Module], dict[str, float]] | None = None):
        self.cfg = config
        self.validate = validate  # model -> {"val_...": value}; must not touch the global RNGs
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.name = name
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.loss_fn = loss_fn
        self.wrapped = dist_utils.wrap_ddp(self.model, self.device)
        if config.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.cfg))
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay else None
        self.graphed: graphed_step.GraphedStep | None = None
        if config.cuda_graphs and self.device.type == "cuda":  # no effect on a CPU, as predict's setting
            graphed_step.check_supported(dist_utils.is_distributed(), config.compile)
            self.graphed = graphed_step.GraphedStep(
                self.model, self.optimizer, loss_fn, config.grad_clip, self.device,  # type: ignore[arg-type]
                torch.bfloat16 if config.amp else None)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded

    # ---- files -------------------------------------------------------------------------
    @property
    def latest_path(self) -> Path:
        return self.out_dir / "checkpoint_latest.pt"

    @property
    def final_path(self) -> Path:
        return self.out_dir / "checkpoint_final.pt"

    def _payload(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema else None,
            "optimizer": graphed_step.portable_optimizer_state(self.optimizer.state_dict()),
            "scheduler": graphed_step.portable_scheduler_state(self.scheduler.state_dict()),
            "rng": rng_state(),
            "config": json.loads(json.dumps(asdict(self.cfg))),
            "history": self.history,
        }

    def save(self, path: Path) -> None:
        # together, not a barrier: a failed write on rank 0 (disk full) stops every rank with its message
        with dist_utils.together(f"{self.name}: writing {path.name}"):
            if dist_utils.is_main_process():
                save_checkpoint(path, self._payload())

    def resume(self) -> bool:
        """Load the newest checkpoint if there is one. The configured total_steps may exceed the saved one.

        ``checkpoint_latest`` is never older than ``checkpoint_final`` (the end of a run writes latest,
        then final; a run that extends the budget rewrites latest first), so it is preferred; final
        alone is enough too (e.g. an installed model).
        """
        path = self.latest_path if self.latest_path.is_file() else self.final_path
        if not path.is_file():
            return False
        ckpt = load_checkpoint(path, self.device)
        # checked: a checkpoint_latest.pt of another network is one clear message, not PyTorch's key list
        load_state_checked(self.model, ckpt["model"], path, "the same command without --c")
        if self.ema and ckpt.get("ema") is not None:
            load_state_checked(self.ema.model, ckpt["ema"], path, "the same command without --c")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.resumed_from = path
        return True

    def _final_is_current(self) -> bool:
        """Whether ``checkpoint_final`` holds this trainer's step (it may be missing or older when a run
        was killed between writing ``checkpoint_latest`` and ``checkpoint_final`` at its end)."""
        if not self.final_path.is_file():
            return False
        return int(load_checkpoint(self.final_path, "cpu")["step"]) == self.step

    def _plots_missing(self) -> bool:
        validated = any(k.startswith("val_") for h in self.history for k in h)
        return bool(self.history) and not ((self.out_dir / "loss_curve.png").is_file() and (
            not validated or (self.out_dir / "validation_curve.png").is_file()))

    def _prepare_out_dir(self) -> None:
        """Make the folder match the state training continues from (main process only).

        A killed run may leave temporary files of interrupted writes (``.<name>.<random>.tmp*``;
        never trusted, since only complete files are renamed into place) and log lines of steps
        after its last checkpoint, which the resumed run logs again: the temporary files are
        removed and ``training_log.jsonl`` is rewritten from the resumed history.
        """
        remove_interrupted_writes(self.out_dir)
        log = self.out_dir / LOG_FILENAME
        if self.history:
            with atomic_path(log, ".jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        else:
            log.unlink(missing_ok=True)

    # ---- loop --------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.cfg.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def apply_gradients(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``: backward, clipping, AdamW, schedule, EMA (also timed by
        compute-budget planning, which must measure exactly this)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)

    def replayed_step(self, batch: Any) -> torch.Tensor | None:
        """This step from its CUDA graph (loss, backward, clipping, AdamW), then the schedule and the EMA; None
        without a graph (no ``cuda_graphs``, a CPU, a failed capture): the caller then steps eagerly. Also
        timed by compute-budget planning, when the plans ask for graphs."""
        loss = self.graphed(batch, self.step) if self.graphed is not None else None
        if loss is None:
            return None
        self._stop_unless_finite(loss)
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        return loss

    def fit(self, batches: Callable[[int], Iterator[Any]], show_progress: bool = True) -> list[dict[str, float]]:
        """Train from ``self.step`` to ``cfg.total_steps``; ``batches(start)`` yields the batch of each step."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = dist_utils.is_main_process()
        if main:
            self._prepare_out_dir()
        if self.step >= self.cfg.total_steps:
            # killed after the last checkpoint_latest, before checkpoint_final: write the final one now
            if dist_utils.main_process_value(main and not self._final_is_current()):
                self.save(self.final_path)
            if main and self._plots_missing():  # killed after checkpoint_final, before the figures
                self.plot_losses()
            return self.history
        self.model.train()
        it = batches(self.step)
        clock = {"start": time.perf_counter(), "samples": 0}  # for patches/s
        with progress_bar() as progress:
            if self.resumed_from is not None and show_progress and main:
                progress.console.print(f"{self.name}: resumed from step {self.step} ({self.resumed_from.name})",
                                       highlight=False)
            task = progress.add_task(f"{self.name}", total=self.cfg.total_steps, completed=self.step,
                                     visible=show_progress and main)
            try:
                while self.step < self.cfg.total_steps:
                    # a stop signal ends the step first: every rank then meets the others at an agreement
                    with stop_signals.signals_deferred():
                        self._step(it, clock, lambda **kw: progress.update(task, **kw))
            except BaseException as e:  # one rank's error anywhere in the step (a peer lost in the gradient
                # all-reduce, a signal, a log write): announced, so that every rank stops with it
                dist_utils.stop_together(f"{self.name} step {self.step}", e)
        self.save(self.latest_path)
        self.save(self.final_path)
        if main:
            self.plot_losses()
        return self.history

    def _step(self, it: Iterator[Any], clock: dict[str, float], update: Callable[..., None]) -> None:
        """One optimiser step, then its log record, validation and checkpoint as configured."""
        batch = self._next_batch(it)
        loss, metrics = self.replayed_step(batch), {}
        if loss is None:
            loss, metrics = self._loss_of(batch)
            self.apply_gradients(loss)
        self.step += 1
        clock["samples"] += self.cfg.samples_per_step
        final = self.step == self.cfg.total_steps
        validate_now = self.validate is not None and self.cfg.validate_every > 0 and (
            final or self.step % self.cfg.validate_every == 0)
        if self.step % self.cfg.log_every == 0 or final or validate_now:
            elapsed = time.perf_counter() - clock["start"]
            record = {"step": self.step, "loss": float(loss.item()), "lr": float(self.scheduler.get_last_lr()[0]),
                      "samples_per_s": clock["samples"] / max(elapsed, 1e-9), **metrics}
            if validate_now:
                with dist_utils.together(f"{self.name} validation at step {self.step}"):
                    record.update(self._run_validation())
            self.history.append(record)
            if dist_utils.is_main_process():
                self._log(record)
            update(description=f"{self.name} loss {record['loss']:.4f} {record['samples_per_s']:.1f} patches/s")
        update(completed=self.step)
        if self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.total_steps:
            self.save(self.latest_path)

    def _next_batch(self, it: Iterator[Any]) -> Any:
        """This step's batch, every rank agreeing that all ranks have one: DDP's forward may itself run
        collectives (buffer broadcast, bucket rebuild) that a rank without a batch never joins."""
        with dist_utils.together(f"{self.name} step {self.step} (reading the batch)"):
            try:
                with stop_signals.signals_allowed():  # a long read (a feature pool refilling) stops at once
                    return next(it)
            except Exception as e:  # a DiffprobeError in a loader process arrives wrapped in its traceback
                user = dist_utils.worker_user_error(e)
                if user is None:
                    raise
                raise user from e

    def _loss_of(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """This step's loss, every rank agreeing that all ranks have a finite one before the backward
        pass averages a NaN into every rank's gradients (a no-op agreement without DDP)."""
        with dist_utils.together(f"{self.name} step {self.step}"):
            with self._autocast():
                loss, metrics = self.loss_fn(self.wrapped, batch, self.step)
            self._stop_unless_finite(loss)
        return loss, metrics

    def _stop_unless_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise DiffprobeError(
                f"{self.name}: loss became {loss.item()} at step {self.step}; training stopped, the last good "
                f"checkpoint ({self.latest_path.name}) is kept", self.out_dir,
                "lower the learning rate (or check the data for extreme values) and resume with --c")

    def _run_validation(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                return dict(self.validate(self.model))
        finally:
            self.model.train()

    def _log(self, record: dict[str, float]) -> None:
        with open(self.out_dir / LOG_FILENAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot_losses(self) -> Path | None:
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        keys = [k for k in self.history[-1] if k not in ("step", "lr", "samples_per_s") and not k.startswith("val_")]
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            ax.plot(steps, [h.get(k, float("nan")) for h in self.history], label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if all(h["loss"] > 0 for h in self.history) else "linear")
        ax.set_title(self.name)
        ax.legend()
        fig.tight_layout()
        path = save_figure(fig, self.out_dir / "loss_curve.png", dpi=100)
        self._plot_validation()
        return path

    def _plot_validation(self) -> Path | None:
        """``validation_curve.png``: every ``val_*`` metric against the step (e.g. Dice per class)."""
        rows = [h for h in self.history if any(k.startswith("val_") for k in h)]
        if not rows:
            return None
        import matplotlib.pyplot as plt

        keys = sorted({k for h in rows for k in h if k.startswith("val_")})
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            ax.plot([h["step"] for h in rows], [h.get(k, float("nan")) for h in rows], marker="o", label=k[4:])
        ax.set_xlabel("step")
        ax.set_ylabel("validation")
        ax.set_title(f"{self.name}: validation")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return save_figure(fig, self.out_dir / "validation_curve.png", dpi=100)
