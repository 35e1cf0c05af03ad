"""Fingerprint and planner on anisotropic data; timestep planning by noise level; plans validation."""

import json

import numpy as np
import pytest
from conftest import make_raw_dataset

from diffprobe.diffusion import schedule as sch
from diffprobe.errors import DiffprobeError
from diffprobe.fingerprint import compute_fingerprint
from diffprobe.planning import planner
from diffprobe.planning.plans import apply_override, parse_override, replan_timesteps, validate_plans


@pytest.fixture
def aniso_fingerprint(roots):
    folder = make_raw_dataset(roots["raw"], spacing=(0.8, 0.8, 4.0), shape=(10, 48, 56))
    return compute_fingerprint(folder, num_processes=1, show_progress=False)


def test_fingerprint_anisotropic(aniso_fingerprint):
    fp = aniso_fingerprint
    np.testing.assert_allclose(fp["median_spacing"], [4.0, 0.8, 0.8])
    assert fp["num_cases"] == 3 and fp["num_labelled"] == 2
    ct = fp["foreground_intensity_properties_per_channel"]["0"]
    # body mask excludes air: intensities come from fat/soft tissue/organs
    assert ct["percentile_00_5"] > -150 and ct["percentile_99_5"] < 120 and ct["min"] > -500
    # cropping to the body shrinks the in-plane extent
    assert all(a[2] < b[2] for a, b in zip(fp["shapes_after_crop"], fp["shapes_before_crop"]))
    assert fp["class_voxel_counts"]["left"] > 0


def test_target_spacing_rule():
    # isotropic enough: plain median
    sp = np.array([[2.0, 0.8, 0.8], [2.5, 0.7, 0.7], [3.0, 0.9, 0.9]])
    shapes = np.array([[100, 200, 200]] * 3)
    assert planner.target_spacing(sp, shapes) == pytest.approx([2.5, 0.8, 0.8])
    # strongly anisotropic with few slices: 10th percentile along z
    sp = np.array([[5.0, 0.7, 0.7], [5.0, 0.7, 0.7], [3.0, 0.7, 0.7], [5.0, 0.7, 0.7]])
    shapes = np.array([[20, 400, 400]] * 4)
    ts = planner.target_spacing(sp, shapes)
    assert ts[0] == pytest.approx(np.percentile(sp[:, 0], 10)) and ts[0] < 5.0


def test_plan_anisotropic(aniso_fingerprint):
    plans = planner.plan(aniso_fingerprint)
    validate_plans(plans)
    patch = plans["patch_size"]
    stride = plans["network"]["total_stride"]
    assert all(p % k == 0 for p, k in zip(patch, stride))
    # patch never much larger than the median cropped case
    med = plans["fingerprint_summary"]["median_shape_at_target_spacing"]
    assert all(p <= max(np.ceil(m), k) for p, m, k in zip(patch, med, stride))
    levels = plans["network"]["levels"]
    # z (4 mm) is not downsampled at the first level while in-plane (0.8 mm) is
    assert levels[1]["stride_from_previous"][0] == 1 and levels[1]["stride_from_previous"][1:] == [2, 2]
    for lv in levels:
        assert lv["attention"] == ("softmax" if lv["tokens"] <= lv["channels"] else "linear")
    assert plans["diffusion"]["feature_timesteps"] == [10, 30, 60]
    assert plans["axis_order"].startswith("z, y, x")


def test_default_patch_is_paper_size_for_large_data():
    fp = {"spacings": [[2.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[200, 300, 300]] * 4,
          "channel_names": {"0": "CT"}, "labels": {"background": 0}, "dataset": "X", "median_spacing": [2, 1, 1],
          "num_cases": 4, "num_labelled": 0}
    plans = planner.plan(fp, memory_target_gb=16)
    assert plans["patch_size"] == [32, 128, 128]
    small = planner.plan(fp, memory_target_gb=0.5)
    assert np.prod(small["patch_size"]) < 32 * 128 * 128
    assert planner.estimate_memory_gb(small["network"]["levels"]) <= 0.5


def test_timesteps_from_noise_levels():
    assert [round(v, 3) for v in sch.reference_noise_levels()] == [0.047, 0.111, 0.204]
    norm = {"0": {"scheme": "ct_window", "window_hu": [-1350.0, 1000.0], "output_range": [-1.0, 1.0]}}
    lin = planner.plan_diffusion(norm)
    assert lin["feature_timesteps"] == [10, 30, 60]
    cos = planner.plan_diffusion(norm, schedule="cosine")
    # the cosine schedule adds less noise per step: later timesteps reach the same noise levels
    assert all(c > t for c, t in zip(cos["feature_timesteps"], lin["feature_timesteps"]))
    np.testing.assert_allclose(cos["feature_noise"]["achieved_std"], lin["feature_noise"]["achieved_std"], atol=2e-3)
    # a narrower window (more HU per unit... fewer) keeps the HU noise level
    narrow = {"0": {"scheme": "ct_window", "window_hu": [-1000.0, 1000.0], "output_range": [-1.0, 1.0]}}
    nar = planner.plan_diffusion(narrow)
    np.testing.assert_allclose(nar["feature_noise"]["achieved_std_hu"], lin["feature_noise"]["achieved_std_hu"],
                               rtol=0.03)


def test_replan_cosine_keeps_recorded_noise(aniso_fingerprint):
    plans = planner.plan(aniso_fingerprint)
    before = plans["diffusion"]["feature_noise"]["achieved_std"]
    replan_timesteps(plans, "cosine")
    assert plans["diffusion"]["schedule"] == "cosine"
    np.testing.assert_allclose(plans["diffusion"]["feature_noise"]["achieved_std"], before, atol=2e-3)
    abar = sch.alphas_cumprod(schedule="cosine", num_timesteps=1000)
    recomputed = [float(np.sqrt(1 - abar[t])) for t in plans["diffusion"]["feature_timesteps"]]
    np.testing.assert_allclose(recomputed, plans["diffusion"]["feature_noise"]["achieved_std"], atol=1e-6)


def test_q_sample_noise_std_matches():
    """x_t of a constant image has exactly the recorded noise std (sanity of the convention)."""
    abar = sch.alphas_cumprod(**sch.REFERENCE_SCHEDULE)
    rng = np.random.default_rng(0)
    x0 = np.full(200_000, 0.3)
    for t in (10, 30, 60):
        xt = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * rng.standard_normal(x0.shape)
        assert xt.std() == pytest.approx(sch.noise_std(abar, t), rel=0.01)


def test_overrides_and_validation(aniso_fingerprint, tmp_path):
    plans = planner.plan(aniso_fingerprint)
    keys, value = parse_override("batch_size=3")
    apply_override(plans, keys, value)
    assert plans["batch_size"] == 3
    with pytest.raises(DiffprobeError, match="does not exist"):
        apply_override(plans, ["nope", "x"], 1)
    bad = json.loads(json.dumps(plans))
    bad["patch_size"] = [7, 7, 7]
    with pytest.raises(DiffprobeError, match="patch_size"):
        validate_plans(bad, tmp_path / "plans.json")
    bad = json.loads(json.dumps(plans))
    bad["diffusion"]["feature_timesteps"] = [5000]
    with pytest.raises(DiffprobeError, match="feature_timesteps"):
        validate_plans(bad)
    bad = json.loads(json.dumps(plans))
    bad["preprocessing"]["target_spacing"] = [1, -1, 1]
    with pytest.raises(DiffprobeError, match="target_spacing"):
        validate_plans(bad)
