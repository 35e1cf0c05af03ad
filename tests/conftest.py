"""Shared fixtures: isolated data roots and tiny synthetic CT volumes written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED_REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point DIFFPROBE_RAW/PREPROCESSED/RESULTS at empty temporary folders."""
    out = {}
    for kind in ("raw", "preprocessed", "results"):
        folder = tmp_path / kind
        folder.mkdir()
        monkeypatch.setenv(f"DIFFPROBE_{kind.upper()}", str(folder))
        out[kind] = folder
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return out


def body_volume(shape_zyx=(12, 40, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like volume (HU, int16) and a 2-class label: an elliptic body with two organs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    organ1 = ((x + 0.35) / 0.3) ** 2 + (y / 0.3) ** 2 + (z / 0.7) ** 2 < 1
    organ2 = ((x - 0.4) / 0.2) ** 2 + ((y - 0.2) / 0.2) ** 2 + (z / 0.5) ** 2 < 1
    img = np.full(shape_zyx, -1000.0)
    img[body] = -100.0
    img[body & (x**2 + y**2 < 0.4)] = 40.0
    img[organ1] = 60.0
    img[organ2] = 30.0
    img += rng.normal(0, 10, shape_zyx)
    lab = np.zeros(shape_zyx, np.uint8)
    lab[organ1] = 1
    lab[organ2] = 2
    return img.astype(np.int16), lab


def write_sitk(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(array, isVector=False)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def make_raw_dataset(raw_root: Path, dataset_id: int = 5, name: str = "Tiny", n_labelled: int = 2,
                     n_unlabelled: int = 1, spacing=(1.0, 1.0, 2.0), shape=(12, 40, 48),
                     labels: dict | None = None) -> Path:
    """A small valid nnU-Net raw dataset of body volumes."""
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_labelled + n_unlabelled):
        img, lab = body_volume(shape, seed=i)
        write_sitk(img, folder / "imagesTr" / f"case{i}_0000.nii.gz", spacing)
        if i < n_labelled:
            write_sitk(lab, folder / "labelsTr" / f"case{i}.nii.gz", spacing)
    ds = {"channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "left": 1, "right": 2},
          "numTraining": n_labelled + n_unlabelled, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(ds))
    return folder
