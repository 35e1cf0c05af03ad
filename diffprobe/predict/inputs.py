"""Which trained probe and which input files ``predict`` works on, and what it names the outputs.

The short form (``diffprobe predict -i imgs -o segs``, no ``-d``) works when exactly one trained
configuration exists; inputs are a folder of ``<case>_XXXX`` images (nnU-Net's channel suffix), a
single image, or a DICOM series folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from diffprobe import paths
from diffprobe.dataset.cases import Case
from diffprobe.errors import DiffprobeError
from diffprobe.io.image_io import SUPPORTED_ENDINGS, file_ending

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


# ---- finding models -----------------------------------------------------------------------
def trained_configurations(dataset: str | int | None = None) -> dict[tuple[str, str], list[str]]:
    """{(dataset folder name, configuration): [finished folds]} under the results root."""
    root = paths.results_root()
    names = [paths.dataset_name(dataset)] if dataset is not None else \
        sorted(p.name for p in root.glob("Dataset*") if p.is_dir()) if root.is_dir() else []
    found: dict[tuple[str, str], list[str]] = {}
    for name in names:
        base = root / name / paths.SUBFOLDER
        for ckpt in sorted(base.glob("*/fold_*/checkpoint_final.pt")):
            fold_dir = ckpt.parent
            if (fold_dir / "probe.json").is_file():
                found.setdefault((name, fold_dir.parent.name), []).append(fold_dir.name[len("fold_"):])
    return found


def select_model(dataset: str | int | None, configuration: str | None,
                 folds: list[str] | None) -> list[Path]:
    """Fold folders to predict with; the short form (no -d) works when exactly one model exists."""
    found = trained_configurations(dataset)
    if configuration is not None:
        found = {k: v for k, v in found.items() if k[1] == configuration}
    if len(found) != 1:
        listing = "\n".join(f"      -d {d} -c {c}  (folds {', '.join(f)})" for (d, c), f in sorted(found.items()))
        what = "no trained probe found" if not found else f"{len(found)} trained probes found:\n{listing}\n   "
        raise DiffprobeError(what, paths.results_root(),
                             "train one with `diffprobe train -d ID -f FOLD`" if not found
                             else "choose one with -d and -c")
    (name, config), available = next(iter(found.items()))
    from diffprobe.probe.splits import parse_fold

    # named as train names its folders ("-f 01" is fold_1); anything else ("-1") is kept, to be
    # reported below as a fold that is not trained
    folds = list(dict.fromkeys(parse_fold(f) if f == "all" or (f.isascii() and f.isdigit()) else f
                               for f in folds)) if folds else available
    missing = [f for f in folds if f not in available]
    if missing:
        raise DiffprobeError(f"fold(s) {', '.join(missing)} of {config} are not trained (available: "
                             f"{', '.join(available)})", paths.results_root() / name / paths.SUBFOLDER / config,
                             "train them first or choose existing folds with -f")
    return [paths.results_root() / name / paths.SUBFOLDER / config / f"fold_{f}" for f in folds]


# ---- finding inputs -----------------------------------------------------------------------
def _strip_ending(name: str) -> tuple[str, str] | None:
    for ending in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if name.endswith(ending):
            return name[: -len(ending)], ending
    return None


def input_cases(inputs: Path, num_channels: int) -> list[Case]:
    """Cases from a folder of ``<case>_XXXX`` images, one image file, or one DICOM series folder."""
    inputs = Path(inputs)
    if not inputs.exists():
        raise DiffprobeError("input does not exist", inputs, "pass an image, a DICOM folder or a folder of images")
    if inputs.is_file():
        split = _strip_ending(inputs.name)
        if split is None:
            raise DiffprobeError("unsupported image format", inputs, f"use one of {', '.join(SUPPORTED_ENDINGS)}")
        m = _CHANNEL_RE.match(split[0])
        return [Case(m.group("case") if m else split[0], [inputs], None, "test")]
    channels: dict[str, dict[int, Path]] = {}
    for f in sorted(inputs.iterdir()):
        split = _strip_ending(f.name) if f.is_file() and not f.name.startswith(".") else None
        m = _CHANNEL_RE.match(split[0]) if split else None
        if m:
            channels.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    if not channels:  # a DICOM series folder (read_sitk reports a folder without a series)
        # abspath, not resolve: "-i ." gets the folder's name (not ""), a symlink keeps its own name
        return [Case(Path(os.path.abspath(inputs)).name, [inputs], None, "test")]
    cases = []
    for ident, found in sorted(channels.items()):
        missing = [c for c in range(num_channels) if c not in found]
        if missing:
            raise DiffprobeError(f"case '{ident}' lacks channel {missing[0]:04d}", inputs,
                                 f"add {ident}_{missing[0]:04d} or remove the case's files")
        cases.append(Case(ident, [found[c] for c in range(num_channels)], None, "test"))
    return cases


# Detached-header formats are two files, and the atomic rename moves only the header (whose data file
# keeps its temporary name): their segmentations are written in the single-file equivalent.
_SINGLE_FILE_ENDING = {".mhd": ".mha", ".nhdr": ".nrrd"}


def output_name(case: Case) -> str:
    src = case.images[0]
    ending = file_ending(src) if src.is_file() else ".nii.gz"
    return case.identifier + _SINGLE_FILE_ENDING.get(ending, ending)
