"""torchrun / DDP helpers. Without torchrun everything degrades to a single process.

``torchrun --nproc_per_node N diffprobe pretrain ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
NCCL is used on GPUs, gloo on CPU. Only rank 0 writes checkpoints and logs (derived caches such
as the BPR maps are written by the rank that computed them).

Stopping together. A rank that stops alone leaves the others blocked in their next collective,
until the process-group timeout or, for some NCCL failures, for good. So:

- :class:`together` wraps a block every rank runs (a training step's batch and loss, a share of
  the BPR maps, a checkpoint write): at its end one small all-reduce tells every rank whether any
  rank's block failed, and then every rank raises the same error (:class:`RankStopped`, a
  :class:`~diffprobe.errors.DiffprobeError`, exit 1) or, when a rank was interrupted (Ctrl-C,
  SIGTERM), prints the same line and raises :class:`RanksInterrupted` (a KeyboardInterrupt: the
  CLI's "interrupted", exit 130). A collective that fails because a peer is gone raises
  :class:`LostContact`.
- SIGTERM is handled like Ctrl-C in a distributed run (it is what torchrun and SLURM send), so a
  stopped rank takes the path above. A rank blocked in a collective cannot run Python's handler:
  a watchdog thread, woken by the signal itself, exits such a rank
  :data:`~diffprobe.training.stop_signals.STOP_GRACE_S` seconds later;
  a signal during a training step is held to the step's end (:mod:`diffprobe.training.stop_signals`).
- Every collective waits at most the process group's timeout, set explicitly at
  ``init_process_group`` from ``DIFFPROBE_DDP_TIMEOUT_MINUTES`` (default 30; docs/distributed.md).

Leaving together. :func:`shutdown` (the console script calls it before it exits) frees the process group
while the interpreter is alive: after a successful command the ranks first meet in a barrier, so no
rank tears its connections down while a peer still writes its reports, then the group is destroyed.
A gloo rank that exited while its peer was still busy aborted now and then at exit ("terminate called
without an active exception", SIGABRT; 2 of 64 two-rank runs of the resume test, docs/distributed.md),
which torchrun reports as a failed run.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.training import stop_signals
from diffprobe.training.stop_signals import install_stop_signals

TIMEOUT_ENV = "DIFFPROBE_DDP_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 30.0
_OK, _FAILED, _INTERRUPTED = 0, 1, 2
RESUME_FIX = "rerun the same command with --c to continue from the last checkpoint"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(success: bool = True) -> None:
    """Free the process group before the process exits (see the module doc); a no-op without DDP.

    ``success``: every rank finished its command (they stop together), so they wait for each other in
    a barrier first; so they do after a stop every rank agreed on (:class:`RankStopped`,
    :class:`RanksInterrupted`: 1 SIGABRT at exit in 21 two-rank SIGTERM runs without it). After any
    other error a peer may be gone, and the group is only destroyed.
    """
    if not is_distributed():
        return
    import gc

    gc.collect()  # DDP wrappers of finished trainers hold the group: released here, not at finalization
    try:
        if success or stop_signals.state["agreed"]:
            dist.barrier()
    except RuntimeError:  # a peer is gone after all: nothing left to wait for
        pass
    finally:
        dist.destroy_process_group()


def main_process_value(value):
    """Rank 0's ``value`` on every rank, so that all ranks take the same branch around a collective
    (e.g. a save with a barrier decided from a file only rank 0 reads)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` without DDP)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def balanced_shares(costs: list[float], ranks: int | None = None) -> list[list[int]]:
    """Indices of ``costs`` split into one share per rank, the largest first onto the least loaded
    rank (deterministic: every rank computes the same shares without talking)."""
    ranks = ranks or world_size()
    shares: list[list[int]] = [[] for _ in range(ranks)]
    load = [0.0] * ranks
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += costs[i]
    return [sorted(s) for s in shares]


def timeout_minutes() -> float:
    """The longest any collective waits (``DIFFPROBE_DDP_TIMEOUT_MINUTES``, default 30): long enough
    for rank 0's checkpoint writes and reports, short enough that a lost rank is noticed."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_MINUTES
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise DiffprobeError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of minutes",
                             fix=f"set e.g. {TIMEOUT_ENV}=60, or unset it (default {DEFAULT_TIMEOUT_MINUTES:g})")
    return value


def init_from_env(device: str) -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes()))
        install_stop_signals(who=f"diffprobe rank {rank()}")
    if device.startswith("cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ---- stopping together -----------------------------------------------------------------------
class RankStopped(DiffprobeError):
    """One rank's error, raised on every rank with the same message."""


class LostContact(DiffprobeError):
    """A collective failed: another rank is gone (crashed, killed) or did not answer within the timeout."""


class RanksInterrupted(KeyboardInterrupt):
    """A rank was interrupted (Ctrl-C, SIGTERM); raised on every rank after the same message."""


_AGREED = (RankStopped, LostContact, RanksInterrupted)  # already raised on every rank: not agreed again


def lost_contact(context: str, error: BaseException) -> LostContact:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return LostContact(f"{context}: rank {rank()} of {world_size()} lost contact with the other ranks ({first}); "
                       f"another rank stopped (crashed, was killed or interrupted) or a collective waited longer "
                       f"than the timeout ({timeout_minutes():g} min)",
                       fix="read the other ranks' messages (the first error is the cause); raise "
                           f"{TIMEOUT_ENV} if a phase legitimately takes longer; {RESUME_FIX}")


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _worker_error(error: BaseException) -> tuple[str, str | None, bool] | None:
    """(what, fix, user error?) of an exception a DataLoader worker raised, or None for any other.

    The worker's exception comes back with the worker's traceback as its message (as a
    DiffprobeError whose ``what`` is that text, or a RuntimeError): its last unindented line is
    the original exception, and a DiffprobeError's "fix:" line comes after it.
    """
    lines = str(error).strip().splitlines()
    if not any(line.startswith("Original Traceback") for line in lines):
        return None
    start = max(i for i, line in enumerate(lines) if line and not line[0].isspace())
    kind, _, text = lines[start].partition(": ")
    fixes = [line.strip()[len("fix: "):] for line in lines[start + 1:] if line.strip().startswith("fix: ")]
    user = kind.startswith("diffprobe.errors.")
    what = text if user else f"{kind.rsplit('.', 1)[-1]}: {text} (in a data-loading worker)"
    return what, (fixes[0] if fixes else None), user


def worker_user_error(error: BaseException) -> DiffprobeError | None:
    """The DiffprobeError a DataLoader worker raised, rebuilt as one clean message (its file is part of
    the text), or None when ``error`` is not one: the user then reads the error, not a traceback."""
    found = _worker_error(error)
    return DiffprobeError(found[0], fix=found[1]) if found is not None and found[2] else None


def _payload(error: BaseException) -> tuple[int, dict[str, str | None]]:
    if isinstance(error, KeyboardInterrupt):
        received = stop_signals.state["received"]
        how = f"received {signal.Signals(received).name}" if received else "was interrupted"
        return _INTERRUPTED, {"what": how, "file": None, "fix": None}
    worker = _worker_error(error)
    if worker is not None and worker[2]:
        return _FAILED, {"what": worker[0], "file": None, "fix": worker[1]}
    if isinstance(error, DiffprobeError) and worker is None:
        return _FAILED, {"what": error.what, "file": error.file, "fix": error.fix}
    traceback.print_exception(error, file=sys.stderr)  # a bug stays visible on the rank where it happened
    what = worker[0] if worker else (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    return _FAILED, {"what": what, "file": None, "fix": f"see the traceback rank {rank()} printed above"}


def _agree(context: str, error: BaseException | None) -> None:
    """Every rank calls this at the same point; returns only when no rank reports an error."""
    code, payload = _payload(error) if error is not None else (_OK, None)
    if payload is not None:
        payload["context"] = context  # the message names where the failing rank was, on every rank
    n, me = world_size(), rank()
    stop_signals.state["defer"] += 1  # a signal now would leave the other ranks in this collective: it waits
    try:
        codes = torch.zeros(n, dtype=torch.int64, device=_collective_device())
        codes[me] = code
        dist.all_reduce(codes)
        payloads = gather_objects(payload) if bool(codes.any()) else None
    except Exception as e:  # gloo/NCCL: a peer is gone or the timeout passed (RuntimeError); a truncated or
        # mismatched message fails to unpickle in gather_objects (EOFError, UnpicklingError)
        raise lost_contact(context, e) from (error or e)
    finally:
        stop_signals.state["defer"] -= 1
    if payloads is None:
        stop_signals.raise_pending()  # arrived during the agreement: raised now, announced at the next one
        return
    codes_list = [int(c) for c in codes.tolist()]
    failed = [r for r, c in enumerate(codes_list) if c]
    first = failed[0]
    others = f" (rank {', '.join(map(str, failed[1:]))} stopped too)" if len(failed) > 1 else ""
    p = payloads[first]
    stop_signals.state["agreed"] = True
    if codes_list[first] == _INTERRUPTED:
        message = f"{p['context']}: rank {first} of {n} {p['what']}{others}; all {n} ranks stop"
        print(message, file=sys.stderr, flush=True)
        raise RanksInterrupted(message) from error
    raise RankStopped(f"rank {first} of {n}: {p['what']}{others}; all {n} ranks stopped", p["file"],
                      p["fix"]) from error


class together:  # noqa: N801  (used like a function: ``with together("..."):``)
    """A block every rank runs; whether any rank's block failed is agreed at its end (see module doc).

    Without DDP it is transparent: an exception passes unchanged. With DDP an exception in one
    rank's block becomes the same error on every rank (``context`` names the phase, e.g.
    ``"diffusion step 7"``); every rank must enter the same blocks in the same order.
    """

    def __init__(self, context: str):
        self.context = context

    def __enter__(self) -> together:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not is_distributed() or isinstance(exc, _AGREED):
            return False
        _agree(self.context, exc)
        return False


def stop_together(context: str, error: BaseException) -> None:
    """Raise ``error`` so that every rank stops: announced to the ranks at their next :class:`together`
    (or, if they wait in another collective, it fails with :class:`LostContact` or times out)."""
    if not is_distributed() or isinstance(error, _AGREED):
        raise error
    _agree(context, error)
    raise error  # not reached: _agree raises when this rank reports an error
