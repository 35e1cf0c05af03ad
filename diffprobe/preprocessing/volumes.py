"""References to preprocessed volumes and lazy region reads, for every stage that reads patches.

A :class:`VolumeRef` names one preprocessed case (folder + identifier) with its shape and spacing
on the preprocessed grid, and optionally the path of its BPR coordinate map; ``read_region`` reads
a box of any blosc2 array, filling what lies outside the volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprobe.preprocessing.storage import case_paths
from diffprobe.utils import read_json


@dataclass(frozen=True)
class VolumeRef:
    """One preprocessed training volume (any dataset)."""

    data_dir: Path
    identifier: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    guidance_path: Path | None = None  # BPR coordinate map (3, z, y, x), when guidance == "bpr"

    @property
    def data_path(self) -> Path:
        return case_paths(self.data_dir, self.identifier)["data"]

    @property
    def properties_path(self) -> Path:
        return case_paths(self.data_dir, self.identifier)["properties"]


def volume_refs(data_dir: Path, identifiers: list[str]) -> list[VolumeRef]:
    refs = []
    for ident in identifiers:
        props = read_json(case_paths(data_dir, ident)["properties"])
        refs.append(VolumeRef(data_dir, ident, tuple(props["shape_after_resampling"]), tuple(props["target_spacing"])))
    return refs


def read_region(arr, start: np.ndarray, size: tuple[int, ...], fill: float, edge: bool = False) -> np.ndarray:
    """Read arr[:, start:start+size] with out-of-bounds parts filled (volumes may be smaller than patches).

    ``edge``: out-of-bounds parts repeat the nearest in-bounds voxel instead of ``fill`` — what the
    sliding window does to guidance channels (a constant would be a real, wrong coordinate), so that
    training patches of volumes thinner than the patch see what prediction sees."""
    start = np.asarray(start)
    shape = np.array(arr.shape[1:])
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.array(size), shape)
    out = np.full((arr.shape[0], *size), fill, dtype=np.float32)
    if np.all(hi > lo):
        src = np.asarray(arr[(slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))], dtype=np.float32)
        if edge:
            widths = [(0, 0)] + [(int(a - s), int(s + n - b)) for a, b, s, n in zip(lo, hi, start, size)]
            return np.pad(src, widths, mode="edge")
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        out[(slice(None),) + dst] = src
    return out
