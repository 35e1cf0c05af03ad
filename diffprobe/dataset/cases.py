"""Finding the cases of a raw dataset.

``imagesTr/<case>_<XXXX><ending>`` (one file per channel) and ``labelsTr/<case><ending>``,
or, when dataset.json has nnU-Net's ``dataset`` key, the files it lists.
A training case without a label file is *unlabelled*: it serves pretraining only.
Test cases come from ``imagesTs`` and, when present, ``labelsTs``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from diffprobe.dataset.dataset_json import DatasetInfo
from diffprobe.errors import DiffprobeError, Problem

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class Case:
    """One case: its channel images and optional label."""

    identifier: str
    images: list[Path]
    label: Path | None
    subset: str  # "train" or "test"

    @property
    def labelled(self) -> bool:
        return self.label is not None


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def list_cases(info: DatasetInfo, subset: str = "train") -> tuple[list[Case], list[Problem]]:
    """Cases of ``subset`` ('train' or 'test') and the naming problems found on the way."""
    if subset == "train" and info.file_list is not None:
        return _listed_cases(info)
    img_dir = info.folder / ("imagesTr" if subset == "train" else "imagesTs")
    lab_dir = info.folder / ("labelsTr" if subset == "train" else "labelsTs")
    problems: list[Problem] = []
    if not img_dir.is_dir():
        if subset == "train":
            raise DiffprobeError("imagesTr folder is missing", img_dir,
                                 "put training images in imagesTr/<case>_0000" + info.file_ending)
        return [], []
    channels: dict[str, dict[int, Path]] = defaultdict(dict)
    for f in sorted(img_dir.iterdir()):
        if f.name.startswith("."):
            continue
        stem = _strip_ending(f.name, info.file_ending)
        if stem is None:
            problems.append(Problem(str(f), f"file does not end with {info.file_ending} (dataset.json file_ending)",
                                    "convert it or remove it from the folder"))
            continue
        m = _CHANNEL_RE.match(stem)
        if not m:
            problems.append(Problem(str(f), "name lacks the channel suffix _0000",
                                    f"rename it to {stem}_0000{info.file_ending}"))
            continue
        ch = int(m.group("ch"))
        if ch >= info.num_channels:
            problems.append(Problem(str(f), f"channel {ch:04d} is not declared in dataset.json channel_names",
                                    "declare the channel or remove the file"))
            continue
        channels[m.group("case")][ch] = f
    cases: list[Case] = []
    for ident in sorted(channels):
        found = channels[ident]
        missing = [c for c in range(info.num_channels) if c not in found]
        if missing:
            problems.append(Problem(str(img_dir / f"{ident}_{missing[0]:04d}{info.file_ending}"),
                                    f"case '{ident}' lacks channel(s) {', '.join(f'{c:04d}' for c in missing)}",
                                    "add the missing channel file(s) or remove the case"))
            continue
        label = lab_dir / f"{ident}{info.file_ending}"
        cases.append(Case(ident, [found[c] for c in range(info.num_channels)],
                          label if label.is_file() else None, subset))
    if lab_dir.is_dir():
        known = set(channels)
        for f in sorted(lab_dir.iterdir()):
            stem = _strip_ending(f.name, info.file_ending)
            if stem is not None and stem not in known and not f.name.startswith("."):
                problems.append(Problem(str(f), "label has no matching image",
                                        f"add {img_dir.name}/{stem}_0000{info.file_ending} or remove the label"))
    if subset == "train" and not cases and not problems:
        raise DiffprobeError("imagesTr holds no images", img_dir,
                             f"add images named <case>_0000{info.file_ending}")
    return cases, problems


def _listed_cases(info: DatasetInfo) -> tuple[list[Case], list[Problem]]:
    """Training cases from dataset.json's ``dataset`` listing (paths already checked to stay inside).

    A listed file that does not exist is a problem of that case (all are reported together).
    """
    assert info.file_list is not None
    cases: list[Case] = []
    problems: list[Problem] = []
    for ident, (images, label) in sorted(info.file_list.items()):
        missing = [p for p in images + ([label] if label is not None else []) if not p.is_file()]
        if missing:
            problems.extend(Problem(str(p), f"file listed for case '{ident}' in dataset.json does not exist",
                                    "add the file or correct its path under 'dataset' in dataset.json")
                            for p in missing)
            continue
        cases.append(Case(ident, list(images), label, "train"))
    return cases, problems
