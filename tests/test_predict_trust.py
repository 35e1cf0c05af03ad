"""Outputs a reviewer can rely on (issue 15): the same pixels give the same answer whatever the file is
called, where it lies or which part of a split predicts it; label ids above 255 survive preprocessing,
probe targets, the predicted label map and evaluation, never wrapping; ids no label map type holds
are refused up front. (Probabilities that are probabilities: ``test_predict.py::test_save_probabilities``.)
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import body_volume, make_raw_dataset, write_sitk

from diffprobe.dataset.dataset_json import load_dataset_json
from diffprobe.errors import DiffprobeError
from diffprobe.io.image_io import label_dtype, read_label
from diffprobe.predict.cases import WindowResult, export_case
from diffprobe.predict.predictor import predict
from diffprobe.preprocessing.storage import case_paths, load_case, open_array, save_case

MODEL = {"dataset": 1, "configuration": "tiny__fpn"}  # the trained_probe_roots fixture's probe
SMALL = (12, 40, 48)
BIG_ID = 300


# ---- same pixels, same answer --------------------------------------------------------------------
def test_renamed_moved_split_copy_gives_identical_segmentation(use_trained_probe_roots, tmp_path):
    """A case and a byte copy of it under another name, in another folder, predicted in the other part of
    a ``-num_parts 2`` split after another case: the label arrays are byte-identical (before, the
    features' noise was seeded by the case name, so the copy segmented differently)."""
    first = tmp_path / "site_a"
    img, _ = body_volume(SMALL, seed=1)
    original = write_sitk(img, first / "alpha_0000.nii.gz", spacing=(0.8, 0.9, 2.5), origin=(3.0, -2.0, 10.0))
    other, _ = body_volume(SMALL, seed=2)
    write_sitk(other, first / "beta_0000.nii.gz", spacing=(1.0, 1.0, 2.0))
    second = tmp_path / "elsewhere" / "site_b"
    second.mkdir(parents=True)
    shutil.copyfile(original, second / "zz_renamed_0000.nii.gz")  # sorts last: part 1 of 2
    shutil.copyfile(first / "beta_0000.nii.gz", second / "aa_first_0000.nii.gz")  # part 0 of 2

    runs = {"a": predict(first, tmp_path / "out_a", **MODEL, save_probabilities=True, show_progress=False)}
    for part in range(2):
        runs[f"b{part}"] = predict(second, tmp_path / "out_b", **MODEL, num_parts=2, part_id=part,
                                   show_progress=False)
    assert [p.name for p in runs["b1"]] == ["zz_renamed.nii.gz"]
    a = sitk.ReadImage(str(tmp_path / "out_a" / "alpha.nii.gz"))
    b = sitk.ReadImage(str(tmp_path / "out_b" / "zz_renamed.nii.gz"))
    seg_a, seg_b = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    assert seg_a.dtype == seg_b.dtype == np.uint8
    assert seg_a.tobytes() == seg_b.tobytes()
    assert len(np.unique(seg_a)) > 1  # a segmentation, not an empty map
    for key in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(a, key)() == getattr(b, key)(), key
    # the other case too, though it came first in one folder and second in the other
    beta_a, beta_b = (sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
                      for f in (tmp_path / "out_a" / "beta.nii.gz", tmp_path / "out_b" / "aa_first.nii.gz"))
    assert beta_a.tobytes() == beta_b.tobytes()


# ---- labels beyond 255 -------------------------------------------------------------------------------
def test_label_dtype_is_the_narrowest_that_holds_every_id():
    assert label_dtype(0) is np.uint8 and label_dtype(255) is np.uint8
    assert label_dtype(256) is np.uint16 and label_dtype(65535) is np.uint16
    with pytest.raises(ValueError):
        label_dtype(65536)


def test_storage_keeps_ids_above_255(tmp_path):
    data = np.zeros((1, 4, 5, 6), np.float32)
    for top, dtype in ((7, np.uint8), (BIG_ID, np.uint16)):
        seg = np.zeros((4, 5, 6), np.uint16)
        seg[1:3, 2:4, 1:5] = top
        seg[0, 0, 0] = 1
        save_case(tmp_path, f"c{top}", data, seg, {"labelled": True}, None)
        _, back, _ = load_case(tmp_path, f"c{top}")
        assert back.dtype == dtype
        np.testing.assert_array_equal(back, seg)


def test_ids_no_label_map_holds_are_refused(tmp_path):
    folder = make_raw_dataset(tmp_path / "raw", dataset_id=8, name="Huge", n_labelled=1, n_unlabelled=0,
                              labels={"background": 0, "organ": 70000})
    with pytest.raises(DiffprobeError) as err:
        load_dataset_json(folder)
    assert str(err.value.file) == str(folder / "dataset.json") and "65535" in str(err.value)
    huge = np.zeros(SMALL, np.int32)
    huge[2, 3, 4] = 70000
    path = write_sitk(huge, tmp_path / "huge.nii.gz")
    with pytest.raises(DiffprobeError, match="70000"):
        read_label(path)


@pytest.fixture(scope="module")
def big_id_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Dataset007_BigIds: two labelled body volumes whose second organ is id 300, preprocessed (tiny plans)."""
    from diffprobe.paths import roots_at
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    base = tmp_path_factory.mktemp("big_ids")
    labels = {"background": 0, "left": 1, "right": BIG_ID}
    folder = make_raw_dataset(base / "raw", dataset_id=7, name="BigIds", n_labelled=2, n_unlabelled=0,
                              labels=labels)
    for label_file in sorted((folder / "labelsTr").iterdir()):
        img = sitk.ReadImage(str(label_file))
        lab = sitk.GetArrayFromImage(img).astype(np.uint16)
        lab[lab == 2] = BIG_ID
        write_sitk(lab, label_file, spacing=img.GetSpacing())
    for kind in ("preprocessed", "results"):
        (base / kind).mkdir()
    with roots_at(base):
        plan_and_preprocess(7, num_processes=1, show_progress=False, plan_kwargs={"size_class": "tiny"})
        data_dir, plans, ids = preprocessed_cases(7)
    assert ids == ["case0", "case1"]
    return {"raw": folder, "data_dir": data_dir, "plans": plans, "labels": labels}


def test_preprocessing_and_probe_targets_keep_id_300(big_id_dataset):
    from diffprobe.preprocessing.volumes import volume_refs
    from diffprobe.probe.data import LabelledPatches, labelled_volumes

    data_dir = big_id_dataset["data_dir"]
    stored = open_array(case_paths(data_dir, "case0")["seg"])
    assert stored.dtype == np.uint16
    assert set(np.unique(stored[...]).tolist()) == {0, 1, BIG_ID}
    props = json.loads(case_paths(data_dir, "case0")["properties"].read_text())
    assert props["class_locations"][str(BIG_ID)]
    refs = volume_refs(data_dir, ["case0", "case1"])
    patches = LabelledPatches(labelled_volumes(refs), [8, 16, 16], batch_size=4, guidance="none",
                              oversample_foreground=1.0)
    targets = torch.cat([patches.batch(step)["seg"].flatten() for step in range(4)])
    assert BIG_ID in set(targets.unique().tolist())  # the cross-entropy target, not 44 (300 mod 256)


def test_predicted_label_map_holds_id_300(big_id_dataset, tmp_path):
    """The way back (resampling, crop, orientation, writer) with 301 classes: the label map is written as
    uint16, id 300 lands where the reference has it, and evaluation scores it under its own id."""
    from diffprobe.evaluation.evaluate import evaluate_folders

    data_dir, labels = big_id_dataset["data_dir"], big_id_dataset["labels"]
    probe = SimpleNamespace(meta={"plans": big_id_dataset["plans"], "labels": labels})  # what export reads
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    for ident in ("case0", "case1"):
        _, seg, props = load_case(data_dir, ident)
        onehot = np.zeros((BIG_ID + 1, *seg.shape), np.float32)
        for k in (0, 1, BIG_ID):
            onehot[k] = 10.0 * (seg == k)
        probs = torch.softmax(torch.from_numpy(onehot), 0)  # a confident "model" that knows the labels
        case = SimpleNamespace(identifier=ident)
        out = export_case([probe], WindowResult(case, probs, props), tmp_path / "pred" / f"{ident}.nii.gz")
        img = sitk.ReadImage(str(out))
        assert img.GetPixelID() == sitk.sitkUInt16
        pred = sitk.GetArrayFromImage(img)
        assert set(np.unique(pred).tolist()) <= {0, 1, BIG_ID} and BIG_ID in pred
        shutil.copyfile(big_id_dataset["raw"] / "labelsTr" / f"{ident}.nii.gz", tmp_path / "ref" / f"{ident}.nii.gz")
    summary = evaluate_folders(tmp_path / "ref", tmp_path / "pred", labels, show_progress=False)
    assert summary["labels"] == {"left": 1, "right": BIG_ID}
    assert summary["mean"][str(BIG_ID)]["Dice"] > 0.8, summary["mean"]
