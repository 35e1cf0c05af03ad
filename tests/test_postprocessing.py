"""Postprocessing: background outside the body, largest components, and the validation's decision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.postprocessing.determine import LargestComponentTrial
from diffprobe.postprocessing.operations import POSTPROCESSING_FILENAME, Postprocessing, keep_largest_component


def _two_blobs() -> np.ndarray:
    labels = np.zeros((8, 20, 20), np.uint8)
    labels[1:6, 2:10, 2:10] = 1  # the organ
    labels[2:4, 14:16, 14:16] = 1  # a stray piece of it
    labels[5:7, 12:18, 2:6] = 2  # another organ, one piece
    return labels


def test_keep_largest_component_removes_only_the_smaller_pieces_of_one_class():
    labels = _two_blobs()
    before = labels.copy()
    removed = keep_largest_component(labels, 1)
    assert removed.sum() == 2 * 2 * 2 and (before[removed] == 1).all()
    assert (labels[1:6, 2:10, 2:10] == 1).all() and (labels[5:7, 12:18, 2:6] == 2).all()
    assert not keep_largest_component(labels, 2).any() and not keep_largest_component(labels, 3).any()


def test_pieces_touching_at_a_corner_are_one_component():
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = labels[2, 2, 2] = 1
    assert not keep_largest_component(labels, 1).any()  # 26-connected: one diagonal piece


def test_outside_body_sets_background_and_reports_what_it_removed():
    labels = _two_blobs()
    body = np.zeros(labels.shape, bool)
    body[:, :, :12] = True  # the stray piece of class 1 lies outside
    post = Postprocessing(outside_body=True)
    removed = post.apply(labels, body)
    assert not labels[~body].any() and removed.sum() == 8  # the stray piece; both organs lie inside
    with pytest.raises(ValueError, match="body mask"):
        Postprocessing(outside_body=True).apply(_two_blobs(), None)
    assert not Postprocessing().active and Postprocessing(largest_component=[1]).active


def test_trial_keeps_the_largest_component_only_where_validation_dice_rises(tmp_path):
    reference = np.zeros((8, 20, 20), np.uint8)
    reference[1:6, 2:10, 2:10] = 1
    reference[5:7, 12:18, 2:6] = 2
    reference[1:3, 12:14, 12:14] = 2  # class 2 truly has two pieces
    prediction = reference.copy()
    prediction[2:4, 14:18, 14:18] = 1  # a false piece of class 1
    trial = LargestComponentTrial({1: "liver", 2: "kidneys", 3: "absent"})
    trial.add_case("a", reference, prediction)
    decision = trial.write(tmp_path)
    assert decision["largest_component"] == [1]  # class 2 would lose a true piece: kept as predicted
    assert decision["classes"]["liver"]["dice_after"] == 1.0 > decision["classes"]["liver"]["dice_before"]
    assert decision["classes"]["absent"] == {"class": 3, "dice_before": None, "dice_after": None}
    assert json.loads((tmp_path / POSTPROCESSING_FILENAME).read_text()) == json.loads(json.dumps(decision))


def test_an_ensemble_reduces_the_classes_every_fold_chose(tmp_path):
    for fold, classes in (("a", [1, 2]), ("b", [2, 3]), ("c", [2])):
        (tmp_path / fold).mkdir()
        (tmp_path / fold / POSTPROCESSING_FILENAME).write_text(json.dumps({"largest_component": classes}))
    plans = {"postprocessing": {"outside_body": True}, "channel_names": {"0": "CT"}}
    post = Postprocessing.for_model(plans, [tmp_path / f for f in "abc"])
    assert post == Postprocessing(outside_body=True, largest_component=[2])
    mri = {"postprocessing": {"outside_body": True}, "channel_names": {"0": "T1"}}
    assert not Postprocessing.for_model(mri, [tmp_path / "a"]).outside_body  # no HU: no body mask
    (tmp_path / "old").mkdir()  # a fold trained before postprocessing.json existed: no reduction
    assert Postprocessing.for_model({}, [tmp_path / "a", tmp_path / "old"]) == Postprocessing(False, [])
    (tmp_path / "c" / POSTPROCESSING_FILENAME).write_text('{"largest_component": "liver"}')
    with pytest.raises(DiffprobeError, match="postprocessing.json"):
        Postprocessing.for_model(plans, [tmp_path / "c"])


def _props_of_a_real_input(tmp_path, plans: dict) -> tuple[np.ndarray, dict]:
    from conftest import body_volume, write_sitk

    from diffprobe.dataset.cases import Case
    from diffprobe.preprocessing.preprocess import preprocess_input

    image, _ = body_volume((10, 36, 44))
    path = write_sitk(image, tmp_path / "in" / "c_0000.nii.gz", spacing=(1.2, 1.1, 2.5))
    return preprocess_input(Case("c", [path], None, "input"), plans, "Dataset001_Phantoms", keep_body=True)


def test_saved_probabilities_stay_the_argmax_of_a_postprocessed_label_map(tmp_path):
    from diffprobe.planning.planner import plan
    from diffprobe.predict.cases import to_raw_grid

    fingerprint = {"dataset": "Dataset001_Phantoms", "spacings": [[2.5, 1.1, 1.2]], "median_spacing": [2.5, 1.1, 1.2],
                   "shapes_after_crop": [[10, 36, 44]], "num_cases": 1, "num_labelled": 1,
                   "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}}
    plans = plan(fingerprint, size_class="tiny")
    assert plans["postprocessing"]["outside_body"] is True
    data, props = _props_of_a_real_input(tmp_path, plans)
    body = props["body"]
    assert body.shape == tuple(props["shape_after_crop"]) and body.any() and not body.all()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((3, *data.shape[1:]), generator=gen) * 3
    probabilities = torch.softmax(logits, 0)
    resampling = plans["preprocessing"]["resampling"]
    plain, _, plain_probs = to_raw_grid(probabilities.clone(), props, resampling, keep=True)
    post = Postprocessing(outside_body=True, largest_component=[1, 2])
    labels, _, probs = to_raw_grid(probabilities.clone(), props, resampling, keep=True, postprocessing=post)
    assert (np.argmax(probs, 0) == labels).all() and (np.argmax(plain_probs, 0) == plain).all()
    changed = labels != plain
    assert changed.any() and (labels[changed] == 0).all()
    assert (probs[0][changed] == 1).all() and (probs[1:, changed] == 0).all()
    assert (probs[:, ~changed] == plain_probs[:, ~changed]).all()
    from scipy import ndimage

    from diffprobe.preprocessing.preprocess import uncrop_to_original

    body_raw, _ = uncrop_to_original(body, props, fill_value=False)
    outside_only, _, _ = to_raw_grid(probabilities.clone(), props, resampling, keep=False,
                                     postprocessing=Postprocessing(outside_body=True))
    assert (plain[~body_raw] != 0).any() and not outside_only[~body_raw].any()
    assert (outside_only[body_raw] == plain[body_raw]).all()
    for k in (1, 2):
        assert ndimage.label(labels == k, structure=np.ones((3, 3, 3)))[1] == 1


def test_plans_refuse_a_postprocessing_switch_that_is_not_a_boolean(tmp_path):
    from diffprobe.planning.planner import plan
    from diffprobe.planning.plans import validate_plans

    fingerprint = {"dataset": "X", "spacings": [[2.0, 1.0, 1.0]], "median_spacing": [2.0, 1.0, 1.0],
                   "shapes_after_crop": [[40, 96, 96]], "num_cases": 1, "num_labelled": 1,
                   "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1}}
    plans = plan(fingerprint, size_class="tiny")
    assert plans["postprocessing"]["outside_body"] is False  # no CT: no HU body mask
    validate_plans(plans, tmp_path / "plans.json")
    plans["postprocessing"]["outside_body"] = "yes"
    with pytest.raises(DiffprobeError, match="postprocessing.outside_body"):
        validate_plans(plans, tmp_path / "plans.json")
    plans["postprocessing"]["outside_body"] = True
    with pytest.raises(DiffprobeError, match="needs a CT channel"):
        validate_plans(plans, tmp_path / "plans.json")
