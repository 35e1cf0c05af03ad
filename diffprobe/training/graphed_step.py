"""A training step captured once as a CUDA graph and replayed (``pretrain --cuda_graphs``).

Why: on the second GPU day (H200, paper class, docs/performance.md "GPU day 2") the eager diffusion
step took 76-112 ms, most of it the host issuing ~12 000 small kernels; the same step captured whole
(forward, backward, AdamW) as one CUDA graph took 43.7 ms, 2.6x faster. This module gives the
trainer that step.

What is captured, in the eager order: ``zero_grad`` (to None: the captured backward then writes
fresh gradients on every replay), the loss body under bf16 autocast (its weight-cast cache off: a
cached cast would be freed when the autocast context ends, which a replay still reads), the backward
pass, gradient clipping and AdamW. GroupNorm takes its reduction path (``models.group_norm``) inside
the captured step, as in the measured one: under autograd that path is ~20 small kernels per norm,
which an eager step pays for in launches and a graph replays at once.

What stays eager, around each replay: reading the batch and drawing the timesteps and noise
(:class:`SplitLoss.inputs`: host generators seeded by (seed, step, rank), so the same bits as without
graphs), copying them into the graph's static buffers, the learning-rate schedule (it writes AdamW's
learning rate, a device tensor under capture, in place), the EMA update and the finite-loss check. A
replayed step has already updated the weights when its loss turns out non-finite; the run then stops
before anything is saved, so the last good checkpoint is kept, as without graphs.

Warm-up: cuBLAS and cuDNN need a few eager iterations on a side stream before a capture, and those
iterations train. So the parameters, buffers and optimiser state are saved before and written back
after, in place (the graph holds their addresses); an optimiser that had no state yet gets AdamW's
initial one back (step 0, zero moments). The run thus trains exactly the steps it would without
graphs.

A capture that fails (an operator that cannot be captured, a driver without graph support) is
restored as above, reported once, and training goes on eagerly. Not with several processes (DDP's
gradient all-reduce) or ``torch.compile``: :func:`check_supported` refuses those combinations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from diffprobe.devices import capture_cuda_graph
from diffprobe.errors import DiffprobeError
from diffprobe.models.group_norm import reduction_under_autograd

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps on a side stream before the capture (as PyTorch's whole-network example)


class SplitLoss(Protocol):
    """A loss in two parts: ``inputs`` (host work: batch to device, random draws) and ``body`` (device
    work only, capturable). ``loss(model, batch, step)`` must equal ``body(model, inputs(...))``."""

    def inputs(self, batch: Any, step: int, device: torch.device) -> dict[str, Tensor | None]: ...

    def body(self, model: nn.Module, inputs: dict[str, Tensor | None]) -> Tensor: ...


Capture = Callable[[Callable[[], Tensor], torch.device], tuple[Callable[[], None], Tensor]]


def check_supported(distributed: bool, compiled: bool) -> None:
    """Refuse graphs where they cannot work: a clear message, not a failed capture mid-run."""
    if distributed:
        raise DiffprobeError("--cuda_graphs works in one process only: DDP's gradient all-reduce is not captured",
                             fix="drop --cuda_graphs under torchrun, or run one process on one GPU")
    if compiled:
        raise DiffprobeError("--cuda_graphs and --compile cannot be combined",
                             fix="use one of them (torch.compile's mode='reduce-overhead' captures graphs itself)")


def capture_on_cuda(body: Callable[[], Tensor], device: torch.device) -> tuple[Callable[[], None], Tensor]:
    """``body`` warmed up and recorded as one CUDA graph (``devices.capture_cuda_graph``): (replay, static loss)."""
    graph, loss = capture_cuda_graph(body, device, WARMUP_STEPS)
    return graph.replay, loss


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """AdamW in its capturable form on ``device``: the learning rate a device tensor (the schedule fills it
    in place), the step counters on the device. Same arithmetic; done after any resume."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


def portable_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser ``state_dict`` as the eager AdamW would save it (learning rate a float, not capturable), so
    that a checkpoint of a graphed run resumes anywhere, on a CPU too. Unchanged when there is nothing to do."""
    groups = state.get("param_groups", [])
    if not any(g.get("capturable") or isinstance(g.get("lr"), Tensor) for g in groups):
        return state
    fixed = [{**g, "capturable": False, "lr": float(g["lr"])} for g in groups]
    return {**state, "param_groups": fixed}


def portable_scheduler_state(state: dict[str, Any]) -> dict[str, Any]:
    """An LR scheduler's ``state_dict`` with its last learning rates as floats (they are device tensors once
    the optimiser is capturable), as the eager run saves it."""
    return {**state, "_last_lr": [float(v) for v in state["_last_lr"]]}


class GraphedStep:
    """``step(batch, step) -> loss``: one whole optimiser step (loss, backward, clipping, AdamW) of ``model``
    replayed from a graph captured at the first call; None after a failed capture (the caller then runs
    the step eagerly, as from then on). ``capture`` is :func:`capture_on_cuda` (tests pass a stand-in)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: SplitLoss, grad_clip: float,
                 device: torch.device, autocast_dtype: torch.dtype | None,
                 capture: Capture = capture_on_cuda) -> None:
        if not (callable(getattr(loss, "inputs", None)) and callable(getattr(loss, "body", None))):
            raise TypeError(f"a graphed step needs a SplitLoss (inputs + body), got {type(loss).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.grad_clip = grad_clip
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.capture = capture
        self.static: dict[str, Tensor | None] | None = None
        self.replay: Callable[[], None] | None = None
        self.static_loss: Tensor | None = None
        self.failed: str | None = None

    def _body(self) -> Tensor:
        """The captured step, on the static inputs: exactly the eager trainer's loss and ``apply_gradients`` up
        to AdamW (the schedule and the EMA follow the replay)."""
        assert self.static is not None
        self.optimizer.zero_grad(set_to_none=True)
        with reduction_under_autograd(), torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                cache_enabled=False):
            loss = self.loss.body(self.model, self.static)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def _model_tensors(self) -> list[Tensor]:
        return [t.detach() for t in (*self.model.parameters(), *self.model.buffers())]

    def _state(self) -> tuple[list[Tensor], dict[Tensor, dict[str, Any]]]:
        saved = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                 for p, s in self.optimizer.state.items()}
        return [t.clone() for t in self._model_tensors()], saved

    def _restore(self, saved: tuple[list[Tensor], dict[Tensor, dict[str, Any]]]) -> None:
        """Undo the warm-up's training, in place: the captured graph keeps these tensors' addresses."""
        values, optimizer_state = saved
        with torch.no_grad():
            for t, v in zip(self._model_tensors(), values):
                t.copy_(v)
            for p, state in self.optimizer.state.items():
                before = optimizer_state.get(p)
                for key, value in state.items():
                    if not isinstance(value, Tensor):
                        continue
                    if before is None:
                        value.zero_()  # AdamW's initial state: step 0, zero moments
                    else:
                        value.copy_(before[key])

    def _capture(self, inputs: dict[str, Tensor | None]) -> None:
        self.static = {k: None if v is None else torch.empty_like(v).copy_(v) for k, v in inputs.items()}
        if self.device.type == "cuda":
            make_capturable(self.optimizer, self.device)
        saved = self._state()
        try:
            self.replay, self.static_loss = self.capture(self._body, self.device)
        finally:
            self._restore(saved)

    def __call__(self, batch: Any, step: int) -> Tensor | None:
        if self.failed:
            return None
        inputs = self.loss.inputs(batch, step, self.device)
        if self.replay is None:
            try:
                self._capture(inputs)
            except RuntimeError as e:  # the restore above already ran: the step is done eagerly instead
                self.failed = f"{type(e).__name__}: {e}"
                self.replay = self.static = self.static_loss = None
                log.warning("CUDA graph capture of the training step failed (%s); training without graphs",
                            self.failed[:300])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the aborted capture's work is done before eager steps
                return None
        assert self.static is not None and self.replay is not None and self.static_loss is not None
        for key, value in inputs.items():
            buffer = self.static[key]
            if (buffer is None) != (value is None) or (buffer is not None and buffer.shape != value.shape):
                raise ValueError(f"input {key!r} changed shape since the capture: a graph replays fixed shapes")
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        self.replay()
        return self.static_loss.clone()
