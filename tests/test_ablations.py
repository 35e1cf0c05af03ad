"""Ablations: timestep sweep (resumable), timestep tuning into plans.json, guidance and backbone comparisons.

The tests work on a copy of ``trained_probe_roots`` (tiny phantoms + pretrained model 'tiny'),
so the probes, models and the plans.json edit made here never reach other test files.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from conftest import copy_roots, set_roots

from diffprobe.cli.app import main
from diffprobe.errors import DiffprobeError

DATASET = "Dataset001_Phantoms"
CLASSES = ["liver", "spleen", "kidney_right", "kidney_left", "aorta", "adrenal_right"]
TINY_PRETRAIN = {"bpr_steps": 2, "diffusion_steps": 2, "num_workers": 0}


@pytest.fixture(scope="module")
def _ablation_copy(trained_probe_roots, tmp_path_factory) -> dict[str, Path]:
    return copy_roots(trained_probe_roots, tmp_path_factory, "ablation_roots")


@pytest.fixture
def ablation_roots(use_trained_probe_roots, _ablation_copy, monkeypatch) -> dict[str, Path]:
    """use_trained_probe_roots (one torch thread, nnU-Net variables cleared), redirected to a private copy."""
    return set_roots(_ablation_copy, monkeypatch)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_size_groups_are_terciles_largest_first():
    from diffprobe.workflows.ablations import size_groups

    sizes = {"a": 10, "b": 500, "c": 50, "d": 5, "e": 100, "f": 1000, "g": 1}
    assert size_groups(sizes) == {"big": ["f", "b", "e"], "medium": ["c", "a"], "small": ["d", "g"]}
    assert size_groups({"x": 1.0, "y": 2.0}) == {"big": ["y"], "medium": ["x"], "small": []}


def test_greedy_forward_selection():
    from diffprobe.workflows.ablations import greedy_forward_selection

    scores = {(5,): 0.2, (10,): 0.5, (30,): 0.4, (60,): 0.1, (5, 10): 0.55, (10, 30): 0.6, (10, 60): 0.3,
              (5, 10, 30): 0.58, (10, 30, 60): 0.65}
    calls = []

    def score(ts):
        calls.append(tuple(ts))
        return scores[tuple(ts)]

    singles = {t: scores[(t,)] for t in (5, 10, 30, 60)}
    chosen, best, trace = greedy_forward_selection([5, 10, 30, 60], score, 3, singles)
    assert (chosen, best) == ([10, 30, 60], 0.65)
    assert not any(len(c) == 1 for c in calls)  # the sweep's single-timestep scores are reused
    assert [e["timesteps"] for e in trace if e["selected"]] == [[10], [10, 30], [10, 30, 60]]
    assert greedy_forward_selection([5, 10, 30, 60], score, 2, singles)[:2] == ([10, 30], 0.6)
    scores[(10, 30, 60)] = 0.59  # no improvement over 0.6: stop before k
    assert greedy_forward_selection([5, 10, 30, 60], score, 3, singles)[:2] == ([10, 30], 0.6)
    scores[(5, 10)] = scores[(10, 30)] = scores[(10, 60)] = float("nan")  # NaN never wins
    assert greedy_forward_selection([5, 10, 30, 60], score, 3, singles)[:2] == ([10], 0.5)


def test_timesteps_sweep_writes_csv_png_and_reuses_finished_runs(ablation_roots, capsys):
    from diffprobe.workflows.ablations import SweepConfig, ablate_timesteps, class_sizes, size_groups

    assert main(["ablate", "timesteps", "-d", "001", "--t", "10", "30", "-m", "tiny", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "t=10" in err and "planned" in err and "3 probe(s) trained" in err
    out = ablation_roots["results"] / DATASET / "diffprobe" / "ablations" / "timesteps"
    rows = read_csv(out / "tiny__fold_0.csv")
    assert [r["run"] for r in rows] == ["t=10", "t=30", "planned"]
    assert [r["timesteps"] for r in rows] == ["10", "30", "10 30 60"]
    for col in [f"dice_{c}" for c in CLASSES] + ["dice_big", "dice_medium", "dice_small", "dice_mean"]:
        assert all(0.0 <= float(r[col]) <= 1.0 or math.isnan(float(r[col])) for r in rows), col
    assert_png(out / "tiny__fold_0.png")
    groups = size_groups(class_sizes(1))
    assert sorted(sum(groups.values(), [])) == sorted(CLASSES) and [len(g) for g in groups.values()] == [2, 2, 2]
    assert "liver" in groups["big"] and "adrenal_right" in groups["small"]

    results = ablation_roots["results"] / DATASET / "diffprobe"
    ckpts = [results / c / "fold_0" / "checkpoint_final.pt" for c in
             ("ablate_t10__tiny", "ablate_t30__tiny", "ablate_t10-30-60__tiny")]
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    again = ablate_timesteps(SweepConfig(1, steps=2, show_progress=False), [10, 30], "tiny")  # resumed: none retrained
    assert all(r.reused for r in again.runs)
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes
    assert [round(r.mean, 4) for r in again.runs] == [round(float(r["dice_mean"]), 4) for r in rows]
    with pytest.raises(DiffprobeError, match="different config"):  # a finished run is never mixed with other steps
        ablate_timesteps(SweepConfig(1, steps=3, show_progress=False), [10], "tiny")


def test_tune_timesteps_writes_a_valid_plans_choice(ablation_roots, capsys):
    from diffprobe.planning.plans import load_plans
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.workflows.ablations import SweepConfig, tune_timesteps

    plans_path = ablation_roots["preprocessed"] / DATASET / "diffprobe" / "plans.json"
    before = load_plans(plans_path)
    _, _, ids_before = preprocessed_cases(1)
    result = tune_timesteps(SweepConfig(1, steps=2, show_progress=False), [10, 30], "tiny", k=2)
    plans = load_plans(plans_path)  # validates
    chosen = plans["diffusion"]["feature_timesteps"]
    assert chosen == result.timesteps and 1 <= len(result.greedy_timesteps) <= 2
    assert set(result.greedy_timesteps) <= {10, 30}
    if chosen != before["diffusion"]["feature_timesteps"]:
        assert set(chosen) <= {10, 30} and chosen == result.greedy_timesteps
        assert len(plans["diffusion"]["feature_noise"]["achieved_std"]) == len(chosen)
    else:  # the planned set measured better than anything the greedy search found
        assert result.planned_dice > result.greedy_dice
    assert plans["diffusion"]["feature_timesteps_source"] == "tune_timesteps"
    tuning = plans["diffusion"]["feature_timesteps_tuning"]
    assert tuning["candidates"] == [10, 30] and tuning["pretrained"] == "tiny" and tuning["probe_steps"] == 2
    _, plans_again, ids_after = preprocessed_cases(1)  # still valid and the preprocessed cases still count
    assert ids_after == ids_before and plans_again["diffusion"]["feature_timesteps"] == chosen
    assert len(read_csv(result.csv)) == len(result.trace) + 1

    mtime = plans_path.stat().st_mtime_ns
    assert main(["tune_timesteps", "-d", "1", "--t", "10", "30", "-m", "tiny", "--k", "2", "--steps", "2",
                 "--dry_run"]) == 0
    err = capsys.readouterr().err
    assert "chosen" in err and "--dry_run" in err and "0 probe(s) trained" in err
    assert plans_path.stat().st_mtime_ns == mtime


def test_guidance_ablation_pretrains_missing_models(ablation_roots, capsys):
    from diffprobe.pretraining.pretrain import model_dir
    from diffprobe.utils import read_json

    assert main(["ablate", "guidance", "-d", "1", "--models", "ablate_none", "--models", "ablate_random",
                 "--pretrain", "--diffusion_steps", "2", "--bpr_steps", "2", "--num_workers", "0",
                 "--steps", "2"]) == 0
    for name, mode in (("ablate_none", "none"), ("ablate_random", "random")):
        assert read_json(model_dir(name) / "model.json")["guidance"] == mode
    out = ablation_roots["results"] / DATASET / "diffprobe" / "ablations" / "guidance"
    rows = read_csv(out / "fold_0.csv")
    assert [(r["model"], r["guidance"]) for r in rows] == [("ablate_none", "none"), ("ablate_random", "random")]
    assert all(int(r["parameters"]) > 0 and r["configuration"] == f"ablate_guidance_{r['model']}" for r in rows)
    assert all(f"dice_{c}" in rows[0] for c in CLASSES)
    assert_png(out / "fold_0.png")
    capsys.readouterr()
    assert main(["ablate", "guidance", "-d", "1", "--models", "no_such_model"]) == 1
    err = capsys.readouterr().err
    assert "no_such_model" in err and "--pretrain" in err and "Traceback" not in err


def test_backbone_ablation_counts_parameters(ablation_roots):
    from diffprobe.workflows.ablations import SweepConfig, _ensure_model, ablate_backbone

    pretraining = SweepConfig(1, device="cpu", show_progress=False, pretrain_overrides=TINY_PRETRAIN)
    _ensure_model(pretraining, "ablate_none", "none", "planned")  # no-op after the above
    result = ablate_backbone(SweepConfig(1, steps=2, pretrain_overrides=TINY_PRETRAIN, show_progress=False),
                             ["ablate_none", "ablate_attn_none__none"], pretrain_missing=True)
    rows = read_csv(result.csv)
    assert [(r["model"], r["attention"], r["guidance"]) for r in rows] == [
        ("ablate_none", "planned", "none"), ("ablate_attn_none__none", "none", "none")]
    params = [int(r["parameters"]) for r in rows]
    assert all(p > 0 for p in params) and params == [r.info["parameters"] for r in result.runs]
    assert result.csv.parent.name == "backbone"
    assert_png(result.png)
