"""The postprocessing operations on a label map, and the object that says which of them apply.

A label map is postprocessed on the cropped raw grid, where predict takes its argmax
(``predict.cases.to_raw_grid``); the voxels it sets to background are returned as well, so that
saved probabilities can be made one-hot background there and the label map stays their argmax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffprobe.errors import DiffprobeError
from diffprobe.planning.plans import has_ct_channel

POSTPROCESSING_FILENAME = "postprocessing.json"
# 26-connectivity, as nnU-Net's remove_all_but_largest_component (skimage's full connectivity)
CONNECTIVITY = np.ones((3, 3, 3), bool)


def outside_largest_component(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` outside its largest 26-connected component (none when it has one piece)."""
    components, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count <= 1:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return mask & (components != int(np.argmax(sizes)))


def keep_largest_component(labels: np.ndarray, label: int) -> np.ndarray:
    """Set every voxel of ``label`` outside its largest 26-connected component to 0, in place.

    Returns the mask of the voxels removed."""
    removed = outside_largest_component(labels == label)
    labels[removed] = 0
    return removed


@dataclass
class Postprocessing:
    """Which operations apply to a model's label maps.

    ``outside_body``: background outside the filled body (needs the body mask, CT only);
    ``largest_component``: class ids reduced to their largest component."""

    outside_body: bool = False
    largest_component: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.outside_body or bool(self.largest_component)

    def apply(self, labels: np.ndarray, body: np.ndarray | None) -> np.ndarray:
        """Postprocess ``labels`` in place; returns the mask of the voxels set to background.

        ``body``: the filled body mask on the same grid (required with ``outside_body``)."""
        removed = np.zeros(labels.shape, bool)
        if self.outside_body:
            if body is None or body.shape != labels.shape:
                raise ValueError(f"outside_body needs the body mask on the label map's grid {labels.shape}")
            outside = ~body
            removed |= (labels != 0) & outside
            labels[outside] = 0
        for label in self.largest_component:
            removed |= keep_largest_component(labels, label)
        return removed

    @classmethod
    def for_model(cls, plans: dict, fold_folders: list[Path]) -> Postprocessing:
        """The plans' ``outside_body`` (on for CT when planned; absent in plans older than the setting:
        off; never without a CT channel, where preprocessing finds no body mask) and the classes every
        fold's validation chose (a fold without ``postprocessing.json``, trained before it existed,
        chooses none)."""
        outside = bool((plans.get("postprocessing") or {}).get("outside_body", False)) and has_ct_channel(plans)
        chosen: set[int] | None = None
        for folder in fold_folders:
            classes = set(read_decision(Path(folder)).get("largest_component", []))
            chosen = classes if chosen is None else chosen & classes
        return cls(outside, sorted(chosen or []))


def read_decision(folder: Path) -> dict:
    """A fold's ``postprocessing.json`` ({} when the fold has none)."""
    path = Path(folder) / POSTPROCESSING_FILENAME
    if not path.is_file():
        return {}
    try:
        decision = json.loads(path.read_text())
        classes = decision.get("largest_component", [])
        if not isinstance(classes, list) or not all(isinstance(c, int) and c > 0 for c in classes):
            raise ValueError("largest_component must be a list of positive class ids")
    except (ValueError, AttributeError) as e:
        raise DiffprobeError(f"unreadable postprocessing decision ({e})", path, "delete it (no postprocessing) "
                             "or recreate it with `diffprobe train -d D -f F --val`") from None
    return decision
