"""Advisory folder locks, so that two runs writing the same outputs refuse instead of clobbering.

``plan_and_preprocess`` rewrites plans.json and the preprocessed cases of a dataset: two runs
on one dataset at once (two terminals, two cluster jobs) would race on the same files. The
second run refuses at once with a message naming the holder's pid, instead of waiting
silently behind a job that may take an hour.

The lock is an OS-level ``flock`` on a ``.lock`` file in the output folder: the kernel drops
it when the holder exits however it exits (SIGKILL included), so a killed run never leaves a
stale lock that blocks the rerun. The file itself (holding the last holder's pid and command)
is left in place; its existence means nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.utils import write_error

LOCK_FILENAME = ".lock"

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return f" ({text})"
    return ""


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the block, or raise a :class:`DiffprobeError`.

    ``what`` names the operation for the message (e.g. ``"plan_and_preprocess of Dataset001_X"``).
    Not re-entrant across processes by design; within one process a nested lock on the same
    folder also refuses (``flock`` locks belong to open file descriptions), so callers take it
    once, at the top of the operation.
    """
    folder = Path(folder)
    path = folder / LOCK_FILENAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only or full output root: one message naming it, no traceback
        raise write_error(e, path) from None
    try:
        if not _try_lock(fd):
            raise DiffprobeError(f"another {what} is running on this folder{_holder(path)}", folder,
                                 "wait for it to finish (or stop it), then run again; runs on one dataset "
                                 "cannot overlap")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
