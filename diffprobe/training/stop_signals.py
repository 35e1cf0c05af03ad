"""Stop signals (Ctrl-C, SIGTERM) in a distributed run: raised where every rank can still meet the others.

SIGINT and SIGTERM raise KeyboardInterrupt in a rank (torchrun and SLURM send SIGTERM), which the
trainer turns into a stop every rank agrees on (:mod:`diffprobe.training.distributed`). Where the
signal is raised matters: a training step is a stretch of collectives every rank must join in the
same order, so a signal inside one is held to the step's end (:func:`signals_deferred`), except
while the batch is read (:func:`signals_allowed`). A rank blocked in a collective cannot run Python
code at all: a watchdog thread woken by the signal exits it :data:`STOP_GRACE_S` seconds later.
Without a process group the holds are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

STOP_GRACE_S = 20.0  # a signalled rank still blocked in a collective (or its step) after this long exits hard

# received: the first stop signal; defer: open holds (agreements, steps); pending: a held signal;
# agreed: every rank raised the same stop (all are alive: they may meet once more before leaving)
state: dict[str, Any] = {"installed": False, "received": None, "previous": {}, "defer": 0, "pending": False,
                         "agreed": False}
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def raise_pending() -> None:
    """Raise the stop signal that arrived while signals were deferred, once no deferral is open."""
    if state["pending"] and not state["defer"]:
        state["pending"] = False
        raise KeyboardInterrupt(signal.Signals(state["received"]).name)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A stop signal inside the block is raised at its end (a no-op without DDP).

    For a stretch of collectives every rank must join in the same order: a training step (its batch
    and loss agreements, DDP's forward with its bucket-rebuild broadcast, the backward pass with the
    gradient all-reduce). A rank that left it on a signal would meet its peers' gradient buckets or
    broadcasts with its stop agreement, a collective mismatch that gloo answers by aborting the peer
    ("Received data size doesn't match expected size"; 1 in 15 launcher-SIGTERM runs,
    docs/distributed.md). At the block's end every rank's next collective is an agreement. The
    watchdog still ends a rank that stays in the block :data:`STOP_GRACE_S` after the signal.
    """
    if not _distributed():
        yield
        return
    state["defer"] += 1
    try:
        yield
    finally:
        state["defer"] -= 1
    raise_pending()


@contextlib.contextmanager
def signals_allowed() -> Iterator[None]:
    """Inside :func:`signals_deferred`, a stretch without collectives where a stop signal is raised at
    once: reading a batch, which may take long (a feature pool refilling itself), so that Ctrl-C does
    not wait for it; the batch's agreement, right after, then tells every rank."""
    saved = state["defer"]
    if not _distributed() or not saved:
        yield
        return
    state["defer"] = 0
    try:
        raise_pending()
        yield
    finally:
        state["defer"] = saved


def _on_stop_signal(signum: int, frame: Any) -> None:
    if state["received"] is not None:
        return  # stopping already (torchrun follows Ctrl-C with SIGTERM); the watchdog bounds it
    state["received"] = signum
    if state["defer"]:  # inside an agreement or a step: raised when it is over (raise_pending)
        state["pending"] = True
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_watchdog(read_fd: int, grace_s: float, who: str) -> None:
    """Woken by any signal's byte on the wakeup fd (written even while the main thread is blocked in
    C++): after a stop signal, give the main thread ``grace_s`` to stop, then exit the process."""
    while True:
        data = os.read(read_fd, 64)
        stops = [b for b in data if b in _STOP_SIGNALS]
        if stops:
            break
    time.sleep(grace_s)
    name = signal.Signals(stops[0]).name
    os.write(2, f"{who}: still blocked {grace_s:g} s after {name} (waiting for another rank); exiting\n".encode())
    os._exit(128 + stops[0])


def _forget_stop_signals() -> None:
    """In a forked child (a DataLoader worker): the parent's handlers and wakeup fd are not its own."""
    try:
        signal.set_wakeup_fd(-1)
        for sig, previous in state["previous"].items():
            signal.signal(sig, previous)
    except ValueError:  # forked from another thread: it cannot set signals, and never runs our handler
        pass


def install_stop_signals(grace_s: float = STOP_GRACE_S, who: str = "diffprobe") -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in this rank, with a hard exit ``grace_s`` later if
    the rank cannot react; called once a process group exists (only the main thread can)."""
    if state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    for sig in _STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current in (signal.SIG_DFL, signal.default_int_handler):  # never replace someone else's handler
            state["previous"][sig] = current
            signal.signal(sig, _on_stop_signal)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_stop_watchdog, args=(read_fd, grace_s, who), daemon=True,
                     name="diffprobe-stop-watchdog").start()
    os.register_at_fork(after_in_child=_forget_stop_signals)
    state["installed"] = True
