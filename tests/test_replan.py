"""plans.json decides what is trained; re-planning changes exactly what was asked.

Overrides of patch size and width reach the trained checkpoints; a schedule or CT-window change
re-derives the timesteps at the recorded noise levels; tuned timesteps survive an unrelated
re-plan; a probe of a dataset planned with another schedule reads the model at the planned
noise levels (mapped), and a dataset the model cannot serve is refused.
"""

import json
import shutil

import numpy as np
import pytest

from diffprobe.errors import DiffprobeError
from diffprobe.paths import roots_at
from diffprobe.planning import planner
from diffprobe.planning.compat import model_timesteps
from diffprobe.planning.plans import load_plans, save_plans
from diffprobe.planning.replan import replan

FP = {"spacings": [[3.0, 1.5, 1.5]] * 3, "shapes_after_crop": [[40, 80, 80]] * 3, "median_spacing": [3.0, 1.5, 1.5],
      "num_cases": 3, "num_labelled": 2, "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
      "dataset": "Dataset001_X"}


def test_schedule_change_keeps_noise_levels():
    before = replan(FP, None, {"size_class": "tiny"})
    after = replan(FP, before, None, ["diffusion.schedule=cosine"])
    assert after["diffusion"]["schedule"] == "cosine"
    assert after["diffusion"]["feature_timesteps"] != before["diffusion"]["feature_timesteps"]
    np.testing.assert_allclose(after["diffusion"]["feature_noise"]["achieved_std"],
                               before["diffusion"]["feature_noise"]["achieved_std"], atol=2e-3)
    # only what was named (and what follows from it) changed
    assert after["network"] == before["network"] and after["patch_size"] == before["patch_size"]
    assert after["training"] == before["training"]


def test_ct_window_change_keeps_noise_in_hu():
    before = replan(FP, None, {"size_class": "tiny"})
    after = replan(FP, before, None, ["preprocessing.normalization.0.window_hu=[-1000, 600]"])
    assert after["preprocessing"]["normalization"]["0"]["window_hu"] == [-1000, 600]
    assert after["diffusion"]["feature_timesteps"] != before["diffusion"]["feature_timesteps"]
    np.testing.assert_allclose(after["diffusion"]["feature_noise"]["achieved_std_hu"],
                               before["diffusion"]["feature_noise"]["achieved_std_hu"], rtol=0.05)


def test_tuned_timesteps_survive_unrelated_replan_and_follow_schedule():
    plans = replan(FP, None, {"size_class": "tiny"})
    # what tune_timesteps writes: chosen timesteps with their own noise levels and the record
    tuned = replan(FP, plans, {"timesteps": [15, 45]})
    tuned["diffusion"]["feature_timesteps_source"] = "tune_timesteps"
    again = replan(FP, tuned, {"batch_size": 4})
    assert again["batch_size"] == 4
    assert again["diffusion"]["feature_timesteps"] == [15, 45]
    assert again["diffusion"]["feature_timesteps_source"] == "tune_timesteps"
    cosine = replan(FP, again, None, ["diffusion.schedule=cosine"])
    np.testing.assert_allclose(cosine["diffusion"]["feature_noise"]["achieved_std"],
                               tuned["diffusion"]["feature_noise"]["achieved_std"], atol=2e-3)


def test_override_of_derived_key_is_refused_and_plain_override_is_kept():
    plans = replan(FP, None, {"size_class": "tiny"})
    with pytest.raises(DiffprobeError, match="derived by the planner"):
        replan(FP, plans, None, ["network.levels=[]"])
    edited = replan(FP, plans, None, ["training.diffusion.steps=77", "memory.estimated_gb_per_sample=1.5"])
    assert edited["training"]["diffusion"]["steps"] == 77
    kept = replan(FP, edited, {"batch_size": 1})
    assert kept["training"]["diffusion"]["steps"] == 77 and kept["memory"]["estimated_gb_per_sample"] == 1.5


def test_smaller_width_and_patch_follow_topology():
    plans = replan(FP, None, {"size_class": "tiny"}, ["patch_size=[8, 32, 32]", "network.base_channels=16"])
    assert plans["patch_size"] == [8, 32, 32]
    assert plans["network"]["levels"][0]["channels"] == 16
    assert plans["training"]["bpr"]["crop"] == [8, 32, 32]
    assert all(p % k == 0 for p, k in zip(plans["patch_size"], plans["network"]["total_stride"]))


def test_hand_edit_of_schedule_is_refused(tmp_path):
    plans = replan(FP, None, {"size_class": "tiny"})
    plans["diffusion"]["schedule"] = "cosine"  # by hand: the timesteps no longer mean the planned noise
    save_plans(plans, tmp_path / "plans.json")
    with pytest.raises(DiffprobeError, match="override diffusion.schedule"):
        load_plans(tmp_path / "plans.json")


def test_model_timesteps_mapped_by_noise_level_or_refused():
    linear = replan(FP, None, {"size_class": "tiny"})
    cosine = replan(FP, linear, None, ["diffusion.schedule=cosine"])
    mapped = model_timesteps(cosine, linear, cosine["diffusion"]["feature_timesteps"], "m")
    assert mapped == linear["diffusion"]["feature_timesteps"]
    assert model_timesteps(linear, linear, [10, 30], "m") == [10, 30]
    window = replan(FP, linear, None, ["preprocessing.normalization.0.window_hu=[-1000, 600]"])
    with pytest.raises(DiffprobeError, match="normalisation"):
        model_timesteps(window, linear, [10], "m")
    spacing = replan(FP, linear, {"target_spacing_override": [2.0, 1.0, 1.0]})
    with pytest.raises(DiffprobeError, match="spacing"):
        model_timesteps(spacing, linear, [10], "m")


def test_default_size_class_follows_device():
    from diffprobe.planning.size_classes import default_size_class

    assert default_size_class("cpu") == "cpu" and default_size_class("cuda:0") == "paper"
    sizes = [planner.plan(FP, size_class=c)["network"]["levels"][0]["channels"] for c in ("tiny", "cpu", "paper")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


@pytest.fixture(scope="module")
def small_roots(tmp_path_factory):
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    base = tmp_path_factory.mktemp("replan_roots")
    cfg = PhantomConfig(num_train_labelled=2, num_train_unlabelled=0, num_test=0, fov_mm=60,
                        spacing_inplane=(1.0, 1.3), spacing_slice=(2.0, 3.0), scan_length_mm=(50, 60))
    make_phantom_dataset(base / "raw" / "Dataset001_Phantoms", cfg)
    return base


def test_plans_decide_what_is_trained_end_to_end(small_roots, tmp_path):
    """--override of patch and width reaches the checkpoints; a probe of the dataset re-planned with the
    cosine schedule reads the (linear) model at the same noise levels; another CT window is refused;
    a second dataset at another spacing cannot be pretrained with the first."""
    import torch

    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.training.checkpoint import load_checkpoint
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
    from diffprobe.workflows.train_probe import train_probe

    base = tmp_path / "roots"
    shutil.copytree(small_roots, base)
    with roots_at(base) as roots:
        plan_and_preprocess(1, num_processes=1, show_progress=False, plan_kwargs={"size_class": "tiny"},
                            overrides=["patch_size=[8, 32, 32]", "network.base_channels=16"])
        torch.set_num_threads(1)
        pretrain(["1"], name="m", overrides={"bpr_steps": 1, "diffusion_steps": 1, "num_workers": 0},
                 show_progress=False)
        model = PretrainedModel("m")
        state = load_checkpoint(model.denoiser_checkpoint)["model"]
        first_conv = next(v for k, v in state.items() if v.ndim == 5)
        assert first_conv.shape[0] == 16
        assert model.plans.patch_size == [8, 32, 32]
        # the BPR's crop follows the planned one (training.bpr.crop = patch), widened to its context
        from diffprobe.bpr import BodyPartRegressor
        from diffprobe.pretraining.pretrain import bpr_crop

        assert model.plans.stage("bpr")["crop"] == [8, 32, 32]
        from diffprobe.preprocessing.access import preprocessed_cases
        from diffprobe.preprocessing.volumes import volume_refs

        data_dir, _, ids = preprocessed_cases(1)
        median = np.median([v.shape for v in volume_refs(data_dir, ids)], axis=0).tolist()
        expected = bpr_crop([8, 32, 32], BodyPartRegressor(width=model.plans.stage("bpr")["width"]).feature_stride,
                            median)
        assert load_checkpoint(model.bpr_checkpoint)["config"]["extra"]["crop"] == expected

        linear_t = load_plans(roots["preprocessed"] / "Dataset001_Phantoms" / "diffprobe" / "plans.json")[
            "diffusion"]["feature_timesteps"]
        plan_and_preprocess(1, num_processes=1, show_progress=False, overrides=["diffusion.schedule=cosine"])
        plans_path = roots["preprocessed"] / "Dataset001_Phantoms" / "diffprobe" / "plans.json"
        cosine_t = load_plans(plans_path)["diffusion"]["feature_timesteps"]
        assert cosine_t != linear_t
        result = train_probe(1, "0", "m", overrides={"steps": 1, "validate_every": 0, "pool_patches": 0},
                             show_progress=False, final_validation=False)
        meta = json.loads((result.folder / "probe.json").read_text())
        assert meta["dataset_timesteps"] == cosine_t and meta["timesteps"] == linear_t

        plan_and_preprocess(1, num_processes=1, show_progress=False,
                            overrides=["preprocessing.normalization.0.window_hu=[-1000, 600]"])
        with pytest.raises(DiffprobeError, match="normalisation"):
            train_probe(1, "1", "m", overrides={"steps": 1}, show_progress=False, final_validation=False)

        shutil.copytree(roots["raw"] / "Dataset001_Phantoms", roots["raw"] / "Dataset002_Other")
        ds = json.loads((roots["raw"] / "Dataset002_Other" / "dataset.json").read_text())
        (roots["raw"] / "Dataset002_Other" / "dataset.json").write_text(json.dumps({**ds, "name": "Other"}))
        plan_and_preprocess(2, num_processes=1, show_progress=False,
                            plan_kwargs={"size_class": "tiny", "target_spacing_override": [2.5, 1.1, 1.1]})
        plan_and_preprocess(1, num_processes=1, show_progress=False,
                            overrides=["preprocessing.normalization.0.window_hu=[-1350, 1000]"])
        with pytest.raises(DiffprobeError, match="Dataset002_Other cannot be pretrained together with "
                                                 "Dataset001_Phantoms: spacing"):
            pretrain(["1", "2"], name="both", show_progress=False)
