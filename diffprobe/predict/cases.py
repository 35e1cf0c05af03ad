"""One case through predict: read and preprocess it, the label map, and back to its raw geometry.

These steps need only the probes' probe.json (plans, labels); they run in threads next to the
sliding window (``Predictor.predict_folder``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffprobe.dataset.cases import Case
from diffprobe.io.image_io import write_image
from diffprobe.preprocessing.preprocess import preprocess_input, revert_to_original
from diffprobe.probe.model import TrainedProbe
from diffprobe.utils import atomic_path


def add_time(timings: dict[str, float] | None, key: str, started: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def label_map(logits: torch.Tensor, slab: int = 16) -> np.ndarray:
    """``argmax`` over classes as uint8, slab by slab along z.

    ``logits.argmax(0)`` on a whole CT would allocate an int64 volume (8 bytes a voxel, ~0.6 GB for
    75 M voxels) only to narrow it to uint8; slabs keep that transient at ``slab`` slices.
    """
    out = np.empty(logits.shape[1:], dtype=np.uint8)
    for z in range(0, logits.shape[1], slab):
        out[z:z + slab] = logits[:, z:z + slab].argmax(0).to(torch.uint8).cpu().numpy()
    return out


@dataclass
class LoadedCase:
    """A case read, checked and preprocessed: what the sliding window needs, and what export needs."""

    case: Case
    data: np.ndarray
    props: dict


@dataclass
class WindowResult:
    """A case's label map on the planned grid (and its logits when probabilities are saved)."""

    case: Case
    seg: np.ndarray
    props: dict
    logits: torch.Tensor | None


def load_case(probes: list[TrainedProbe], case: Case, timings: dict[str, float] | None = None) -> LoadedCase:
    """Read, integrity-check and preprocess one input exactly as planned (no torch work: runs in a thread)."""
    started = time.perf_counter()
    meta = probes[0].meta
    data, props = preprocess_input(case, meta["plans"], meta["dataset"])
    add_time(timings, "preprocess_s", started)
    return LoadedCase(case, data, props)


def export_case(probes: list[TrainedProbe], result: WindowResult, out_path: Path,
                timings: dict[str, float] | None = None) -> Path:
    """Label map (and probabilities) back to the input's raw geometry, written atomically (runs in a thread)."""
    started = time.perf_counter()
    resampling = probes[0].meta["plans"]["preprocessing"]["resampling"]
    seg_raw, geometry = revert_to_original(result.seg, result.props, is_seg=True, resampling=resampling)
    if result.logits is not None:
        probs = torch.softmax(result.logits.float(), 0).cpu().numpy()
        result.logits = None
        raw = [revert_to_original(p, result.props, is_seg=False, fill_value=float(k == 0),
                                  resampling=resampling)[0] for k, p in enumerate(probs)]
        del probs
        npz = out_path.parent / f"{result.case.identifier}.npz"
        with atomic_path(npz, ".npz") as tmp:
            np.savez_compressed(tmp, probabilities=np.stack(raw).astype(np.float16))
    write_image(seg_raw.astype(np.uint8), geometry, out_path)
    add_time(timings, "export_s", started)
    return out_path
