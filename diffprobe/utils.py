"""Small shared helpers: atomic writes and JSON IO.

Every file a later stage trusts is written to a temporary name in the same
folder and renamed into place, so an interrupted run never leaves a truncated
file behind under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffprobe.errors import DiffprobeError


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    ``suffix`` lets writers that infer the format from the extension (SimpleITK,
    blosc2) see the right ending, e.g. ``.nii.gz``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    except OSError as e:
        raise write_error(e, final) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise write_error(e, final) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_interrupted_write(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_path` (``.<name>.<random>.tmp<suffix>``).

    Such a file exists after a write was interrupted (kill, power loss); it is never trusted, since
    only complete files are renamed into place, and may be deleted by whoever owns its folder.
    """
    return path.name.startswith(".") and ".tmp" in path.name


def remove_interrupted_writes(folder: Path) -> None:
    """Delete the temporary files of interrupted :func:`atomic_path` writes directly in ``folder``.

    Only for a folder no other process is writing to at the same time (its owner holds a lock
    or is the only writer), since a running writer's temporary file looks the same.
    """
    for f in folder.iterdir():
        if f.is_file() and is_interrupted_write(f):
            f.unlink(missing_ok=True)


# Write failures the user fixes (disk, quota, permissions, a file where a folder should be),
# not bugs: they become one message naming the file instead of a traceback.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                      errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def write_error(e: OSError, final: Path) -> Exception:
    """The user-facing error for a failed write of ``final`` (``e`` itself when it is not one).

    Why: a full disk or a read-only output folder is an environment problem the user fixes;
    it must say which file could not be written, and that the previous version (if any) is
    intact, since the atomic rename never happened.
    """
    if e.errno not in ENVIRONMENT_ERRNOS:
        return e
    kept = " (its previous version is unchanged)" if final.is_file() else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiffprobeError(f"disk full while writing this file{kept}", final,
                              f"free space on {final.parent} (or its quota) and rerun the same command")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return DiffprobeError(f"cannot write this file: a parent of it is a file, not a folder ({e.strerror})",
                              final, "choose an output location inside a folder")
    return DiffprobeError(f"cannot write this file ({e.strerror}){kept}", final,
                          f"make {final.parent} writable or choose another output folder")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        f.write(dumps_readable(obj))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_figure(fig: Any, path: str | Path, dpi: int = 80) -> Path:
    """Save a matplotlib figure atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def dumps_readable(obj: Any, indent: int = 2, _level: int = 0) -> str:
    """JSON with objects indented but short lists of scalars (shapes, spacings) on one line."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps_readable(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        flat = json.dumps(list(obj))
        if len(flat) <= 100 or all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return flat
        items = [f"{inner}{dumps_readable(v, indent, _level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
