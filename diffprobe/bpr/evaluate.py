"""Does the BPR give the same organ the same coordinates across scans?

For every labelled preprocessed case and every organ present, the organ's centroid is
taken (a) in raw array coordinates (voxel index × spacing, mm from the array corner — what
a model without position inference would see) and (b) in BPR coordinates (converted to mm
with the *learnt* scale: per axis, the slope of the coordinate against millimetres within each
scan, averaged over scans — so a collapsed or shrunken coordinate map cannot look
consistent just because its values are small). The spread of each organ's centroids across cases (std per axis,
averaged over axes, in mm) is compared: a BPR that infers position from anatomy must have
a smaller spread than the array frame, whose origin moves with each scan's field of view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.preprocessing.storage import case_paths, load_array
from diffprobe.utils import read_json


def learnt_scale_per_mm(coords: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Slope (units/mm) of each coordinate channel (LR, AP, CC) along its own axis, from the axis profile."""
    slopes = []
    for channel, axis in ((0, 2), (1, 1), (2, 0)):
        other = tuple(a for a in range(3) if a != axis)
        profile = coords[channel].mean(axis=other)
        mm = np.arange(profile.size) * spacing_zyx[axis]
        slopes.append(np.polyfit(mm, profile, 1)[0] if profile.size > 1 else np.nan)
    return np.asarray(slopes)


def organ_centroid_spread(data_dir: Path, identifiers: list[str], maps: dict[str, np.ndarray], labels: dict[str, int],
                          scale_per_mm: float, min_cases: int = 3) -> dict:
    """Per organ and overall: centroid std across cases in array-mm vs BPR-mm (lower = more consistent)."""
    raw: dict[str, list[np.ndarray]] = {}
    bpr: dict[str, list[np.ndarray]] = {}
    cases = {}  # identifier -> (spacing, seg or None); each case's files are read once
    for ident in identifiers:
        files = case_paths(data_dir, ident)
        props = read_json(files["properties"])
        seg = load_array(files["seg"])[0] if props["labelled"] else None
        cases[ident] = (np.asarray(props["target_spacing"], dtype=float), seg)
    slopes = [learnt_scale_per_mm(maps[i].astype(np.float32), cases[i][0]) for i in identifiers]
    scale = np.nanmean(np.stack(slopes), axis=0)
    for ident, (spacing, seg) in cases.items():
        if seg is None:
            continue
        coords = maps[ident].astype(np.float32)  # (3, z, y, x), channels (LR, AP, CC)
        for name, value in labels.items():
            if value == 0:
                continue
            mask = seg == value
            if mask.sum() < 5:
                continue
            idx = np.argwhere(mask).mean(axis=0) * spacing  # z, y, x in mm from the array corner
            raw.setdefault(name, []).append(idx[::-1])  # -> x, y, z
            bpr.setdefault(name, []).append(np.array([coords[c][mask].mean() for c in range(3)]) / scale)
    per_organ = {}
    for name in raw:
        if len(raw[name]) < min_cases:
            continue
        r, b = np.stack(raw[name]), np.stack(bpr[name])
        per_organ[name] = {"cases": len(r), "array_mm": float(r.std(axis=0).mean()),
                           "bpr_mm": float(b.std(axis=0).mean()),
                           "array_mm_cc": float(r[:, 2].std()), "bpr_mm_cc": float(b[:, 2].std())}
    if not per_organ:
        return {"organs": {}, "array_mm": None, "bpr_mm": None, "ratio": None}
    arr = float(np.mean([v["array_mm"] for v in per_organ.values()]))
    bp = float(np.mean([v["bpr_mm"] for v in per_organ.values()]))
    return {"organs": per_organ, "array_mm": arr, "bpr_mm": bp, "ratio": bp / arr if arr else None,
            "learnt_scale_per_mm": scale.tolist(), "anchored_scale_per_mm": scale_per_mm,
            "definition": "std of organ centroids across cases, averaged over the 3 axes and over organs (mm)"}
