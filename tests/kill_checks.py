"""Checks of a killed run's files: every file a later stage reads is whole, and a rerun's outputs equal
an uninterrupted run's (bitwise where the format allows). Used by :mod:`kill_harness` after each stop and
by the kill-and-resume tests to compare stages."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# atomic_path's temporary names: ".<final name>.<random>.tmp<suffix>"
TEMP_RE = re.compile(r"^\..+\.tmp")
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def is_temp(path: Path) -> bool:
    return bool(TEMP_RE.match(path.name))


# ---- checking files -------------------------------------------------------------------------
@dataclass
class TreeCheck:
    """What :func:`check_tree` read: counts per kind, temporary files found, problems."""

    counts: dict[str, int] = field(default_factory=dict)
    temps: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checkpoint_steps: dict[Path, int] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"read {kinds}; {len(self.temps)} temp file(s)"


def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(IMAGE_ENDINGS):
        return "image"
    return {".json": "json", ".jsonl": "jsonl", ".pt": "checkpoint", ".b2nd": "b2nd", ".png": "png",
            ".npz": "npz"}.get(path.suffix)


def check_file(path: Path) -> int | None:
    """Read ``path`` completely as its kind demands; raise if it is truncated or malformed.
    Returns a checkpoint's step."""
    kind = _kind(path)
    if kind == "json":
        json.loads(path.read_text())
    elif kind == "jsonl":
        for line in path.read_text().splitlines():
            json.loads(line)
    elif kind == "checkpoint":
        import torch

        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "format" not in payload:
            raise ValueError("not a diffprobe checkpoint")
        return int(payload["step"]) if "step" in payload else None
    elif kind == "b2nd":
        import blosc2

        np.asarray(blosc2.open(urlpath=str(path), mode="r")[...])
    elif kind == "image":
        import SimpleITK as sitk

        sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    elif kind == "png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    elif kind == "npz":
        with np.load(path) as z:
            for k in z.files:
                np.asarray(z[k])
    return None


def check_tree(root: Path) -> TreeCheck:
    """Read every finished file under ``root`` (temporary files are only listed)."""
    result = TreeCheck()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if is_temp(path):
            result.temps.append(path)
            continue
        kind = _kind(path)
        if kind is None or path.name.startswith("."):
            continue
        try:
            step = check_file(path)
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            result.problems.append(f"{path.relative_to(root)}: {type(e).__name__}: {str(e)[:200]}")
            continue
        result.counts[kind] = result.counts.get(kind, 0) + 1
        if step is not None:
            result.checkpoint_steps[path] = step
    return result


def finished_files(root: Path) -> set[str]:
    """Relative paths of the non-hidden files under ``root``."""
    if not root.is_dir():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


# ---- comparing with the reference -----------------------------------------------------------
def assert_same_files(ref: Path, got: Path, ignore: Callable[[str], bool] = lambda _: False) -> None:
    a = {f for f in finished_files(ref) if not ignore(f)}
    b = {f for f in finished_files(got) if not ignore(f)}
    assert a == b, f"{got}: missing {sorted(a - b)}, extra {sorted(b - a)}"


def assert_same_json(ref: Path, got: Path) -> None:
    assert json.loads(ref.read_text()) == json.loads(got.read_text()), f"{got} differs from the reference"


def assert_same_b2nd(ref: Path, got: Path) -> None:
    import blosc2

    a = blosc2.open(urlpath=str(ref), mode="r")[...]
    b = blosc2.open(urlpath=str(got), mode="r")[...]
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f"{got} differs bitwise"


def assert_same_image(ref: Path, got: Path) -> None:
    import SimpleITK as sitk

    a, b = sitk.ReadImage(str(ref)), sitk.ReadImage(str(got))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), f"{got} differs bitwise"
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(a, what)() == getattr(b, what)(), f"{got}: {what[3:]} differs"


def _assert_equal_nested(a, b, where: str) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), \
            f"{where} differs bitwise"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _history(records: list[dict]) -> list[dict]:
    """Log records without wall-clock figures."""
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def assert_same_checkpoint(ref: Path, got: Path) -> None:
    """Bitwise equal weights (model, EMA), optimiser and scheduler states; equal step, config, losses."""
    import torch

    a = torch.load(ref, map_location="cpu", weights_only=True)
    b = torch.load(got, map_location="cpu", weights_only=True)
    for key in ("step", "model", "ema", "optimizer", "scheduler", "config"):
        _assert_equal_nested(a[key], b[key], f"{got.name}[{key}]")
    assert _history(a["history"]) == _history(b["history"]), f"{got}: training history differs"


def assert_same_log(ref: Path, got: Path) -> None:
    """The JSON-lines log has the same records (no duplicated or lost steps), timings aside."""
    def read(p):
        return _history([json.loads(line) for line in p.read_text().splitlines()]) if p.is_file() else []

    assert read(ref) == read(got), f"{got}: log differs from the reference"


