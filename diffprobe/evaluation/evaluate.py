"""Score a folder of predicted label maps against a folder of reference label maps.

Files are paired by case name (the file name without its ending), so ``case1.nii.gz``
is scored against ``case1.mha`` too. Each prediction must lie on its reference's voxel
grid (same shape, spacing, origin and direction within ``diffprobe.io.geometry``'s
tolerances); anything else is refused rather than resampled, because a metric computed
after silent resampling would not describe the prediction that was handed in.

``summary.json`` follows nnU-Net's layout (``metric_per_case``, ``mean``,
``foreground_mean``); see ``docs/evaluation.md``. JSON has no NaN or infinity: NaN is
written as ``null`` and infinity as the string ``"inf"``; :func:`load_summary` undoes both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.errors import DiffprobeError
from diffprobe.evaluation.metrics import METRIC_NAMES, case_metrics
from diffprobe.io.geometry import reorient_onto
from diffprobe.io.image_io import SUPPORTED_ENDINGS, file_ending, read_label
from diffprobe.parallel import parallel_map
from diffprobe.utils import read_json, write_json

GRID_FIX = ("write each prediction on its reference's grid (same size, spacing, origin and direction), "
            "e.g. resample it onto the reference image with nearest-neighbour interpolation")
JSON_NOTE = 'null = NaN (class in neither reference nor prediction); "inf" = HD95 with the class in only one'
_NUMERIC_KEYS = (*METRIC_NAMES, "n_ref", "n_pred", "n_cases")


def label_files(folder: Path) -> dict[str, Path]:
    """Case name -> file for every label map in ``folder`` (hidden and non-image files skipped)."""
    if not folder.is_dir():
        raise DiffprobeError("folder does not exist", folder, "check the path")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        ending = file_ending(path)
        if path.name.startswith(".") or not path.is_file() or ending not in SUPPORTED_ENDINGS:
            continue
        case = path.name[: -len(ending)]
        if case in cases:
            raise DiffprobeError(f"two files for case '{case}': {cases[case].name} and {path.name}", folder,
                                 "keep one file per case")
        cases[case] = path
    return cases


def pair_files(ref_dir: Path, pred_dir: Path) -> list[tuple[Path, Path]]:
    """(reference, prediction) per reference case; a missing prediction is an error."""
    refs, preds = label_files(ref_dir), label_files(pred_dir)
    if not refs:
        raise DiffprobeError(f"no label files ({', '.join(SUPPORTED_ENDINGS)})", ref_dir,
                             "point -ref to the folder of reference label maps (e.g. labelsTs)")
    missing = [refs[c] for c in refs if c not in preds]
    if missing:
        more = ", ".join(p.name for p in missing[1:6]) + (", ..." if len(missing) > 6 else "")
        others = f" (and {len(missing) - 1} more: {more})" if len(missing) > 1 else ""
        raise DiffprobeError(f"no prediction for reference {missing[0]}{others}", pred_dir / missing[0].name,
                             "predict every reference case, or evaluate a reference folder without these cases")
    return [(refs[c], preds[c]) for c in refs]


def _evaluate_case(pair: tuple[Path, Path], labels: list[int] | None, tolerance_mm: float) -> dict[str, Any]:
    ref_path, pred_path = pair
    ref, pred = read_label(ref_path), read_label(pred_path)
    # Same voxels stored in another orientation (a label written by another tool, as in the shared
    # real CT) are compared after an exact axis rearrangement; anything else is refused.
    pred_array, relation = reorient_onto(pred.array, pred.geometry, ref.geometry)
    if relation.kind == "mismatch" and ref.array.shape != pred.array.shape:
        raise DiffprobeError(f"prediction has shape (z, y, x) {pred.array.shape} but reference {ref_path} has "
                             f"{ref.array.shape}", pred_path, GRID_FIX)
    if relation.kind == "mismatch":
        raise DiffprobeError(f"prediction geometry differs from reference {ref_path}: {relation.details}",
                             pred_path, GRID_FIX)
    pred = type(pred)(pred_array, ref.geometry) if relation.kind == "reoriented" else pred
    ref_values = [int(v) for v in np.unique(ref.array) if v != 0]
    if labels is None:  # score what is in either map now; the final label set is fixed after all cases
        labels = sorted(set(ref_values) | {int(v) for v in np.unique(pred.array) if v != 0})
    spacing_zyx = tuple(reversed(ref.geometry.spacing))
    metrics = case_metrics(ref.array, pred.array, labels, spacing_zyx, tolerance_mm)
    return {"reference_file": str(ref_path), "prediction_file": str(pred_path), "metrics": metrics,
            "ref_values": ref_values}


def _mean(values: list[float]) -> float:
    """Mean skipping NaN (inf is kept, so one infinite HD95 makes the mean infinite); NaN if nothing is left."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _both_empty() -> dict[str, float | int]:
    return {"Dice": float("nan"), "NSD": float("nan"), "HD95": float("nan"), "n_ref": 0, "n_pred": 0}


def evaluate_folders(ref_dir: str | Path, pred_dir: str | Path, labels: dict[str, int] | None = None,
                     tolerance_mm: float = 2.0, output: str | Path | None = None, num_processes: int = 1,
                     *, show_progress: bool = True) -> dict:
    """Dice, NSD at ``tolerance_mm`` and HD95 per case and class; writes ``output`` if given.

    ``labels`` maps class names to ids (background 0 is dropped); by default every non-zero
    value found in the references is scored, named by its id. Returns the summary with float
    NaN/inf (the file holds null/"inf").
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    if not (isinstance(tolerance_mm, (int, float)) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise DiffprobeError(f"tolerance {tolerance_mm!r} mm is not a non-negative number",
                             fix="pass e.g. --tolerance 2.0 (mm)")
    pairs = pair_files(ref_dir, pred_dir)
    fixed = None if labels is None else sorted({int(v) for v in labels.values() if v != 0})
    if fixed == []:
        raise DiffprobeError("no foreground label to evaluate (only background 0)", fix="add classes to the labels")
    cases = parallel_map(_evaluate_case, pairs, num_processes, "evaluating", show_progress=show_progress,
                         extra_args=(fixed, tolerance_mm))
    if labels is None:
        ids = sorted({v for case in cases for v in case["ref_values"]})
        names = {str(v): v for v in ids}
    else:
        ids = fixed  # type: ignore[assignment]
        names = {n: int(v) for n, v in labels.items() if v != 0}
    per_case = []
    for case in cases:
        scored = case.pop("metrics")
        case.pop("ref_values")
        case["metrics"] = {str(v): scored.get(v, _both_empty()) for v in ids}
        per_case.append(case)
    mean = {}
    for v in ids:
        rows = [c["metrics"][str(v)] for c in per_case]
        mean[str(v)] = {m: _mean([r[m] for r in rows]) for m in (*METRIC_NAMES, "n_ref", "n_pred")}
        mean[str(v)]["n_cases"] = sum(not math.isnan(r["Dice"]) for r in rows)
    foreground_mean = {m: _mean([mean[str(v)][m] for v in ids]) for m in METRIC_NAMES}
    summary = {"tolerance_mm": float(tolerance_mm), "labels": names, "num_cases": len(per_case),
               "json_note": JSON_NOTE, "foreground_mean": foreground_mean, "mean": mean,
               "metric_per_case": per_case}
    if output is not None:
        write_json(output, to_json_safe(summary))
    return summary


def to_json_safe(obj: Any) -> Any:
    """Copy with NaN -> None and ±inf -> "inf"/"-inf" (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {k: to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _from_json(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _from_json(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if key in _NUMERIC_KEYS and (obj is None or isinstance(obj, str)):
        return float("nan") if obj is None else float(obj)
    return obj


def load_summary(path: str | Path) -> dict:
    """Read ``summary.json`` back with float NaN/inf in place of null/"inf"."""
    return _from_json(read_json(path))


def _fmt(value: Any, digits: int) -> str:
    value = float("nan") if value is None else float(value)  # also takes summary.json's null / "inf"
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    """Per-class means with names, then the foreground mean; accepts either summary form."""
    names = {str(v): n for n, v in summary["labels"].items()}
    head = ["class", "id", "Dice", f"NSD@{summary['tolerance_mm']:g}mm", "HD95 mm", "cases"]
    rows = [[names.get(k, k), k, _fmt(m["Dice"], 4), _fmt(m["NSD"], 4), _fmt(m["HD95"], 2), str(m["n_cases"])]
            for k, m in summary["mean"].items()]
    fg = summary["foreground_mean"]
    rows.append(["foreground mean", "", _fmt(fg["Dice"], 4), _fmt(fg["NSD"], 4), _fmt(fg["HD95"], 2),
                 str(summary["num_cases"])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule, *[line(r) for r in rows[:-1]], rule, line(rows[-1])])
