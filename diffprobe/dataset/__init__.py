"""nnU-Net raw format v2 datasets: dataset.json, case discovery, integrity checks."""

from diffprobe.dataset.cases import Case, list_cases
from diffprobe.dataset.dataset_json import DatasetInfo, load_dataset_json

__all__ = ["Case", "DatasetInfo", "list_cases", "load_dataset_json"]
