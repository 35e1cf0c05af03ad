"""Read access to a preprocessed dataset for the stages after preprocessing.

Why its own module: pretraining, probing and the ablations all need "the finished cases of
dataset X and its plans"; they must not import the orchestration that wrote them.
"""

from __future__ import annotations

from pathlib import Path

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.planning.plans import PLANS_FILENAME, load_plans
from diffprobe.preprocessing.preprocess import preprocessing_hash
from diffprobe.preprocessing.storage import is_finished


def preprocessed_cases(dataset: str | int) -> tuple[Path, dict, list[str]]:
    """(data folder, plans, finished case ids) of a preprocessed dataset, for later stages."""
    out = paths.preprocessed_dir(dataset)
    plans = load_plans(out / PLANS_FILENAME)
    data_dir = out / "data"
    phash = preprocessing_hash(plans)
    ids = sorted(p.stem for p in data_dir.glob("*.json") if is_finished(data_dir, p.stem, phash))
    if not ids:
        raise DiffprobeError("no preprocessed cases", data_dir,
                             f"run `diffprobe plan_and_preprocess -d {dataset}`")
    return data_dir, plans, ids
