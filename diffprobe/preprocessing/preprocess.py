"""Preprocess one case as planned, and invert it.

Forward: canonical orientation (integrity check) -> crop to body -> resample to the target
spacing (nnU-Net's resampling: order 3 images, order 1 labels, separate-z for anisotropic
data) -> normalise. The properties record everything needed to go back to the raw
file's exact grid: the original geometry, the axis map to canonical, the crop box and
the shapes before and after resampling.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from diffprobe.dataset.cases import Case
from diffprobe.dataset.dataset_json import DatasetInfo
from diffprobe.dataset.integrity import CheckedCase, check_case
from diffprobe.errors import DiffprobeError
from diffprobe.io.geometry import AxisMap, Geometry, undo_canonical
from diffprobe.preprocessing.cropping import bounding_box, crop, fill_in_plane, foreground_mask
from diffprobe.preprocessing.normalization import normalize
from diffprobe.preprocessing.resampling import resample_to_shape

MAX_CLASS_LOCATIONS = 1000


def preprocessing_hash(plans: dict) -> str:
    """Hash of everything that changes preprocessed arrays (not patch or batch size)."""
    key = json.dumps({"v": plans["plans_version"], "pre": plans["preprocessing"]}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _resample(data: np.ndarray, new_shape: list[int], spacing: list[float], target: list[float],
              resampling: dict, is_seg: bool) -> np.ndarray:
    order = resampling["label_order"] if is_seg else resampling["image_order"]
    # nnU-Net's resampling (same numbers), slice by slice: its whole-volume float64 temporaries
    # dominated prediction RAM on CT-sized volumes (see diffprobe/preprocessing/resampling.py).
    return resample_to_shape(data, new_shape, spacing, target, is_seg, order, resampling["order_z"],
                             resampling["anisotropy_threshold"])


def class_locations(seg: np.ndarray, labels: list[int], seed: int) -> dict[str, list[list[int]]]:
    """Up to MAX_CLASS_LOCATIONS voxel coordinates per foreground class (for oversampling)."""
    rng = np.random.default_rng(seed)
    out = {}
    for lab in labels:
        if lab == 0:
            continue
        coords = np.argwhere(seg == lab)
        if len(coords) > MAX_CLASS_LOCATIONS:
            coords = coords[rng.choice(len(coords), MAX_CLASS_LOCATIONS, replace=False)]
        out[str(lab)] = coords.tolist()
    return out


def preprocess_checked(checked: CheckedCase, info: DatasetInfo, plans: dict,
                       keep_body: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, resample, normalise an integrity-checked case. Returns (data, seg, properties).

    ``keep_body`` (predict, CT): ``properties["body"]`` is the body mask on the cropped raw grid with its
    in-plane holes filled (bool array, not JSON: never written with preprocessed data), for the
    ``outside_body`` postprocessing."""
    pre = plans["preprocessing"]
    ct = [c for c in range(info.num_channels) if info.is_ct(c)]
    mask = foreground_mask(checked.data, ct)
    if not mask.any():
        raise DiffprobeError("no body found (no voxel above -500 HU / no non-zero voxel)",
                             checked.identifier, "check that the image is a CT in HU")
    box = bounding_box(mask)
    data = crop(checked.data, box)
    seg = crop(checked.seg, box) if checked.seg is not None else None
    spacing = list(reversed(checked.canonical_geometry.spacing))  # z, y, x
    target = pre["target_spacing"]
    new_shape = [int(v) for v in compute_new_shape(data.shape[1:], spacing, target)]
    new_shape = [max(1, v) for v in new_shape]
    data = _resample(data, new_shape, spacing, target, pre["resampling"], is_seg=False).astype(np.float32)
    if seg is not None:
        seg = _resample(seg[None], new_shape, spacing, target, pre["resampling"], is_seg=True)[0]
        seg = seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.uint16)
    data = normalize(data, pre["normalization"])
    props = {
        "identifier": checked.identifier,
        "preprocessing_hash": preprocessing_hash(plans),
        "labelled": seg is not None,
        "axis_order": "z, y, x (canonical)",
        "original_geometry": checked.original_geometry.to_dict(),
        "axis_map_to_canonical": checked.axis_map.to_dict(),
        "canonical_geometry": checked.canonical_geometry.to_dict(),
        "shape_before_crop": list(checked.data.shape[1:]),
        "bbox": box,
        "shape_after_crop": [hi - lo for lo, hi in box],
        "spacing_before_resampling": spacing,
        "target_spacing": list(target),
        "shape_after_resampling": new_shape,
        "class_locations": class_locations(seg, sorted(info.label_values), zlib.crc32(checked.identifier.encode()))
        if seg is not None else None,
        "notes": checked.notes,
    }
    if keep_body and ct:
        props["body"] = fill_in_plane(crop(mask, box))
    return data, seg, props


def preprocess_case(case: Case, info: DatasetInfo, plans: dict) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read, check and preprocess one raw case."""
    checked, problems = check_case(case, info)
    if checked is None:
        first = problems[0]
        raise DiffprobeError(first.what, first.file, first.fix)
    return preprocess_checked(checked, info, plans)


DEFAULT_RESAMPLING = {"image_order": 3, "label_order": 1, "order_z": 0, "anisotropy_threshold": 3.0}


def resample_to_cropped(array_zyx: np.ndarray, props: dict, is_seg: bool,
                        resampling: dict | None = None) -> np.ndarray:
    """Undo the resampling only: an array on the preprocessed grid onto the cropped raw grid.

    Separate from :func:`uncrop_to_original` so that predict can take decisions (argmax) on the
    cropped grid, one class at a time, before paying for the whole uncropped volume.
    """
    resampling = resampling or DEFAULT_RESAMPLING
    cropped_shape = props["shape_after_crop"]
    if list(array_zyx.shape) == list(cropped_shape):
        return array_zyx
    x = array_zyx[None] if is_seg else array_zyx[None].astype(np.float32, copy=False)
    return _resample(x, cropped_shape, props["target_spacing"], props["spacing_before_resampling"],
                     resampling, is_seg=is_seg)[0]


def uncrop_to_original(cropped_zyx: np.ndarray, props: dict, fill_value: float = 0) -> tuple[np.ndarray, Geometry]:
    """Undo the crop (``fill_value`` outside) and the canonical reorientation; keeps the dtype.

    Returns the array in the raw file's (z, y, x) layout and the geometry to write it with.
    """
    full = np.full(props["shape_before_crop"], fill_value, dtype=cropped_zyx.dtype)
    full[tuple(slice(lo, hi) for lo, hi in props["bbox"])] = cropped_zyx
    amap = AxisMap.from_dict(props["axis_map_to_canonical"])
    return undo_canonical(full, amap), Geometry.from_dict(props["original_geometry"])


def revert_to_original(array_zyx: np.ndarray, props: dict, is_seg: bool, fill_value: float = 0,
                       resampling: dict | None = None) -> tuple[np.ndarray, Geometry]:
    """Map an array on the preprocessed grid back onto the raw file's grid.

    Undo resampling (to the cropped shape), undo the crop (``fill_value`` outside), undo the
    canonical reorientation. Returns the array in the raw file's (z, y, x) layout (in
    ``array_zyx``'s dtype) and the geometry to write it with.
    """
    x = resample_to_cropped(array_zyx, props, is_seg, resampling)
    return uncrop_to_original(x.astype(array_zyx.dtype, copy=False), props, fill_value)


def seg_onto_preprocessed(seg_zyx: np.ndarray, props: dict, resampling: dict | None = None) -> np.ndarray:
    """A segmentation on the raw file's grid onto the case's preprocessed grid: the forward twin of
    :func:`revert_to_original` (canonical reorientation, the crop, the label resampling).

    Why: a prediction written in the input's geometry can then be read next to anything computed on
    the preprocessed grid (the BPR coordinate maps, the normalised image) without a second pipeline.
    """
    canonical = AxisMap.from_dict(props["axis_map_to_canonical"]).apply(seg_zyx)
    if list(canonical.shape) != list(props["shape_before_crop"]):
        raise ValueError(f"segmentation shape {list(seg_zyx.shape)} is not the case's raw shape "
                         f"(canonical {props['shape_before_crop']})")
    cropped = canonical[tuple(slice(lo, hi) for lo, hi in props["bbox"])]
    out_shape = props["shape_after_resampling"]
    if list(cropped.shape) == list(out_shape):
        return np.ascontiguousarray(cropped)
    return _resample(cropped[None], out_shape, props["spacing_before_resampling"], props["target_spacing"],
                     resampling or DEFAULT_RESAMPLING, is_seg=True)[0]


def preprocess_input(case: Case, plans: dict, dataset_name: str,
                     keep_body: bool = False) -> tuple[np.ndarray, dict]:
    """An unseen input (predict, features) read, integrity-checked and preprocessed as planned
    (``keep_body``: see :func:`preprocess_checked`).

    The dataset.json is not at hand for an input folder: channels and labels come from the plans.
    """
    from diffprobe.io.image_io import file_ending

    info = DatasetInfo(case.images[0].parent, dataset_name, {int(k): v for k, v in plans["channel_names"].items()},
                       plans["labels"], 0, file_ending(case.images[0]) if case.images[0].is_file() else ".nii.gz", {})
    checked, problems = check_case(case, info)
    if checked is None:
        raise DiffprobeError(problems[0].what, problems[0].file, problems[0].fix)
    data, _, props = preprocess_checked(checked, info, plans, keep_body)
    return data, props
