"""Loading and validating ``dataset.json`` (nnU-Net v2 raw format).

Required keys: ``channel_names`` ({"0": "CT", ...}), ``labels`` ({"background": 0, ...}),
``numTraining`` and ``file_ending``. Region-based labels (lists) are not supported.
The optional ``dataset`` key (nnU-Net v2: ``{case: {"images": [...], "label": ...}}``) lists
the training files explicitly; unlike nnU-Net, its paths must be relative and stay inside the
dataset folder (no absolute paths, ``..`` or symlinks leading out).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from diffprobe.errors import DiffprobeError
from diffprobe.io.image_io import MAX_LABEL_ID, SUPPORTED_ENDINGS

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass
class DatasetInfo:
    """The parts of dataset.json diffprobe uses."""

    folder: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    raw: dict
    # nnU-Net's optional "dataset" key: {case: (image paths per channel, label path or None)},
    # every path checked to lie inside ``folder``. None: cases come from imagesTr/labelsTr.
    file_list: dict[str, tuple[list[Path], Path | None]] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> set[int]:
        return set(self.labels.values())

    def is_ct(self, channel: int) -> bool:
        return self.channel_names[channel].strip().lower() == "ct"


def load_dataset_json(folder: str | Path) -> DatasetInfo:
    """Read and validate ``folder/dataset.json``; every problem is a clear DiffprobeError."""
    folder = Path(folder)
    path = folder / "dataset.json"
    if not folder.is_dir():
        raise DiffprobeError("dataset folder does not exist", folder,
                             "create it in nnU-Net raw format or run `diffprobe make_phantoms`")
    if not path.is_file():
        raise DiffprobeError("dataset.json is missing", path,
                             "add a dataset.json with channel_names, labels, numTraining and file_ending")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffprobeError(f"dataset.json is not valid JSON ({e})", path, "fix the JSON syntax") from None
    if not isinstance(raw, dict):
        raise DiffprobeError("dataset.json must hold a JSON object", path, "see the nnU-Net v2 dataset format")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if "channel_names" not in raw and "modality" in raw:
        raise DiffprobeError("dataset.json is in the old nnU-Net v1 format ('modality')", path,
                             "convert it with nnUNetv2_convert_old_nnUNet_dataset or rename "
                             "'modality' to 'channel_names' and add 'file_ending'")
    if missing:
        raise DiffprobeError(f"dataset.json lacks {', '.join(missing)}", path,
                             'add them, e.g. "channel_names": {"0": "CT"}, "labels": {"background": 0, ...}, '
                             '"numTraining": N, "file_ending": ".nii.gz"')
    try:
        channels = {int(k): str(v) for k, v in dict(raw["channel_names"]).items()}
    except (ValueError, TypeError):
        raise DiffprobeError("channel_names must map channel numbers to names", path,
                             'write e.g. "channel_names": {"0": "CT"}') from None
    if sorted(channels) != list(range(len(channels))) or not channels:
        raise DiffprobeError(f"channel_names keys must be 0..N-1, got {sorted(channels)}", path,
                             'number the channels from 0, e.g. {"0": "CT"}')
    labels_raw = raw["labels"]
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise DiffprobeError("labels must be a non-empty object", path, 'write e.g. "labels": {"background": 0}')
    labels: dict[str, int] = {}
    for name, value in labels_raw.items():
        if isinstance(value, (list, tuple)):
            raise DiffprobeError(f"label '{name}' is region-based ({value}); diffprobe needs one id per class",
                                 path, "give each class one integer id")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DiffprobeError(f"label '{name}' has id {value!r}, not a non-negative integer", path,
                                 "use integer ids 0..N")
        labels[str(name)] = value
    if 0 not in labels.values():
        raise DiffprobeError("labels have no background (0)", path, 'add "background": 0')
    if len(set(labels.values())) != len(labels):
        raise DiffprobeError("two labels share one id", path, "give each class its own id")
    if max(labels.values()) > MAX_LABEL_ID:  # label maps are uint8/uint16: a larger id would wrap
        raise DiffprobeError(f"label id {max(labels.values())} is above {MAX_LABEL_ID}, the largest a uint16 "
                             "label map holds", path, f"renumber the classes to ids 0..{MAX_LABEL_ID} "
                             "(dataset.json and the label files)")
    ending = raw["file_ending"]
    if not isinstance(ending, str) or ending not in SUPPORTED_ENDINGS:
        raise DiffprobeError(f"file_ending {ending!r} is not supported", path,
                             f"use one of {', '.join(SUPPORTED_ENDINGS)}")
    num_training = raw["numTraining"]
    if not isinstance(num_training, int) or num_training < 0:
        raise DiffprobeError(f"numTraining must be a non-negative integer, got {num_training!r}", path,
                             "set it to the number of training cases")
    file_list = _file_list(raw["dataset"], folder, path, len(channels)) if "dataset" in raw else None
    return DatasetInfo(folder, folder.name, channels, labels, num_training, ending, raw, file_list)


_CASE_ID_RE = re.compile(r"^[^/\\.][^/\\]*$")
_LIST_FIX = ('list files relative to the dataset folder, inside it, e.g. "dataset": {"case1": {"images": '
             '["imagesTr/case1_0000.nii.gz"], "label": "labelsTr/case1.nii.gz"}}')


def _inside(entry: object, folder: Path, path: Path, where: str) -> Path:
    """``folder / entry`` if ``entry`` is a relative path that stays inside ``folder`` (symlinks resolved).

    Why: dataset.json may come with a downloaded dataset; a listed file must not make diffprobe
    read (and, via case names, write) outside the dataset folder.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise DiffprobeError(f"{where} must be a file path (string), got {entry!r}", path, _LIST_FIX)
    pure = PurePosixPath(entry.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(entry).drive or entry.startswith(("/", "\\", "~")):
        raise DiffprobeError(f"{where} '{entry}' is an absolute path; listed files must lie inside the dataset "
                             f"folder {folder}", path, _LIST_FIX)
    if ".." in pure.parts:
        raise DiffprobeError(f"{where} '{entry}' contains '..' and would point outside the dataset folder "
                             f"{folder}", path, _LIST_FIX)
    target = folder / Path(*pure.parts)
    if not target.resolve().is_relative_to(folder.resolve()):
        raise DiffprobeError(f"{where} '{entry}' is a symbolic link that resolves outside the dataset folder "
                             f"({target.resolve()})", path,
                             "copy the file into the dataset folder instead of linking it, or " + _LIST_FIX)
    return target


def _file_list(entries: object, folder: Path, path: Path,
               num_channels: int) -> dict[str, tuple[list[Path], Path | None]]:
    """Validate nnU-Net's ``"dataset": {case: {"images": [...], "label": ...}}`` listing."""
    if not isinstance(entries, dict) or not entries:
        raise DiffprobeError("'dataset' must be a non-empty object of cases", path, _LIST_FIX)
    out: dict[str, tuple[list[Path], Path | None]] = {}
    for case, entry in entries.items():
        if not _CASE_ID_RE.match(case):
            raise DiffprobeError(f"case name '{case}' under 'dataset' is not a plain name (it names output "
                                 "files)", path, "use names without '/', '\\' or a leading '.'")
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
            raise DiffprobeError(f"'dataset.{case}' needs an \"images\" list", path, _LIST_FIX)
        if len(entry["images"]) != num_channels:
            raise DiffprobeError(f"'dataset.{case}.images' lists {len(entry['images'])} file(s), but channel_names "
                                 f"declares {num_channels} channel(s)", path, "list one image per channel, in order")
        images = [_inside(e, folder, path, f"dataset.{case}.images[{i}]") for i, e in enumerate(entry["images"])]
        label = entry.get("label")
        out[case] = (images, None if label is None else _inside(label, folder, path, f"dataset.{case}.label"))
    return out
