"""Cross-validation splits, nnU-Net style.

``splits_final.json`` holds a list of ``{"train": [...], "val": [...]}``; diffprobe creates
it with nnU-Net's own 5-fold generator (same seed, so the folds equal nnU-Net's for the same
cases) in ``<preprocessed>/DatasetXXX/diffprobe/``. A user-written file there, or nnU-Net's
``<preprocessed>/DatasetXXX/splits_final.json``, is honoured as it is.
"""

from __future__ import annotations

from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.utils import read_json, write_json

SPLITS_FILENAME = "splits_final.json"


def load_or_create_splits(preprocessed_dir: Path, labelled_ids: list[str],
                          n_splits: int = 5) -> tuple[list[dict], Path]:
    """The splits and the file they came from (created when neither location has one)."""
    for path in (preprocessed_dir / SPLITS_FILENAME, preprocessed_dir.parent / SPLITS_FILENAME):
        if path.is_file():
            try:
                splits = read_json(path)
                if not isinstance(splits, list) or not all({"train", "val"} <= set(s) for s in splits):
                    raise ValueError("not a list of {'train': [...], 'val': [...]}")
            except ValueError as e:
                raise DiffprobeError(f"malformed splits file ({e})", path,
                                     "fix it (a JSON list of {\"train\": [...], \"val\": [...]}) or delete it") from e
            return splits, path
    if len(labelled_ids) < 2:
        raise DiffprobeError(f"{len(labelled_ids)} labelled case(s): cross-validation needs at least 2",
                             preprocessed_dir, "add labelled cases or train with -f all")
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = generate_crossval_split(sorted(labelled_ids), seed=12345, n_splits=min(n_splits, len(labelled_ids)))
    path = preprocessed_dir / SPLITS_FILENAME
    write_json(path, splits)
    return splits, path


def parse_fold(fold: str | int, num_folds: int | None = None, source: Path | None = None) -> str:
    """``'all'`` or a fold number as folder names write it (``'01'`` -> ``'1'``); refuses anything else.

    Why: ``int()`` alone accepts ``-1``, which indexes Python's last split ("fold -1" silently
    trains fold 4 into ``fold_-1/``). With ``num_folds`` (the splits file ``source`` holds that
    many) a fold past the last one is refused too, naming the valid range.
    """
    text = str(fold).strip()
    if text == "all":
        return text
    if num_folds is None:
        valid, fix = "from 0 (5 folds by default: 0 to 4)", "use -f 0..4 (fewer if the splits file has fewer) or -f all"
    else:
        where = f" in {source.name}" if source is not None else ""
        valid, fix = f"0 to {num_folds - 1} ({num_folds} folds{where})", f"use -f 0..{num_folds - 1} or -f all"
    number = text.isascii() and text.isdigit()
    if not number or (num_folds is not None and int(text) >= num_folds):
        negative = "; they do not count from the end (-1 is not the last fold)" if text.startswith("-") else ""
        more = "; for more folds write a splits file with more splits" if number else ""
        raise DiffprobeError(f"-f {fold}: fold '{fold}' does not exist, folds are numbered {valid}{negative}",
                             source, f"{fix} (every labelled case){more}")
    return str(int(text))


def fold_cases(preprocessed_dir: Path, labelled_ids: list[str], fold: str) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) for fold ``0``..``4`` or ``all`` (validation = training cases, as nnU-Net)."""
    if str(fold).strip() == "all":
        return sorted(labelled_ids), sorted(labelled_ids)
    splits, path = load_or_create_splits(preprocessed_dir, labelled_ids)
    index = int(parse_fold(fold, len(splits), path))
    split = splits[index]
    known = set(labelled_ids)
    missing = [c for c in split["train"] + split["val"] if c not in known]
    if missing:
        raise DiffprobeError(f"fold {index} names cases that are not preprocessed labelled cases: "
                             f"{', '.join(missing[:5])}", path, "fix the splits file or preprocess those cases")
    return list(split["train"]), list(split["val"])
