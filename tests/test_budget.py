"""Compute-budget planning: monotone in the budget, recorded in plans, real timing end to end."""

from __future__ import annotations

import copy
import json
import random

import pytest
from conftest import make_raw_dataset

from diffprobe.errors import DiffprobeError
from diffprobe.planning.replan import replan
from diffprobe.planning.size_classes import SIZE_CLASSES
from diffprobe.workflows import budget, step_timing

ORDER = list(SIZE_CLASSES)
# step seconds of the shape measured on the 2-core CPU (tiny < cpu < small in every stage)
TIMINGS = {
    "tiny": {"bpr": 0.12, "diffusion": 0.45, "probe": 0.30},
    "cpu": {"bpr": 0.35, "diffusion": 1.6, "probe": 0.45},
    "small": {"bpr": 0.45, "diffusion": 5.0, "probe": 0.60},
}
BUDGETS = [0.5, 1, 2, 3, 5, 7.5, 10, 12, 15, 20, 25, 30, 45, 60, 90, 120, 240, 480, 1000, 5000]


def fingerprint() -> dict:
    """A phantom-like fingerprint (planning needs nothing else)."""
    shapes = [[31, 63, 91], [16, 95, 138], [48, 73, 100], [43, 77, 115], [31, 101, 126], [59, 66, 96]]
    return {"dataset": "Dataset001_Phantoms", "spacings": [[3.2, 0.83, 0.83]] * len(shapes),
            "shapes_after_crop": shapes, "median_spacing": [3.2, 0.83, 0.83], "num_cases": len(shapes),
            "num_labelled": 4, "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}}


def plan_with(minutes: float, timings: dict = TIMINGS, previous: dict | None = None, plan_kwargs: dict | None = None,
              overrides: list[str] | None = None, **kw) -> dict:
    fp = fingerprint()
    kwargs = dict(plan_kwargs or {})
    kwargs.update(budget.plan_for_budget(fp, previous, kwargs, overrides, minutes, "cpu", step_seconds=timings, **kw))
    return replan(fp, previous, kwargs, overrides)


def assert_monotone(plans_by_budget: list[dict]) -> None:
    """Each next plan has a budget at least as large: never a smaller network, never fewer seconds, and for
    the same network never fewer steps in any stage."""
    for small, large in zip(plans_by_budget, plans_by_budget[1:]):
        rs, rl = small["training"]["budget"], large["training"]["budget"]
        assert rs["minutes"] <= rl["minutes"]
        assert ORDER.index(rs["chosen"]) <= ORDER.index(rl["chosen"]), (rs["minutes"], rs["chosen"], rl["chosen"])
        assert rs["planned_seconds"]["total"] <= rl["planned_seconds"]["total"]
        if rs["chosen"] == rl["chosen"]:
            for stage in budget.STAGES:
                assert small["training"][stage]["steps"] <= large["training"][stage]["steps"], (stage, rs, rl)
                assert rs["planned_seconds"][stage] <= rl["planned_seconds"][stage]


def test_smaller_budget_never_plans_more():
    plans = [plan_with(m) for m in BUDGETS]
    assert_monotone(plans)
    chosen = [p["training"]["budget"]["chosen"] for p in plans]
    assert chosen[0] == "tiny" and "cpu" in chosen  # the budgets span a class change
    fitted = False
    for p in plans:
        rec = p["training"]["budget"]
        if rec["notes"]:  # too short even for tiny's minimum: only below the budgets that fit
            assert rec["chosen"] == "tiny" and not fitted
            continue
        fitted = True
        # what is planned fits the budget less the margin, and reaches the class's minimum
        assert rec["planned_seconds"]["total"] <= rec["minutes"] * 60 * (1 - budget.MARGIN) + 1e-6
        mins = budget.min_steps(rec["chosen"])
        assert all(p["training"][s]["steps"] >= mins[s] for s in budget.STAGES)
        assert p["size_class"] == rec["chosen"]


def test_monotone_for_random_timings():
    """The property holds for any step times that grow with the class, not only for one set."""
    rng = random.Random(0)
    for _ in range(25):
        timings, t = {}, {"bpr": 0.01, "diffusion": 0.01, "probe": 0.01}
        for cls in ("tiny", "cpu", "small"):
            t = {s: v * rng.uniform(1.0, 6.0) for s, v in t.items()}
            timings[cls] = dict(t)
        budgets = sorted(rng.uniform(0.1, 3000) for _ in range(12))
        assert_monotone([plan_with(m, timings) for m in budgets])


def test_caps_free_seconds_for_diffusion():
    rec = plan_with(240)["training"]["budget"]
    caps = budget.step_caps(rec["chosen"])
    assert rec["steps"]["bpr"] == caps["bpr"] and rec["steps"]["probe"] == caps["probe"]
    share = 240 * 60 * (1 - budget.MARGIN) * budget.SPLIT["diffusion"]
    assert rec["planned_seconds"]["diffusion"] > share  # the capped stages' seconds went to diffusion
    assert rec["planned_seconds"]["total"] <= 240 * 60 * (1 - budget.MARGIN)


def test_record_in_plans():
    plans = plan_with(30)
    rec = plans["training"]["budget"]
    assert rec["minutes"] == 30 and rec["device"] == "cpu"
    assert rec["split"] == {"bpr": 0.15, "diffusion": 0.45, "probe": 0.35, "margin": 0.05}
    assert sum(budget.SPLIT.values()) + budget.MARGIN == pytest.approx(1.0)
    assert [c["size_class"] for c in rec["candidates"]] == ["tiny", "cpu", "small"]
    for c in rec["candidates"]:
        if c["timed"].startswith("skipped"):
            continue
        assert c["seconds_per_step"] == TIMINGS[c["size_class"]] and c["timed"] == "injected"
    assert plans["size_class"] == rec["chosen"] == "cpu"
    for stage in budget.STAGES:
        assert plans["training"][stage]["steps"] == rec["steps"][stage]
        assert rec["planned_seconds"][stage] == pytest.approx(
            rec["steps"][stage] * TIMINGS["cpu"][stage] * budget.RUN_OVERHEAD[stage], abs=0.1)
    assert rec["planned_seconds"]["total"] == pytest.approx(sum(rec["planned_seconds"][s] for s in budget.STAGES))
    json.dumps(plans)  # the record is plain JSON


def test_cached_timings_reused_and_monotone(monkeypatch):
    """A re-plan with another budget times nothing again when the networks are unchanged."""
    calls = []

    def fake(plans, device, max_diffusion_seconds=None):
        calls.append(plans["size_class"])
        return {**TIMINGS[plans["size_class"]], "parts": {"probe": {"head_step": 0.1}}}

    monkeypatch.setattr(budget, "measure_step_seconds", fake)
    first = plan_with(60, timings=None)
    assert calls == ["tiny", "cpu", "small"]
    calls.clear()
    second = plan_with(20, timings=None, previous=first)
    assert calls == []
    assert all(c["timed"].startswith("cached") for c in second["training"]["budget"]["candidates"][:2])
    assert_monotone([second, first])
    # a changed network is timed again
    third = plan_with(20, timings=None, previous=first, overrides=["network.blocks_per_level=2"])
    assert calls and third["network"]["blocks_per_level"] == 2


def test_slow_candidate_is_pruned_after_its_diffusion_step(monkeypatch):
    def fake(plans, device, max_diffusion_seconds=None):
        t = TIMINGS[plans["size_class"]]
        if max_diffusion_seconds is not None and t["diffusion"] > max_diffusion_seconds:
            return {"bpr": None, "diffusion": t["diffusion"], "probe": None}
        return dict(t)

    monkeypatch.setattr(budget, "measure_step_seconds", fake)
    rec = plan_with(30, timings=None)["training"]["budget"]
    assert rec["candidates"][1]["fits"] and rec["chosen"] == "cpu"
    small = rec["candidates"][2]
    assert small["fits"] is False and small["seconds_per_step"]["bpr"] is None and "too slow" in small["timed"]


def test_explicit_class_and_fixed_steps():
    plans = plan_with(30, plan_kwargs={"size_class": "tiny"}, overrides=["training.probe.steps=700"])
    rec = plans["training"]["budget"]
    assert [c["size_class"] for c in rec["candidates"]] == ["tiny"] and plans["size_class"] == "tiny"
    assert plans["training"]["probe"]["steps"] == 700 == rec["steps"]["probe"]
    assert rec["planned_seconds"]["probe"] == pytest.approx(700 * TIMINGS["tiny"]["probe"])
    assert rec["planned_seconds"]["total"] <= 30 * 60 * (1 - budget.MARGIN)
    assert any("fixed" in n for n in rec["notes"])


def test_earlier_training_inputs_survive():
    """Recorded training inputs of earlier runs (e.g. an lr override) are kept by a budget re-plan."""
    fp = fingerprint()
    previous = replan(fp, None, {"size_class": "cpu"}, ["training.probe.lr=0.005"])
    plans = plan_with(15, previous=previous)
    assert plans["training"]["probe"]["lr"] == 0.005
    assert plans["training"]["probe"]["steps"] == plans["training"]["budget"]["steps"]["probe"]


def test_refuses_a_nonsense_budget():
    for bad in (0, -5, float("nan"), float("inf"), "x"):
        with pytest.raises(DiffprobeError):
            budget.plan_for_budget(fingerprint(), None, {}, None, bad, "cpu", step_seconds=TIMINGS)
    with pytest.raises(DiffprobeError):
        budget.plan_for_budget(fingerprint(), None, {}, None, 10, "cpu", candidates=["huge"], step_seconds=TIMINGS)


def test_plan_and_preprocess_with_budget_times_real_steps(roots, monkeypatch):
    """End to end with real timing (tiny only, to stay fast): plans hold the measured step times."""
    import torch

    from diffprobe.planning.plans import load_plans
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    make_raw_dataset(roots["raw"], dataset_id=7, n_labelled=2, n_unlabelled=0, shape=(12, 40, 48))
    monkeypatch.setattr(budget, "CPU_CANDIDATES", ("tiny",))
    monkeypatch.setattr(step_timing, "MEASURED_STEPS", 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = plan_and_preprocess(7, num_processes=1, show_progress=False, budget_minutes=20, device="cpu")
        plans = load_plans(report.plans_path)
        rec = plans["training"]["budget"]
        assert rec["minutes"] == 20 and rec["chosen"] == "tiny" == plans["size_class"]
        (cand,) = rec["candidates"]
        assert cand["timed"] == "measured" and cand["timing_seconds"] > 0
        assert all(cand["seconds_per_step"][s] > 0 for s in budget.STAGES)
        assert set(cand["parts"]["probe"]) == {"head_step", "extract_batch", "extractions_per_step"}
        assert all(cand["parts"][s]["step"] > 0 and cand["parts"][s]["loader"] > 0 for s in ("bpr", "diffusion"))
        for s in budget.STAGES:
            assert plans["training"][s]["steps"] == rec["steps"][s] >= 1
        # a smaller budget re-plans from the cached timings: same network, no more steps
        smaller = load_plans(plan_and_preprocess(7, num_processes=1, show_progress=False, budget_minutes=5,
                                                 device="cpu").plans_path)
        assert smaller["training"]["budget"]["candidates"][0]["timed"].startswith("cached")
        assert smaller["network"] == plans["network"]
        assert_monotone([smaller, copy.deepcopy(plans)])
    finally:
        torch.set_num_threads(threads)


def test_probe_pool_defaults_match_train_probe():
    """The probe cost model reads the pool and validation settings train_probe uses."""
    from diffprobe.workflows.train_probe import PROBE_DEFAULTS

    for key, value in budget.PROBE_POOL_DEFAULTS.items():
        assert PROBE_DEFAULTS[key] == value, key


def test_cli_budget_minutes(roots, monkeypatch, capsys):
    from diffprobe.cli.app import main
    from diffprobe.planning.plans import load_plans

    make_raw_dataset(roots["raw"], dataset_id=5, n_labelled=2, n_unlabelled=0)
    monkeypatch.setattr(budget, "measure_step_seconds",
                        lambda plans, device, max_diffusion_seconds=None: dict(TIMINGS[plans["size_class"]]))
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1", "--budget_minutes", "30", "-device", "cpu"]) == 0
    plans = load_plans(roots["preprocessed"] / "Dataset005_Tiny" / "diffprobe" / "plans.json")
    rec = plans["training"]["budget"]
    assert rec["minutes"] == 30 and rec["device"] == "cpu" and plans["size_class"] == rec["chosen"] == "cpu"
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1", "--budget_minutes", "-3", "-device", "cpu"]) == 1
    assert "budget_minutes" in capsys.readouterr().err
