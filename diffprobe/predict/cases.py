"""One case through predict: read and preprocess it, its probabilities, and back to its raw geometry.

The way back follows nnU-Net (``convert_predicted_logits_to_segmentation_with_correct_shape``):
the softmax probabilities on the planned grid are resampled *linearly* (order 1, the same
resampling as nnU-Net's ``resampling_fn_probabilities``) onto the cropped raw grid, and the label
map is their argmax there; then the crop and the canonical orientation are undone. Linear
interpolation is a convex combination, so resampled probabilities stay in [0, 1] and keep summing
to 1 (cubic interpolation overshoots and breaks both). The argmax is taken of the float16 values
that ``--save_probabilities`` writes, so the saved label map *is* the argmax of the saved
probabilities, voxel for voxel; the label map is computed the same way without
``--save_probabilities``, so asking for probabilities never changes the segmentation.

Postprocessing (``diffprobe.postprocessing``: background outside the body, largest components) acts on
the label map on the cropped grid; voxels it sets to background get one-hot background probabilities,
as voxels outside the crop have, so the saved label map stays the argmax of the saved probabilities.

Classes are resampled one at a time with a running maximum: at most one full-resolution class
plane exists at once unless probabilities are saved.

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
from diffprobe.io.geometry import Geometry
from diffprobe.io.image_io import label_dtype
from diffprobe.postprocessing.operations import Postprocessing
from diffprobe.predict.outputs import model_description, write_outputs
from diffprobe.preprocessing.preprocess import preprocess_input, resample_to_cropped, uncrop_to_original
from diffprobe.probe.model import TrainedProbe
from diffprobe.utils import atomic_path

PROBABILITY_DTYPE = np.float16  # what the .npz holds; the label map is the argmax of exactly these values


def add_time(timings: dict[str, float] | None, key: str, started: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (dim 0) in place, in float32: the K x volume logits become the probabilities
    without a second K x volume buffer (only two volume-sized temporaries: the maximum and the sum)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


@dataclass
class LoadedCase:
    """A case read, checked and preprocessed: what the sliding window needs, and what export needs."""

    case: Case
    data: np.ndarray | None
    props: dict


@dataclass
class WindowResult:
    """A case's softmax probabilities (K, z, y, x) float32 on the CPU, on the planned grid, and whether
    they are to be saved next to the label map."""

    case: Case
    probabilities: torch.Tensor | None
    props: dict
    save_probabilities: bool = False


def load_case(probes: list[TrainedProbe], case: Case, timings: dict[str, float] | None = None,
              keep_body: bool = False) -> LoadedCase:
    """Read, integrity-check and preprocess one input exactly as planned (no torch work: runs in a thread).

    ``keep_body``: keep the body mask for the ``outside_body`` postprocessing (``props["body"]``)."""
    started = time.perf_counter()
    meta = probes[0].meta
    data, props = preprocess_input(case, meta["plans"], meta["dataset"], keep_body)
    add_time(timings, "preprocess_s", started)
    return LoadedCase(case, data, props)


def to_probability_dtype(plane: np.ndarray) -> np.ndarray:
    """``plane.astype(float16)`` through torch's cast: the same bits (IEEE round to nearest even, checked on
    30 M values including random bit patterns), but numpy's cast takes ~65 ns per value that is subnormal
    in float16 (below 6e-5: most of a class's probabilities), 10x its normal speed; it was 3.9 of the 5.1 s
    of a whole-CT export (crlm1004, 14 classes)."""
    return torch.from_numpy(np.ascontiguousarray(plane)).to(torch.float16).numpy()


def probabilities_resampling(plans_resampling: dict) -> dict:
    """The plans' resampling with order 1 for images: how probabilities go back (nnU-Net's default)."""
    return {**plans_resampling, "image_order": 1}


def to_raw_grid(probabilities: torch.Tensor, props: dict, resampling: dict, keep: bool,
                postprocessing: Postprocessing | None = None) -> tuple[np.ndarray, Geometry, np.ndarray | None]:
    """Label map (and, with ``keep``, probabilities) on the raw file's grid from planned-grid probabilities.

    Returns ``(labels, geometry, probs)``: ``labels`` in the narrowest dtype that holds every class id
    (uint8, or uint16 past 255: never wrapped), ``probs`` (K, z, y, x) float16 or None. Outside the
    body crop, and where ``postprocessing`` set a voxel to background, the probabilities are one-hot
    background and the label is 0.
    """
    num_classes = probabilities.shape[0]
    order = probabilities_resampling(resampling)
    best = labels = kept = None
    for k in range(num_classes):
        plane = resample_to_cropped(probabilities[k].numpy(), props, is_seg=False, resampling=order)
        # Clip: float rounding only (order 1 never overshoots); in place, as the class plane is used once.
        plane = to_probability_dtype(np.clip(plane, 0.0, 1.0, out=plane))
        if best is None:
            best, labels = plane.copy(), np.zeros(plane.shape, label_dtype(num_classes - 1))
        else:
            better = plane > best  # strict: ties keep the lower class, as np.argmax does
            labels[better] = k
            np.maximum(best, plane, out=best)
            del better
        if keep:
            full, _ = uncrop_to_original(plane, props, fill_value=float(k == 0))
            if kept is None:
                kept = np.empty((num_classes, *full.shape), PROBABILITY_DTYPE)
            kept[k] = full
            del full
        del plane
    del best
    if postprocessing is not None and postprocessing.active:
        removed = postprocessing.apply(labels, props.get("body"))
        if kept is not None and removed.any():
            removed_raw, _ = uncrop_to_original(removed, props, fill_value=False)
            kept[:, removed_raw] = 0
            kept[0, removed_raw] = 1
        del removed
    labels_raw, geometry = uncrop_to_original(labels, props, fill_value=0)
    return np.ascontiguousarray(labels_raw), geometry, kept


def export_case(probes: list[TrainedProbe], result: WindowResult, out_path: Path,
                timings: dict[str, float] | None = None, output_type: str = "nifti",
                postprocessing: Postprocessing | None = None) -> Path:
    """Label map (and probabilities) back to the input's raw geometry, postprocessed, written atomically
    (runs in a thread).

    ``output_type``: label map image, DICOM SEG or both (``diffprobe.predict.outputs``; ``out_path``
    from its ``output_paths``)."""
    started = time.perf_counter()
    resampling = probes[0].meta["plans"]["preprocessing"]["resampling"]
    probabilities, result.probabilities = result.probabilities, None  # the result no longer pins them
    labels, geometry, kept = to_raw_grid(probabilities, result.props, resampling, result.save_probabilities,
                                         postprocessing)
    del probabilities
    if kept is not None:
        npz = out_path.parent / f"{result.case.identifier}.npz"
        with atomic_path(npz, ".npz") as tmp:
            np.savez_compressed(tmp, probabilities=kept)
        del kept
    write_outputs(labels, geometry, result.case, probes[0].meta["labels"], out_path, output_type,
                  model_description([p.meta for p in probes]))
    add_time(timings, "export_s", started)
    return out_path
