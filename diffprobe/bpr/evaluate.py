"""Does the BPR give the same organ the same coordinates across scans?

For every labelled preprocessed case and every organ present, the organ's centroid is
taken (a) in raw array coordinates (voxel index × spacing, mm from the array corner — what
a model without position inference would see) and (b) in BPR coordinates (converted to mm
with the *learnt* scale: per axis, the slope of the coordinate against millimetres within each
scan, averaged over scans — so a collapsed or shrunken coordinate map cannot look
consistent just because its values are small). The spread of each organ's centroids across cases (std per axis,
averaged over axes, in mm) is compared: a BPR that infers position from anatomy must have
a smaller spread than the array frame, whose origin moves with each scan's field of view.

How small it can get: a BPR with a fixed scale (mm) can at best shift each scan's frame; organs
still move relative to each other between patients (size, shape). ``rigid_bound_mm`` is that
floor, the spread left after the best translation per case (least squares over all its organs,
an oracle that knows the labels); a ratio below ``rigid_bound_ratio`` is out of reach of any
such coordinate system on these cases.

``scan_quality`` and ``tile_disagreement`` judge one scan: is the cranio-caudal coordinate
monotone along it, does it span the scan, and do two overlapping inference tiles agree.
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
    by_case: dict[str, dict[str, np.ndarray]] = {}  # case -> organ -> array-mm centroid (x, y, z)
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
            by_case.setdefault(ident, {})[name] = idx[::-1]
            bpr.setdefault(name, []).append(np.array([coords[c][mask].mean() for c in range(3)]) / scale)
    per_organ = {}
    for name in raw:
        if len(raw[name]) < min_cases:
            continue
        r, b = np.stack(raw[name]), np.stack(bpr[name])
        per_organ[name] = {"cases": len(r), "array_mm": float(r.std(axis=0).mean()),
                           "bpr_mm": float(b.std(axis=0).mean()),
                           "array_mm_cc": float(r[:, 2].std()), "bpr_mm_cc": float(b[:, 2].std()),
                           "array_mm_axes": r.std(axis=0).tolist(), "bpr_mm_axes": b.std(axis=0).tolist()}
    if not per_organ:
        return {"organs": {}, "array_mm": None, "bpr_mm": None, "ratio": None}
    arr = float(np.mean([v["array_mm"] for v in per_organ.values()]))
    bp = float(np.mean([v["bpr_mm"] for v in per_organ.values()]))
    arr_axes = np.mean([v["array_mm_axes"] for v in per_organ.values()], axis=0)
    bpr_axes = np.mean([v["bpr_mm_axes"] for v in per_organ.values()], axis=0)
    return {"organs": per_organ, "array_mm": arr, "bpr_mm": bp, "ratio": bp / arr if arr else None,
            "array_mm_axes": dict(zip(("LR", "AP", "CC"), arr_axes.tolist())),
            "bpr_mm_axes": dict(zip(("LR", "AP", "CC"), bpr_axes.tolist())),
            "learnt_scale_per_mm": scale.tolist(), "anchored_scale_per_mm": scale_per_mm,
            **rigid_bound(by_case, list(per_organ), arr),
            "definition": "std of organ centroids across cases, averaged over the 3 axes and over organs (mm)"}


def rigid_bound(by_case: dict[str, dict[str, np.ndarray]], organs: list[str], array_mm: float,
                iterations: int = 50) -> dict:
    """The organ-centroid spread left after the best translation of each case (least squares).

    Alternates organ means and per-case shifts (``x_co = t_c + m_o + residual``, over the organs
    each case has). The residual spread, averaged like ``organ_centroid_spread``'s, is what any
    coordinate system that only moves each scan's frame (a BPR at a fixed mm scale) cannot beat.
    """
    cases = [c for c in by_case if any(o in by_case[c] for o in organs)]
    if not cases or not organs:
        return {"rigid_bound_mm": None, "rigid_bound_ratio": None}
    shift = {c: np.zeros(3) for c in cases}
    for _ in range(iterations):
        mean = {o: np.mean([by_case[c][o] - shift[c] for c in cases if o in by_case[c]], axis=0) for o in organs}
        shift = {c: np.mean([by_case[c][o] - mean[o] for o in organs if o in by_case[c]], axis=0) for c in cases}
    spread = [np.stack([by_case[c][o] - shift[c] for c in cases if o in by_case[c]]).std(axis=0) for o in organs]
    axes = np.mean(spread, axis=0)
    bound = float(axes.mean())
    return {"rigid_bound_mm": bound, "rigid_bound_mm_axes": dict(zip(("LR", "AP", "CC"), axes.tolist())),
            "rigid_bound_ratio": bound / array_mm if array_mm else None}


# ---- per-scan quality ----------------------------------------------------------------------------
CHANNEL_AXES = ((0, 2), (1, 1), (2, 0))  # (channel, numpy axis it runs along): LR-x, AP-y, CC-z
CHANNEL_NAMES = ("LR", "AP", "CC")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 values or a constant input."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def axis_profile(coords: np.ndarray, channel: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean of coordinate ``channel`` per index along its own axis (over ``mask`` where given; nan if empty)."""
    axis = dict(CHANNEL_AXES)[channel]
    values = np.moveaxis(coords[channel].astype(np.float64), axis, 0).reshape(coords.shape[1 + axis], -1)
    if mask is None:
        return values.mean(axis=1)
    m = np.moveaxis(mask, axis, 0).reshape(values.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m.sum(1) > 0, (values * m).sum(1) / np.maximum(m.sum(1), 1), np.nan)


def tile_disagreement(model, volume: np.ndarray, crop: tuple[int, int, int], scale_per_mm: float,
                      max_pairs: int = 9, seed: int = 0, axes: list[int] | None = None) -> dict:
    """How much two overlapping inference tiles disagree on the same voxels (mm, per channel).

    Pairs of crops shifted along one axis, in turn along each axis the volume is longer than the
    crop (only there does inference tile), at random places: by half a crop. Along an axis given in
    ``axes`` where the volume is shorter than the crop, the shift moves the whole volume from the
    crop's low end (where inference puts it) to its high end. The model's outputs are compared on
    their common cells (the shift is a multiple of the output stride) and the mean absolute
    difference is converted to mm with ``scale_per_mm``. A model whose coordinates are absolute
    (read off the anatomy) gives ~0; one that predicts crop-relative coordinates gives about the
    shift in mm along the shifted axis — the cause of stripes at the tile period after Gaussian
    blending (a flat, striped map). ``{"mm": None}`` when the volume fits in one tile and no
    ``axes`` are given.
    """
    import torch

    from diffprobe.bpr.pairs import extract_crop

    vol = np.asarray(volume, np.float32)
    vol = vol[None] if vol.ndim == 3 else vol
    stride = model.total_stride
    dims = vol.shape[1:]
    axes = [a for a in range(3) if dims[a] > crop[a]] if axes is None else [int(a) for a in axes]
    if not axes:
        return {"mm": None, "mm_by_shift_axis": {}, "pairs": 0, "note": "the volume fits in one tile"}
    rng = np.random.default_rng(seed)
    param = next(model.parameters())
    diffs: dict[str, list[float]] = {name: [] for name in CHANNEL_NAMES}
    per_axis: dict[str, list[float]] = {"zyx"[a]: [] for a in axes}
    shifts: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for i in range(max_pairs):
            axis = axes[i % len(axes)]
            shift = np.zeros(3, np.int64)
            if dims[axis] > crop[axis]:
                shift[axis] = max(stride[axis], crop[axis] // 2 // stride[axis] * stride[axis])
            else:  # the whole volume from the crop's low end to its high end
                shift[axis] = -((crop[axis] - dims[axis]) // stride[axis] * stride[axis])
            hi = np.maximum(np.array(dims) - np.array(crop) - np.maximum(shift, 0), 0)
            start = np.array([int(rng.integers(0, h + 1)) for h in hi])
            start -= start % np.array(stride)
            a = extract_crop(vol, start, crop)
            b = extract_crop(vol, start + shift, crop)
            with torch.no_grad():
                out = model(torch.from_numpy(np.stack([a, b])).to(device=param.device, dtype=param.dtype)).float()
            k = int(shift[axis] // stride[axis])  # cell j of a is cell j - k of b
            n = out.shape[2 + axis]
            sl_a, sl_b = [slice(None)] * 3, [slice(None)] * 3
            sl_a[axis], sl_b[axis] = (slice(k, n), slice(0, n - k)) if k >= 0 else (slice(0, n + k), slice(-k, n))
            d = (out[0][(slice(None), *sl_a)] - out[1][(slice(None), *sl_b)]).abs().mean(dim=(1, 2, 3)).cpu().numpy()
            for c, name in enumerate(CHANNEL_NAMES):
                diffs[name].append(float(d[c]) / scale_per_mm)
            per_axis["zyx"[axis]].append(float(d.mean()) / scale_per_mm)
            shifts["zyx"[axis]] = float(abs(shift[axis]))
    finally:
        model.train(was_training)
    return {"mm": {k: float(np.mean(v)) for k, v in diffs.items()},
            "mm_by_shift_axis": {k: float(np.mean(v)) for k, v in per_axis.items() if v},
            "shift_voxels": shifts, "pairs": max_pairs}


def scan_quality(coords: np.ndarray, spacing_zyx, scale_per_mm: float, image: np.ndarray | None = None,
                 body_threshold: float = -0.3) -> dict:
    """Per-scan quality of a BPR map ``coords`` (3, z, y, x), channels (LR, AP, CC).

    * ``spearman_cc``: Spearman rho between slice index and the slice's mean CC coordinate (the
      issue's monotonicity criterion); ``spearman_cc_body``: the same over body voxels only
      (``image`` > ``body_threshold`` in normalised units, about -540 HU for the default window);
      ``spearman`` per channel along its own axis;
    * ``range_mm``: the profile's range (max - min of the per-index means) / ``scale_per_mm`` —
      a correct map spans about the scan length (CC) or body width (LR, AP);
    * ``extent_mm``: the scan's physical extent along each channel's axis;
    * ``slope``: least-squares slope of the profile against mm, as a fraction of ``scale_per_mm``
      (1 = the anchored scale);
    * ``roughness_mm``: RMS of the profile's second differences / ``scale_per_mm`` — periodic
      stripes (tile artefacts) show up here even when the trend is right.
    """
    coords = np.asarray(coords, np.float32)
    spacing = np.asarray(spacing_zyx, float)
    mask = None
    if image is not None:
        img = np.asarray(image)
        img = img[0] if img.ndim == 4 else img
        mask = img > body_threshold
    out: dict = {"shape": list(coords.shape[1:]), "spacing": spacing.tolist(), "spearman": {}, "range_mm": {},
                 "extent_mm": {}, "slope": {}, "roughness_mm": {}}
    for channel, axis in CHANNEL_AXES:
        name = CHANNEL_NAMES[channel]
        prof = axis_profile(coords, channel)
        mm = np.arange(prof.size) * spacing[axis]
        out["spearman"][name] = spearman(np.arange(prof.size), prof)
        out["range_mm"][name] = float(np.ptp(prof) / scale_per_mm)
        out["extent_mm"][name] = float(prof.size * spacing[axis])
        out["slope"][name] = float(np.polyfit(mm, prof, 1)[0] / scale_per_mm) if prof.size > 1 else float("nan")
        out["roughness_mm"][name] = float(np.sqrt(np.mean(np.diff(prof, 2) ** 2)) / scale_per_mm) \
            if prof.size > 2 else float("nan")
    out["spearman_cc"] = out["spearman"]["CC"]
    if mask is not None:
        prof = axis_profile(coords, 2, mask)
        ok = np.isfinite(prof)
        out["spearman_cc_body"] = spearman(np.arange(prof.size)[ok], prof[ok])
    return out
