"""Read access to a preprocessed dataset for the stages after preprocessing.

Why its own module: pretraining, probing and the ablations all need "the finished cases of
dataset X and its plans"; they must not import the orchestration that wrote them.

Why a case index: listing the finished cases and their shapes needs a few fields of every case's
properties JSON, but a labelled case's JSON also holds its class locations (thousands of voxel
coordinates), so parsing them all made pretraining's start-up grow with the dataset (1000 volumes:
~12 s, docs/performance.md "Scaling"). ``case_index.json`` next to ``data/`` keeps those few fields
per case, keyed by the JSON's inode, size and mtime: a start-up stats every JSON and parses only
new or rewritten ones. It is a derived cache: a missing, corrupt or unwritable index only costs the
parsing it saves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.planning.plans import PLANS_FILENAME, load_plans
from diffprobe.preprocessing.preprocess import preprocessing_hash
from diffprobe.preprocessing.storage import case_paths
from diffprobe.utils import read_json, write_json

INDEX_FILENAME = "case_index.json"
INDEX_FORMAT = 1


def _summary(props: dict, key: list[int]) -> dict[str, Any]:
    return {"stat": key, "preprocessing_hash": props.get("preprocessing_hash"), "labelled": bool(props.get("labelled")),
            "shape": props.get("shape_after_resampling"), "spacing": props.get("target_spacing")}


def case_summaries(data_dir: Path) -> dict[str, dict[str, Any]]:
    """{case id: preprocessing_hash, labelled, shape (after resampling), spacing} of every properties
    JSON in ``data_dir``, from the case index; only JSONs that are new or changed since it was written
    are parsed (and the index rewritten). A JSON that cannot be read is left out, as unfinished."""
    data_dir = Path(data_dir)
    index_path = data_dir.parent / INDEX_FILENAME
    try:
        index = read_json(index_path)
        cached = index["cases"] if index.get("format") == INDEX_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        cached = {}
    out: dict[str, dict[str, Any]] = {}
    changed = False
    with os.scandir(data_dir) as entries:
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):  # atomic writes' temporaries
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            ident, key = entry.name[: -len(".json")], [st.st_ino, st.st_size, st.st_mtime_ns]
            summary = cached.get(ident)
            if not isinstance(summary, dict) or summary.get("stat") != key:
                try:
                    props = read_json(entry.path)
                except (OSError, ValueError):
                    continue
                summary, changed = _summary(props if isinstance(props, dict) else {}, key), True
            out[ident] = summary
    if changed or out.keys() != cached.keys():
        with contextlib.suppress(OSError, DiffprobeError):  # a read-only dataset: the index is only a cache
            write_json(index_path, {"format": INDEX_FORMAT, "cases": out})
    return out


def finished_case_ids(data_dir: Path, phash: str, summaries: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Cases whose properties name ``phash`` and whose arrays exist (``storage.is_finished``, from the index)."""
    summaries = case_summaries(data_dir) if summaries is None else summaries
    ids = []
    for ident, s in summaries.items():
        files = case_paths(data_dir, ident)
        if s.get("preprocessing_hash") == phash and files["data"].is_file() and \
                (not s.get("labelled") or files["seg"].is_file()):
            ids.append(ident)
    return sorted(ids)


def preprocessed_cases(dataset: str | int) -> tuple[Path, dict, list[str]]:
    """(data folder, plans, finished case ids) of a preprocessed dataset, for later stages."""
    out = paths.preprocessed_dir(dataset)
    plans = load_plans(out / PLANS_FILENAME)
    data_dir = out / "data"
    ids = finished_case_ids(data_dir, preprocessing_hash(plans)) if data_dir.is_dir() else []
    if not ids:
        raise DiffprobeError("no preprocessed cases", data_dir,
                             f"run `diffprobe plan_and_preprocess -d {dataset}`")
    return data_dir, plans, ids
