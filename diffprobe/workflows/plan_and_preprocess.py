"""``plan_and_preprocess``: fingerprint (with integrity check) -> plans.json -> preprocessed cases.

Outputs go to ``<preprocessed root>/DatasetXXX_Name/diffprobe/``:
``dataset.json`` (copy), ``dataset_fingerprint.json``, ``plans.json``, ``data/``.

Idempotent: the fingerprint is reused while the raw files are unchanged, an existing
plans.json (possibly hand-edited) is kept unless ``replan`` or overrides are given, and
finished cases are skipped unless ``clean``.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprobe import paths
from diffprobe.dataset.cases import Case, list_cases
from diffprobe.dataset.dataset_json import DatasetInfo, load_dataset_json
from diffprobe.errors import DiffprobeError
from diffprobe.fingerprint import compute_fingerprint
from diffprobe.locking import folder_lock
from diffprobe.parallel import parallel_map
from diffprobe.planning.plans import PLANS_FILENAME, load_plans, save_plans, validate_plans
from diffprobe.planning.replan import replan as replan_plans
from diffprobe.planning.size_classes import default_size_class
from diffprobe.preprocessing.preprocess import preprocess_case, preprocessing_hash
from diffprobe.preprocessing.storage import is_finished, save_case
from diffprobe.utils import atomic_path, read_json, remove_interrupted_writes, write_json

FINGERPRINT_FILENAME = "dataset_fingerprint.json"


@dataclass
class PreprocessReport:
    """What one run did."""

    folder: Path
    plans_path: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fingerprint_reused: bool = False
    plans_reused: bool = False


def raw_files_signature(info: DatasetInfo, cases: list[Case]) -> str:
    """Names, sizes and mtimes of every input file: a cheap 'did the raw data change' test."""
    h = hashlib.sha1()
    for f in [info.folder / "dataset.json"] + [p for c in cases for p in c.images + ([c.label] if c.label else [])]:
        st = f.stat()
        h.update(f"{f.relative_to(info.folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _preprocess_one(case: Case, info: DatasetInfo, plans: dict, out: Path) -> str:
    data, seg, props = preprocess_case(case, info, plans)
    save_case(out, case.identifier, data, seg, props, plans["patch_size"])
    return case.identifier


def plan_and_preprocess(
    dataset: str | int,
    num_processes: int = 2,
    clean: bool = False,
    replan: bool = False,
    plan_kwargs: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    device: str = "auto",
    budget_minutes: float | None = None,
) -> PreprocessReport:
    """Fingerprint, plan and preprocess one raw dataset; returns what was done.

    ``plan_kwargs`` are passed to :func:`diffprobe.planning.planner.plan` (e.g.
    ``{"patch_size": [32, 64, 64], "schedule": "cosine"}``); ``overrides`` are
    ``'dotted.key=json_value'`` edits. An existing plans.json is re-planned from its recorded
    planner inputs with exactly the given ones changed (:mod:`diffprobe.planning.replan`);
    ``clean`` plans from scratch. Without a size class or budget, the size class follows the
    device (CPU: ``cpu``, GPU: ``paper``); ``budget_minutes`` times real training steps on the
    device and plans the network and step budgets to fit (:mod:`diffprobe.workflows.budget`).
    """
    raw_dir = paths.raw_dataset_dir(dataset)
    info = load_dataset_json(raw_dir)
    out = paths.preprocessed_root() / raw_dir.name / paths.SUBFOLDER
    # Two runs on one dataset would race on plans.json and the case files: the second one refuses.
    with folder_lock(out, f"plan_and_preprocess of {raw_dir.name}"):
        return _plan_and_preprocess_locked(raw_dir, info, out, num_processes, clean, replan, plan_kwargs,
                                           overrides, show_progress, device, budget_minutes)


def _plan_and_preprocess_locked(raw_dir: Path, info: DatasetInfo, out: Path, num_processes: int, clean: bool,
                                replan: bool, plan_kwargs: dict[str, Any] | None, overrides: list[str] | None,
                                show_progress: bool, device: str = "auto",
                                budget_minutes: float | None = None) -> PreprocessReport:
    cases, _ = list_cases(info, "train")
    report = PreprocessReport(out, out / PLANS_FILENAME)
    remove_interrupted_writes(out)  # of a killed run; safe: we hold the folder's lock

    fp_path = out / FINGERPRINT_FILENAME
    signature = raw_files_signature(info, cases)
    fingerprint = read_json(fp_path) if fp_path.is_file() and not clean else None
    if fingerprint and fingerprint.get("raw_files_signature") == signature:
        report.fingerprint_reused = True
    else:
        fingerprint = compute_fingerprint(raw_dir, num_processes, show_progress)
        fingerprint["raw_files_signature"] = signature
        write_json(fp_path, fingerprint)
    report.notes.extend(fingerprint.get("notes", []))
    with atomic_path(out / "dataset.json", ".json") as tmp:
        shutil.copyfile(raw_dir / "dataset.json", tmp)

    plans_path = out / PLANS_FILENAME
    if plans_path.is_file() and not (replan or clean or plan_kwargs or overrides or budget_minutes):
        plans = load_plans(plans_path)
        report.plans_reused = True
        if not report.fingerprint_reused:
            report.notes.append("the raw data changed since plans.json was written; it was kept (it may hold "
                                "your edits): use --replan to plan again")
    else:
        previous = _previous_plans(plans_path, clean, report)
        kwargs = dict(plan_kwargs or {})
        if budget_minutes:
            from diffprobe.workflows.budget import plan_for_budget

            kwargs.update(plan_for_budget(fingerprint, previous, kwargs, overrides, budget_minutes, device))
        elif "size_class" not in kwargs and "size_class" not in (previous or {}).get("planner_inputs", {}):
            from diffprobe.devices import resolve_device

            kwargs["size_class"] = default_size_class(resolve_device(device))
        plans = replan_plans(fingerprint, previous, kwargs, overrides)
        validate_plans(plans, plans_path)
        save_plans(plans, plans_path)

    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    phash = preprocessing_hash(plans)
    todo = [c for c in cases if clean or not is_finished(data_dir, c.identifier, phash)]
    report.skipped = [c.identifier for c in cases if c not in todo]
    if todo:
        report.processed = parallel_map(_preprocess_one, todo, num_processes, "preprocessing", show_progress,
                                        extra_args=(info, plans, data_dir))
    _remove_stale(data_dir, {c.identifier for c in cases})
    return report


def _previous_plans(plans_path: Path, clean: bool, report: PreprocessReport) -> dict | None:
    """The plans to re-plan from: the existing file, unless --clean or it no longer loads."""
    if clean or not plans_path.is_file():
        return None
    try:
        return load_plans(plans_path)
    except DiffprobeError as e:
        report.notes.append(f"the existing plans.json was not reused ({e.what}); planned from scratch")
        return None


def _remove_stale(data_dir: Path, identifiers: set[str]) -> None:
    """Delete leftovers of interrupted writes and of cases no longer in the raw dataset."""
    remove_interrupted_writes(data_dir)
    for f in data_dir.iterdir():
        stem = next((f.name[: -len(s)] for s in ("_seg.b2nd", ".b2nd", ".json") if f.name.endswith(s)), None)
        if stem is not None and stem not in identifiers:
            f.unlink(missing_ok=True)
