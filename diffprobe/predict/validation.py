"""End-of-training validation of one fold: full sliding-window predictions of the validation
cases on the preprocessed grid, scored against their preprocessed labels.

Scoring on the preprocessed grid avoids re-reading and resampling the raw files; it is what
nnU-Net's "pseudo Dice" approximates and is close to the raw-grid Dice for phantoms and CT.
Writes ``validation/summary.json`` (per case and mean: Dice, surface Dice, HD95) and, from the same
predictions, the fold's largest-component decision ``postprocessing.json``
(``diffprobe.postprocessing.determine``; the summary's Dice is before postprocessing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffprobe.evaluation.evaluate import to_json_safe
from diffprobe.evaluation.metrics import case_metrics
from diffprobe.parallel import progress_bar
from diffprobe.postprocessing.determine import LargestComponentTrial
from diffprobe.predict.predictor import predict_logits
from diffprobe.preprocessing.storage import load_case
from diffprobe.probe.model import load_trained_probe
from diffprobe.utils import write_json

TOLERANCE_MM = 2.0


def mean_metrics(per_case: list[dict[int, dict]], labels: list[int]) -> dict[int, dict[str, float]]:
    """NaN-skipping mean of Dice / NSD / HD95 per label over cases."""
    out = {}
    for lab in labels:
        out[lab] = {}
        for key in ("Dice", "NSD", "HD95"):
            vals = [c[lab][key] for c in per_case if not np.isnan(c[lab][key])]
            out[lab][key] = float(np.mean(vals)) if vals else float("nan")
    return out


def validate_fold(folder: Path, data_dir: Path, case_ids: list[str], device: torch.device | str,
                  show_progress: bool = True) -> dict:
    probe = load_trained_probe(folder, device)
    labels = {v: k for k, v in probe.meta["labels"].items() if v != 0}
    spacing = probe.meta["plans"]["preprocessing"]["target_spacing"]
    per_case = []
    trial = LargestComponentTrial(labels)
    with progress_bar() as bar:
        task = bar.add_task("validation", total=len(case_ids), visible=show_progress)
        for ident in case_ids:
            data, seg, _ = load_case(data_dir, ident)
            logits = predict_logits([probe], data, spacing, torch.device(device))
            pred = logits.argmax(0).cpu().numpy()
            per_case.append(case_metrics(seg, pred, sorted(labels), spacing, TOLERANCE_MM))
            trial.add_case(ident, seg, pred)
            bar.advance(task)
    mean = mean_metrics(per_case, sorted(labels))
    fg = [m["Dice"] for m in mean.values() if not np.isnan(m["Dice"])]
    summary = {
        "grid": "preprocessed (target spacing)", "tolerance_mm": TOLERANCE_MM,
        "metric_per_case": [{"case": i, "metrics": {labels[k]: v for k, v in c.items()}}
                            for i, c in zip(case_ids, per_case)],
        "mean": {labels[k]: v for k, v in mean.items()},
        "foreground_mean_dice": float(np.mean(fg)) if fg else float("nan"),
    }
    decision = trial.write(folder)
    summary["postprocessing_largest_component"] = [labels[k] for k in decision["largest_component"]]
    write_json(folder / "validation" / "summary.json", to_json_safe(summary))
    return summary


def format_validation(summary: dict) -> str:
    """A small text table of the mean validation metrics per class."""
    lines = [f"{'class':<16}{'Dice':>8}{'NSD':>8}{'HD95':>9}"]
    for name, m in summary["mean"].items():
        lines.append(f"{name:<16}{m['Dice']:>8.3f}{m['NSD']:>8.3f}{m['HD95']:>9.1f}")
    lines.append(f"{'mean Dice':<16}{summary['foreground_mean_dice']:>8.3f}")
    if "postprocessing_largest_component" in summary:
        chosen = ", ".join(summary["postprocessing_largest_component"]) or "none"
        lines.append(f"largest component kept (postprocessing.json): {chosen}")
    return "\n".join(lines)
