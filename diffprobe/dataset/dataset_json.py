"""Loading and validating ``dataset.json`` (nnU-Net v2 raw format).

Required keys: ``channel_names`` ({"0": "CT", ...}), ``labels`` ({"background": 0, ...}),
``numTraining`` and ``file_ending``. Region-based labels (lists) are not supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.io.image_io import SUPPORTED_ENDINGS

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
    ending = raw["file_ending"]
    if not isinstance(ending, str) or ending not in SUPPORTED_ENDINGS:
        raise DiffprobeError(f"file_ending {ending!r} is not supported", path,
                             f"use one of {', '.join(SUPPORTED_ENDINGS)}")
    num_training = raw["numTraining"]
    if not isinstance(num_training, int) or num_training < 0:
        raise DiffprobeError(f"numTraining must be a non-negative integer, got {num_training!r}", path,
                             "set it to the number of training cases")
    return DatasetInfo(folder, folder.name, channels, labels, num_training, ending, raw)
