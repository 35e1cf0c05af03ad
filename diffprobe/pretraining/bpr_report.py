"""The BPR reports pretraining writes once the maps exist (docs/bpr.md).

``bpr_consistency.json`` (organ-centroid spread in BPR vs array coordinates), ``bpr_quality.json``
(per scan: monotonicity, ranges, slopes, roughness, tile disagreement), ``bpr_profiles.png``,
``bpr_figures/<dataset>/bpr_coordinates_<case>.png`` (the first scans) and ``bpr_coordinates.png``.

The per-scan quality runs the BPR again on pairs of tiles: it costs about what the maps cost, so
under DDP every rank measures its share of the scans (and draws the figures of its share), and
rank 0 gathers the measurements and writes the reports; the others wait for it in one
``together`` block, which stops them all with rank 0's message if it fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffprobe.preprocessing.storage import load_array
from diffprobe.preprocessing.volumes import VolumeRef
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.training import distributed as dist_utils
from diffprobe.utils import read_json, write_json

BPR_QUALITY_MIN_SPEARMAN = 0.95  # the cranio-caudal coordinate must be monotone along each scan (docs/bpr.md)
BPR_MAX_SCAN_FIGURES = 24  # per-scan figures: the first N scans (sorted); the report covers all


def write_bpr_reports(volumes: list[VolumeRef], out: Path, scale_per_mm: float,
                      device: torch.device | str = "cpu") -> dict | None:
    """All of the reports above for the volumes (with their BPR maps, ``guidance_path``) of the model
    folder ``out``; returns the consistency report on rank 0 (None on the others)."""
    scans, profiles, crop = _scan_qualities(volumes, out, scale_per_mm, device)
    report = None
    with dist_utils.together("BPR reports"):
        if dist_utils.is_main_process():
            from diffprobe.pretraining.plots import plot_bpr_coordinates

            plot_bpr_coordinates(volumes[0], out / "bpr_coordinates.png")
            report = _write_consistency(volumes, out, scale_per_mm)
            _write_quality(scans, profiles, out, scale_per_mm, crop, report)
    return report


def _write_consistency(volumes: list[VolumeRef], out: Path, scale_per_mm: float) -> dict:
    """Organ-centroid spread in BPR vs array coordinates on the labelled volumes (``bpr_consistency.json``)."""
    from diffprobe.bpr.evaluate import organ_centroid_spread

    by_dir: dict[Path, list[VolumeRef]] = {}
    for v in volumes:
        by_dir.setdefault(v.data_dir, []).append(v)
    report = {}
    for data_dir, refs in by_dir.items():
        maps = {r.identifier: load_array(r.guidance_path) for r in refs}
        labels = read_json(data_dir.parent / "plans.json")["labels"]
        report[data_dir.parent.parent.name] = organ_centroid_spread(
            data_dir, [r.identifier for r in refs], maps, labels, scale_per_mm)
    write_json(out / "bpr_consistency.json", report)
    return report


def _sorted(volumes: list[VolumeRef]) -> list[VolumeRef]:
    return sorted(volumes, key=lambda v: (v.data_dir.parent.parent.name, v.identifier))


def _scan_qualities(volumes: list[VolumeRef], out: Path, scale_per_mm: float,
                    device: torch.device | str) -> tuple[dict, dict, list[int] | None]:
    """``scan_quality`` (+ tile disagreement with the model's trained BPR) and the CC profile of every
    scan, in sorted order, and the BPR's crop; under DDP each rank measures its share and every
    rank gets them all."""
    from diffprobe.bpr.evaluate import axis_profile, scan_quality, tile_disagreement
    from diffprobe.pretraining.plots import plot_bpr_scan

    ordered = _sorted(volumes)
    share = dist_utils.balanced_shares([float(np.prod(v.shape)) for v in ordered])[dist_utils.rank()]
    mine = {}
    with dist_utils.together("BPR quality"):
        model = crop = None
        pm = PretrainedModel(out.name)
        if pm.folder.resolve() == out.resolve() and pm.bpr_checkpoint.is_file():
            model, crop = pm.load_bpr(device)
        for i in share:
            ref = ordered[i]
            dataset = ref.data_dir.parent.parent.name
            image = load_array(ref.data_path)
            coords = load_array(ref.guidance_path).astype(np.float32)
            q = scan_quality(coords, ref.spacing, scale_per_mm, image)
            if model is not None:
                tiles = tile_disagreement(model, image, tuple(crop), scale_per_mm)
                q["tile_disagreement_mm"] = tiles["mm"]
                q["tile_disagreement_by_shift_axis_mm"] = tiles["mm_by_shift_axis"]
            q["monotone"] = bool(q["spearman_cc"] >= BPR_QUALITY_MIN_SPEARMAN)
            key = f"{dataset}/{ref.identifier}"
            mine[i] = (key, q, (np.arange(coords.shape[1]) * ref.spacing[0],
                                axis_profile(coords, 2) / scale_per_mm, q["spearman_cc"]))
            if i < BPR_MAX_SCAN_FIGURES:
                plot_bpr_scan(image[0], coords, ref.spacing, scale_per_mm, f"BPR coordinates: {key}",
                              out / "bpr_figures" / dataset / f"bpr_coordinates_{ref.identifier}.png", q)
    gathered = {i: v for part in dist_utils.gather_objects(mine) for i, v in part.items()}
    scans = {gathered[i][0]: gathered[i][1] for i in sorted(gathered)}
    profiles = {gathered[i][0]: gathered[i][2] for i in sorted(gathered)}
    return scans, profiles, crop


def _write_quality(scans: dict, profiles: dict, out: Path, scale_per_mm: float, crop: list[int] | None,
                   consistency: dict | None) -> dict:
    """``bpr_quality.json`` and ``bpr_profiles.png`` from the gathered per-scan measurements.

    Per scan (``diffprobe.bpr.evaluate.scan_quality``): Spearman rho between slice index and the
    slice's mean CC coordinate, coordinate ranges and slopes in mm-equivalents, profile roughness,
    and the tile disagreement (two inference tiles half a crop apart, on the same voxels) when the
    scan needs more than one tile and the model folder holds its trained BPR.
    """
    from diffprobe.pretraining.plots import plot_bpr_profiles

    rhos = [q["spearman_cc"] for q in scans.values()]
    report = {
        "definition": {
            "spearman_cc": "Spearman rho between slice index and the slice's mean CC coordinate",
            "range_mm": "max - min of the per-index mean coordinate along its own axis, / scale_per_mm",
            "extent_mm": "the scan's physical length along that axis", "slope": "fitted slope / scale_per_mm",
            "roughness_mm": "RMS second difference of that profile / scale_per_mm (tile stripes)",
            "tile_disagreement_mm": "mean |difference| of two tiles half a crop apart on common voxels, mm "
                                    "(absent when the scan fits one tile)"},
        "scale_per_mm": scale_per_mm, "min_spearman": BPR_QUALITY_MIN_SPEARMAN, "crop": crop,
        "summary": {"scans": len(scans), "monotone": int(sum(q["monotone"] for q in scans.values())),
                    "min_spearman_cc": float(np.nanmin(rhos)) if rhos else None,
                    "consistency_ratio": {k: v.get("ratio") for k, v in (consistency or {}).items()},
                    "rigid_bound_ratio": {k: v.get("rigid_bound_ratio") for k, v in (consistency or {}).items()}},
        "scans": scans,
    }
    write_json(out / "bpr_quality.json", report)
    if profiles:
        plot_bpr_profiles(dict(list(profiles.items())[:BPR_MAX_SCAN_FIGURES * 2]), out / "bpr_profiles.png")
    return report
