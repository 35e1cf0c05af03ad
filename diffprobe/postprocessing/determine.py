"""Decide, from a fold's validation, which classes keep only their largest connected component.

nnU-Net's rule (``nnunetv2.postprocessing.remove_connected_components.determine_postprocessing``),
per class: removing all but the largest component is kept only where it *raises* the class's mean
validation Dice (strictly: an unchanged Dice keeps the prediction as it is). nnU-Net first tries the
same on all foreground classes merged into one; with many organs that step is rarely chosen and it
is not tried here. The trial runs on the validation predictions the fold makes anyway
(``predict.validation.validate_fold``), so it costs a connected-component labelling per class and
case, not a prediction.

A fold validated on its own training cases (``-f all``) decides on cases it fitted: the decision
then says where the fitted predictions carry stray pieces, which is weaker evidence than
cross-validation; ``postprocessing.json`` records the validation cases so a reader can tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprobe.evaluation.metrics import dice
from diffprobe.postprocessing.operations import POSTPROCESSING_FILENAME, outside_largest_component
from diffprobe.utils import write_json

RULE = ("per class, all but the largest 26-connected component removed where that raises the class's mean "
        "validation Dice (nnU-Net's determine_postprocessing, without its merged-foreground step)")


@dataclass
class LargestComponentTrial:
    """Dice per class and case with and without the largest-component reduction."""

    labels: dict[int, str]
    before: dict[int, list[float]] = field(default_factory=dict)
    after: dict[int, list[float]] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)

    def add_case(self, identifier: str, reference: np.ndarray, prediction: np.ndarray) -> None:
        """Score one validation case's prediction as it is and with each class reduced on its own."""
        self.cases.append(identifier)
        for label in self.labels:
            ref, pred = reference == label, prediction == label
            self.before.setdefault(label, []).append(dice(ref, pred))
            self.after.setdefault(label, []).append(dice(ref, pred & ~outside_largest_component(pred)))

    @staticmethod
    def _mean(values: list[float]) -> float:
        finite = [v for v in values if not np.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    def decide(self) -> dict:
        """The decision and its evidence: classes whose mean Dice rose, and both means per class."""
        chosen, evidence = [], {}
        for label, name in self.labels.items():
            before, after = self._mean(self.before.get(label, [])), self._mean(self.after.get(label, []))
            if not np.isnan(before) and after > before:
                chosen.append(label)
            evidence[name] = {"class": label, "dice_before": None if np.isnan(before) else round(before, 5),
                              "dice_after": None if np.isnan(after) else round(after, 5)}
        return {"largest_component": chosen, "rule": RULE, "validation_cases": list(self.cases),
                "classes": evidence}

    def write(self, folder: Path) -> dict:
        """Write the decision to ``folder/postprocessing.json`` (atomically) and return it."""
        decision = self.decide()
        write_json(Path(folder) / POSTPROCESSING_FILENAME, decision)
        return decision
