"""Where datasets live, and how ``-d`` is resolved.

Roots come from ``DIFFPROBE_RAW`` / ``DIFFPROBE_PREPROCESSED`` / ``DIFFPROBE_RESULTS``;
when unset, the nnU-Net variables (``nnUNet_raw`` ...) are used so existing nnU-Net
datasets work unchanged; when neither is set, ``~/diffprobe_data/{raw,preprocessed,results}``
is used (nnU-Net's hard failure on unset variables is a frequent complaint).

diffprobe's own preprocessed files go into a ``diffprobe/`` sub-folder of the dataset's
preprocessed folder, so sharing ``nnUNet_preprocessed`` with nnU-Net never clobbers
nnU-Net's ``dataset_fingerprint.json`` or plans.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from diffprobe.errors import DiffprobeError

DEFAULT_BASE = Path.home() / "diffprobe_data"
_ROOTS = {
    "raw": ("DIFFPROBE_RAW", "nnUNet_raw"),
    "preprocessed": ("DIFFPROBE_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("DIFFPROBE_RESULTS", "nnUNet_results"),
}
SUBFOLDER = "diffprobe"
# the name part is one folder name: no separators, so "Dataset001_../../x" is no dataset name
_DATASET_RE = re.compile(r"^Dataset(\d{3})_([^/\\\x00]+)$")


def root(kind: str) -> Path:
    """The root folder for ``kind`` in {'raw', 'preprocessed', 'results'}."""
    ours, nnunet = _ROOTS[kind]
    for var in (ours, nnunet):
        value = os.environ.get(var)
        if value:
            return _refuse_file_in_path(Path(value).expanduser(), var)
    return DEFAULT_BASE / kind


def _refuse_file_in_path(folder: Path, var: str) -> Path:
    """``folder`` unless it, or the nearest part of it that exists, is a file rather than a folder.

    Why: every stage creates folders under its root; a root that is (or lies below) a regular
    file fails there with NotADirectoryError / FileExistsError, far from the variable that is wrong.
    """
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == folder else f"lies below the file {existing}"
        raise DiffprobeError(f"{var} points to {folder}, which {where}, not a folder", folder,
                             f"set {var} to a folder (existing or creatable)")
    return folder


def raw_root() -> Path:
    return root("raw")


def preprocessed_root() -> Path:
    return root("preprocessed")


def results_root() -> Path:
    return root("results")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def is_dataset_folder_name(name: object) -> bool:
    """Whether ``name`` is a plain ``DatasetXXX_Name`` folder name (no path parts).

    Why: dataset names read from files (a pretrained model's model.json) become folders under
    the data roots; ``../x`` or ``/abs`` there would read or write outside them.
    """
    return isinstance(name, str) and _DATASET_RE.match(name) is not None


def parse_dataset_id(spec: str | int) -> tuple[int, str | None]:
    """``1``, ``'001'``, ``'Dataset001_Name'`` -> (1, None or 'Name')."""
    if isinstance(spec, int):
        return spec, None
    s = str(spec).strip()
    m = _DATASET_RE.match(s)
    if m:
        return int(m.group(1)), m.group(2)
    if s.isdigit():
        return int(s), None
    raise DiffprobeError(
        f"'{spec}' is not a dataset id",
        fix="pass a number (1 or 001) or a folder name like Dataset001_Name",
    )


def _find_in(base: Path, dataset_id: int) -> list[Path]:
    if not base.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(prefix))


def dataset_name(spec: str | int) -> str:
    """Resolve a dataset spec to its folder name, looking in the raw, then preprocessed root."""
    dataset_id, name = parse_dataset_id(spec)
    if name is not None:
        return dataset_folder_name(dataset_id, name)
    candidates: list[Path] = []
    for kind in ("raw", "preprocessed"):
        candidates = _find_in(root(kind), dataset_id)
        if candidates:
            break
    if not candidates:
        raise DiffprobeError(
            f"no dataset with id {dataset_id:03d} (looked for Dataset{dataset_id:03d}_* in "
            f"{raw_root()} and {preprocessed_root()})",
            fix="check DIFFPROBE_RAW / nnUNet_raw, or create one with `diffprobe make_phantoms -d "
            f"{dataset_id}`",
        )
    names = sorted({c.name for c in candidates})
    if len(names) > 1:
        raise DiffprobeError(
            f"several datasets have id {dataset_id:03d}: {', '.join(names)}",
            fix="pass the full folder name with -d, or rename one of them",
        )
    return names[0]


def raw_dataset_dir(spec: str | int) -> Path:
    return raw_root() / dataset_name(spec)


def preprocessed_dir(spec: str | int) -> Path:
    """``<preprocessed root>/DatasetXXX_Name/diffprobe``: fingerprint, plans.json and data."""
    return preprocessed_root() / dataset_name(spec) / SUBFOLDER


def results_dir(spec: str | int) -> Path:
    return results_root() / dataset_name(spec) / SUBFOLDER


_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_name(name: object, what: str = "model name", source: str | Path | None = None) -> str:
    """Return ``name`` if it is a plain folder name, else raise DiffprobeError.

    Why: names such as a pretrained model's become folder names under the results root;
    ``../x``, ``/abs`` or ``a/b`` would read or write outside it (and a name taken from a
    downloaded archive is untrusted). Allowed: letters, digits, ``. _ + -``, not starting
    with a dot, at most 128 characters. ``source`` is the file the name came from, if any.
    """
    if not isinstance(name, str) or not _SAFE_NAME_RE.match(name):
        raise DiffprobeError(
            f"{what} {name!r} is not a plain folder name (it could point outside {results_root()})",
            source,
            "use letters, digits, '.', '_', '+' and '-' only, not starting with '.', e.g. --name abdomen",
        )
    return name


@contextlib.contextmanager
def roots_at(folder: str | Path) -> Iterator[dict[str, Path]]:
    """Point DIFFPROBE_RAW/PREPROCESSED/RESULTS at ``folder/{raw,preprocessed,results}`` for a block."""
    roots = {k: Path(folder) / k for k in _ROOTS}
    old = {k: os.environ.get(_ROOTS[k][0]) for k in roots}
    os.environ.update({_ROOTS[k][0]: str(v) for k, v in roots.items()})
    try:
        yield roots
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(_ROOTS[k][0], None)
            else:
                os.environ[_ROOTS[k][0]] = v
