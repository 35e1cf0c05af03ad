"""Small shared helpers: atomic writes and JSON IO.

Every file a later stage trusts is written to a temporary name in the same
folder and renamed into place, so an interrupted run never leaves a truncated
file behind under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    ``suffix`` lets writers that infer the format from the extension (SimpleITK,
    blosc2) see the right ending, e.g. ``.nii.gz``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
