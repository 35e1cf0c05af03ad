"""Integrity checks run on every case before anything is computed from it.

Each case is read once here, checked, and returned in diffprobe's canonical layout
(channels first, numpy axes (z, y, x), direction closest to identity; see
:func:`diffprobe.io.geometry.canonical_orientation`). Problems are collected, not
raised, so a run reports every bad case at once.

Labels are compared with their image *physically*: a label holding the same voxel
centres in another axis order or with flips is reoriented onto the image grid (and a
note says so); a label on a different grid is refused. Voxels are never paired by
array index alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffprobe.dataset.cases import Case
from diffprobe.dataset.dataset_json import DatasetInfo
from diffprobe.errors import DiffprobeError, Problem
from diffprobe.io.geometry import AxisMap, Geometry, canonical_orientation, relate_grids, reorient_onto
from diffprobe.io.image_io import read_image, read_label


@dataclass
class CheckedCase:
    """A case that passed the checks, in canonical layout."""

    identifier: str
    data: np.ndarray  # (C, z, y, x) float32, canonical orientation
    seg: np.ndarray | None  # (z, y, x) uint8/uint16 on the same grid, or None if unlabelled
    original_geometry: Geometry  # geometry of the file as written (channel 0)
    canonical_geometry: Geometry
    axis_map: AxisMap  # original -> canonical
    notes: list[str] = field(default_factory=list)


def check_case(case: Case, info: DatasetInfo) -> tuple[CheckedCase | None, list[Problem]]:
    """Read and check one case. Returns (case or None, problems)."""
    problems: list[Problem] = []
    volumes = []
    for path in case.images:
        try:
            volumes.append(read_image(path))
        except DiffprobeError as e:
            problems.append(Problem(str(path), e.what, e.fix or "re-export the image"))
    if problems:
        return None, problems
    ref = volumes[0]
    for path, vol in zip(case.images[1:], volumes[1:]):
        rel = relate_grids(vol.geometry, ref.geometry)
        if rel.kind != "same":
            problems.append(Problem(str(path), f"channel geometry differs from {case.images[0].name}: {rel.details}",
                                    "resample all channels of a case onto one grid"))
    for path, vol in zip(case.images, volumes):
        if vol.array.size and float(vol.array.min()) == float(vol.array.max()):
            problems.append(Problem(str(path), f"image is constant (every voxel = {float(vol.array.min()):g})",
                                    "re-export the scan; a constant image holds no anatomy"))
    notes: list[str] = []
    seg = None
    if case.label is not None:
        try:
            lab = read_label(case.label)
        except DiffprobeError as e:
            problems.append(Problem(str(case.label), e.what, e.fix or "re-export the label"))
            lab = None
        if lab is not None:
            values = set(np.unique(lab.array).tolist())
            undeclared = sorted(values - info.label_values)
            if undeclared:
                problems.append(Problem(str(case.label), f"label values {undeclared} are not declared in dataset.json",
                                        f"declare them under 'labels' or remap them (declared: "
                                        f"{sorted(info.label_values)})"))
            seg, rel = reorient_onto(lab.array, lab.geometry, ref.geometry)
            if rel.kind == "mismatch":
                problems.append(Problem(str(case.label), f"label geometry differs physically from the image: "
                                        f"{rel.details}",
                                        "resample the label onto the image grid (nearest neighbour) with the "
                                        "tool that made it"))
            elif rel.kind == "reoriented":
                notes.append(f"{case.label.name}: same voxels as the image in another orientation "
                             f"({rel.details}); reoriented onto the image grid")
    if problems:
        return None, problems
    amap, canon = canonical_orientation(ref.geometry)
    data = np.stack([amap.apply(v.array) for v in volumes]).astype(np.float32, copy=False)
    if seg is not None:
        seg = amap.apply(seg)
    return CheckedCase(case.identifier, data, seg, ref.geometry, canon, amap, notes), []
