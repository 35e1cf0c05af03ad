"""Per-class segmentation metrics: Dice, normalised surface Dice (NSD) and HD95.

Why three metrics: Dice scores volume overlap, so it barely notices a wrong boundary on a
large organ and punishes a one-voxel slip on a small one; NSD asks how much of the boundary
lies within a tolerance (mm) of the true boundary, which is what a clinician checking a
contour cares about (Nikolov et al. 2018, arXiv 1809.04430); HD95 gives the robust worst
boundary error in mm, so a stray blob far away is visible even when Dice is high.

Arrays are numpy (z, y, x) boolean masks or integer label maps; ``spacing`` is the voxel
size in mm in the same (z, y, x) order, so distances are physical, not in voxels.

Edge cases (Dice as in nnU-Net, distances as in MONAI):

- class absent from reference and prediction: every metric is NaN (nothing to score);
  means skip NaN (``nanmean``), exactly like nnU-Net's ``summary.json``;
- class in only one of them: Dice 0, NSD 0, HD95 ``inf`` (no surface to measure against;
  ``inf`` rather than NaN so that a missed or hallucinated organ cannot vanish from a mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

# 6-connectivity: a voxel is on the surface when one of its face neighbours is outside.
SURFACE_STRUCTURE = generate_binary_structure(3, 1)
# Bounding-box margin (voxels) around both masks. One voxel is exact: erosion needs one
# background voxel beyond the object, and Euclidean distances between surface voxels that
# all lie inside the box do not depend on what is outside it.
CROP_MARGIN = 1
METRIC_NAMES = ("Dice", "NSD", "HD95")


def _as_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"spacing must be three positive (z, y, x) values in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """2|R∩P| / (|R|+|P|); NaN when both masks are empty (nnU-Net's convention)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn  # imports torch: keep lazy

    tp, fp, fn, _ = compute_tp_fp_fn_tn(np.asarray(ref, bool), np.asarray(pred, bool))
    denominator = 2 * tp + fp + fn
    return float("nan") if denominator == 0 else float(2 * tp / denominator)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask XOR its erosion by the 6-connected cross.

    Voxels on the array border count as surface (outside the array is background).
    """
    mask = np.asarray(mask, bool)
    return mask ^ binary_erosion(mask, structure=SURFACE_STRUCTURE, border_value=0)


def bounding_box(mask: np.ndarray, margin: int = CROP_MARGIN) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel, grown by ``margin`` (clipped)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def surface_distances(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``ref`` to the surface of ``pred``, and back.

    Both masks must be non-empty. Work happens in the bounding box of both masks (plus
    ``CROP_MARGIN``), so a small organ in a large CT costs a small distance transform.
    """
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    if not ref.any() or not pred.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = _as_spacing(spacing)
    box = bounding_box(ref | pred)
    surf_ref, surf_pred = surface(ref[box]), surface(pred[box])
    to_pred = distance_transform_edt(~surf_pred, sampling=sampling)
    to_ref = distance_transform_edt(~surf_ref, sampling=sampling)
    return to_pred[surf_ref], to_ref[surf_pred]


def nsd_from_distances(ref_to_pred: np.ndarray, pred_to_ref: np.ndarray, tolerance_mm: float) -> float:
    """Fraction of all surface voxels (both masks) within ``tolerance_mm`` of the other surface."""
    within = np.count_nonzero(ref_to_pred <= tolerance_mm) + np.count_nonzero(pred_to_ref <= tolerance_mm)
    return float(within / (ref_to_pred.size + pred_to_ref.size))


def hd95_from_distances(ref_to_pred: np.ndarray, pred_to_ref: np.ndarray) -> float:
    """95th percentile of both directed distance sets pooled (medpy / nnU-Net v1 ``hd95``)."""
    return float(np.percentile(np.concatenate([ref_to_pred, pred_to_ref]), 95))


def normalized_surface_dice(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float) -> float:
    """Nikolov et al.'s surface Dice at ``tolerance_mm`` (voxel-counted); edge cases as documented above."""
    return class_metrics(ref, pred, spacing, tolerance_mm)["NSD"]  # type: ignore[return-value]


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm; NaN if both empty, inf if one is."""
    return class_metrics(ref, pred, spacing, tolerance_mm=0.0)["HD95"]  # type: ignore[return-value]


def class_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                  tolerance_mm: float) -> dict[str, float | int]:
    """Dice, NSD, HD95 and voxel counts (``n_ref``, ``n_pred``) of one class.

    The surface distances are computed once and shared by NSD and HD95.
    """
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    if ref.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {ref.shape} vs {pred.shape}")
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    out: dict[str, float | int] = {"Dice": dice(ref, pred)}
    if n_ref == 0 and n_pred == 0:
        out.update(NSD=float("nan"), HD95=float("nan"))
    elif n_ref == 0 or n_pred == 0:
        out.update(NSD=0.0, HD95=float("inf"))
    else:
        ref_to_pred, pred_to_ref = surface_distances(ref, pred, spacing)
        out.update(NSD=nsd_from_distances(ref_to_pred, pred_to_ref, tolerance_mm),
                   HD95=hd95_from_distances(ref_to_pred, pred_to_ref))
    out.update(n_ref=n_ref, n_pred=n_pred)
    return out


def case_metrics(ref_labels: np.ndarray, pred_labels: np.ndarray, labels: Iterable[int],
                 spacing: Sequence[float], tolerance_mm: float) -> dict[int, dict[str, float | int]]:
    """:func:`class_metrics` for every label id in ``labels`` of two label maps."""
    if ref_labels.shape != pred_labels.shape:
        raise ValueError(f"label maps differ in shape: {ref_labels.shape} vs {pred_labels.shape}")
    return {int(v): class_metrics(ref_labels == v, pred_labels == v, spacing, tolerance_mm) for v in labels}
