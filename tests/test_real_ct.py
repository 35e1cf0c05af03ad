"""The real abdominal CT in ../shared: its label is y-flipped on purpose and must be reoriented physically."""

import json

import numpy as np
import pytest
from conftest import SHARED_REAL_CT

from diffprobe.dataset import list_cases, load_dataset_json
from diffprobe.dataset.integrity import check_case
from diffprobe.io.image_io import read_image, read_label

pytestmark = pytest.mark.skipif(not (SHARED_REAL_CT / "abdomen_dicom_0000.nii.gz").is_file(),
                                reason="../shared/data/real-ct not present")


@pytest.fixture
def real_ct_dataset(roots):
    folder = roots["raw"] / "Dataset009_RealCT"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTr" / "abdomen_0000.nii.gz").symlink_to(SHARED_REAL_CT / "abdomen_dicom_0000.nii.gz")
    (folder / "labelsTr" / "abdomen.nii.gz").symlink_to(SHARED_REAL_CT / "abdomen_dicom_label.nii.gz")
    labels = json.loads((SHARED_REAL_CT / "labels.json").read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    return folder


def test_flipped_label_reoriented_physically(real_ct_dataset):
    info = load_dataset_json(real_ct_dataset)
    (case,), _ = list_cases(info)
    checked, problems = check_case(case, info)
    assert not problems and any("reoriented" in n for n in checked.notes)
    liver = info.labels["liver"]
    assert 80 <= checked.data[0][checked.seg == liver].mean() <= 100
    # pairing voxels by array index (the mistake to avoid) gives fat/air-like values
    img = read_image(case.images[0]).array
    lab = read_label(case.label).array
    assert -90 <= img[lab == liver].mean() <= -60


def test_plan_and_preprocess_real_ct(real_ct_dataset):
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.preprocessing.storage import load_case
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    report = plan_and_preprocess(9, num_processes=1, show_progress=False)
    assert any("reoriented" in n for n in report.notes)
    data_dir, plans, ids = preprocessed_cases(9)
    data, seg, props = load_case(data_dir, ids[0])
    liver = plans["labels"]["liver"]
    hu = (data[0][seg == liver] + 1) / 2 * 2350 - 1350
    assert 70 <= hu.mean() <= 110


def test_dicom_series_reads_like_nifti():
    from diffprobe.io.image_io import read_image

    dicom = read_image(SHARED_REAL_CT / "dicom")
    nifti = read_image(SHARED_REAL_CT / "abdomen_dicom_0000.nii.gz")
    assert dicom.array.shape == nifti.array.shape == (20, 512, 512)
    np.testing.assert_allclose(dicom.geometry.spacing, nifti.geometry.spacing, atol=1e-4)
    np.testing.assert_allclose(dicom.geometry.origin, nifti.geometry.origin, atol=1e-3)
    np.testing.assert_array_equal(dicom.array, nifti.array)
