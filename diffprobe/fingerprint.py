"""Dataset fingerprint: spacings, shapes and intensity statistics, plus the integrity check.

nnU-Net samples foreground intensities from labelled voxels. Unlabelled CT has none,
so diffprobe samples from the body mask (CT: largest component > -500 HU; other
modalities: non-zero mask) of every case, labelled or not. Every case is checked while
it is read (:mod:`diffprobe.dataset.integrity`); all problems are reported together.
Writes ``dataset_fingerprint.json`` into the dataset's preprocessed folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.dataset.cases import Case, list_cases
from diffprobe.dataset.dataset_json import DatasetInfo, load_dataset_json
from diffprobe.dataset.integrity import check_case
from diffprobe.errors import IntegrityError
from diffprobe.parallel import parallel_map
from diffprobe.preprocessing.cropping import bounding_box, foreground_mask

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10000
AXIS_ORDER = ("z, y, x: numpy order of canonical (LPS) arrays; z = inferior->superior, "
              "y = anterior->posterior, x = right->left")


def _case_fingerprint(case: Case, info: DatasetInfo, seed: int) -> dict:
    checked, problems = check_case(case, info)
    if checked is None:
        return {"identifier": case.identifier, "problems": problems}
    ct = [c for c in range(info.num_channels) if info.is_ct(c)]
    mask = foreground_mask(checked.data, ct)
    box = bounding_box(mask)
    rng = np.random.default_rng(seed)
    samples = {}
    for c in range(checked.data.shape[0]):
        values = checked.data[c][mask] if mask.any() else checked.data[c].ravel()
        take = min(SAMPLES_PER_CASE, values.size)
        samples[c] = rng.choice(values, take, replace=False) if take else values
    counts = None
    if checked.seg is not None:
        ids, n = np.unique(checked.seg, return_counts=True)
        counts = {int(i): int(k) for i, k in zip(ids, n)}
    return {
        "identifier": case.identifier,
        "problems": [],
        "notes": checked.notes,
        "labelled": checked.seg is not None,
        "spacing": list(reversed(checked.canonical_geometry.spacing)),
        "shape_before_crop": list(checked.data.shape[1:]),
        "shape_after_crop": [hi - lo for lo, hi in box],
        "samples": samples,
        "class_voxel_counts": counts,
    }


def _intensity_stats(values: np.ndarray) -> dict:
    v = values.astype(np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(np.percentile(v, 0.5)),
        "percentile_99_5": float(np.percentile(v, 99.5)),
    }


def compute_fingerprint(raw_dataset_dir: str | Path, num_processes: int = 2, show_progress: bool = True) -> dict:
    """Check and fingerprint every training case of a raw dataset; raise IntegrityError on problems."""
    info = load_dataset_json(raw_dataset_dir)
    cases, problems = list_cases(info, "train")
    results = parallel_map(_case_fingerprint, cases, num_processes, "fingerprint + integrity check",
                           show_progress, extra_args=(info, 1234))
    good = [r for r in results if not r["problems"]]
    for r in results:
        problems.extend(r["problems"])
    if problems:
        raise IntegrityError(problems, dataset=info.name)
    return assemble_fingerprint(info, good)


def assemble_fingerprint(info: DatasetInfo, per_case: list[dict]) -> dict:
    spacings = np.array([r["spacing"] for r in per_case], dtype=float)
    after = np.array([r["shape_after_crop"] for r in per_case], dtype=float)
    intensity = {}
    for c in range(info.num_channels):
        pooled = np.concatenate([r["samples"][c] for r in per_case])
        intensity[str(c)] = _intensity_stats(pooled)
    class_counts: dict[str, int] = {name: 0 for name in info.labels}
    id_to_name = {v: k for k, v in info.labels.items()}
    for r in per_case:
        for i, n in (r["class_voxel_counts"] or {}).items():
            class_counts[id_to_name[i]] += n
    notes = [n for r in per_case for n in r["notes"]]
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset": info.name,
        "axis_order": AXIS_ORDER,
        "num_cases": len(per_case),
        "num_labelled": sum(r["labelled"] for r in per_case),
        "channel_names": {str(k): v for k, v in info.channel_names.items()},
        "labels": dict(info.labels),
        "intensity_mask": {str(c): ("body: largest component > -500 HU" if info.is_ct(c) else "non-zero voxels")
                           for c in range(info.num_channels)},
        "spacings": spacings.tolist(),
        "shapes_before_crop": [r["shape_before_crop"] for r in per_case],
        "shapes_after_crop": after.astype(int).tolist(),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_shape_after_crop": np.median(after, axis=0).tolist(),
        "foreground_intensity_properties_per_channel": intensity,
        "class_voxel_counts": class_counts,
        "cases": [r["identifier"] for r in per_case],
        "labelled_cases": [r["identifier"] for r in per_case if r["labelled"]],
        "notes": notes,
    }

