"""Big / medium / small organ groups, so that an ablation shows its effect on small structures.

The noise level of the features (and the guidance) matters differently for a liver than for an
adrenal gland; a single mean Dice hides that. Classes are grouped by their mean voxel count in
the labelled preprocessed cases (terciles of the size-sorted class list, ``docs/ablations.md``),
and every ablation table reports the mean Dice of each group.
"""

from __future__ import annotations

import numpy as np

from diffprobe.errors import DiffprobeError
from diffprobe.utils import read_json, write_json
from diffprobe.workflows.ablations.sweep import ablation_dir

SIZE_GROUPS = ("big", "medium", "small")


def class_sizes(dataset: str | int) -> dict[str, float]:
    """Mean voxel count of every foreground class over the labelled preprocessed cases.

    Cases where a class is absent count as 0. The preprocessed grid has the same spacing for
    every case, so voxel counts compare volumes. Cached in ``ablations/class_sizes.json``
    (keyed by the preprocessing hash and the case list).
    """
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.preprocessing.preprocess import preprocessing_hash
    from diffprobe.preprocessing.storage import case_paths, load_array
    from diffprobe.workflows.train_probe import labelled_ids

    data_dir, plans, ids = preprocessed_cases(dataset)
    labelled = labelled_ids(data_dir, ids)
    if not labelled:
        raise DiffprobeError("no labelled preprocessed case", data_dir, "add labelsTr and rerun plan_and_preprocess")
    key = {"preprocessing_hash": preprocessing_hash(plans), "cases": labelled}
    cache = ablation_dir(dataset, "class_sizes.json")
    if cache.is_file():
        try:
            old = read_json(cache)
            if {k: old.get(k) for k in key} == key:
                return {k: float(v) for k, v in old["mean_voxels"].items()}
        except (ValueError, KeyError, OSError):
            pass
    names = {v: k for k, v in plans["labels"].items() if v != 0}
    n = max(plans["labels"].values()) + 1
    totals = np.zeros(n, dtype=np.float64)
    for ident in labelled:
        seg = load_array(case_paths(data_dir, ident)["seg"])  # only the label map, not the image
        totals += np.bincount(seg.reshape(-1).astype(np.int64), minlength=n)[:n]
    sizes = {names[v]: float(totals[v] / len(labelled)) for v in sorted(names)}
    groups = size_groups(sizes)
    write_json(cache, {**key, "mean_voxels": sizes, "groups": groups})
    return sizes


def size_groups(sizes: dict[str, float]) -> dict[str, list[str]]:
    """Terciles of the classes sorted by size (largest first): big / medium / small.

    ``np.array_split`` rule: group sizes differ by at most one, the larger groups first
    (7 classes -> 3 / 2 / 2; 2 classes -> big 1, medium 1, small empty). Ties keep label order.
    """
    order = sorted(sizes, key=lambda c: -sizes[c])  # stable: equal sizes keep the label order
    parts = np.array_split(np.arange(len(order)), 3)
    return {g: [order[i] for i in part] for g, part in zip(SIZE_GROUPS, parts)}
