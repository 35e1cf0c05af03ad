"""Which noise levels carry the information: the single-timestep sweep and timestep tuning.

``ablate_timesteps`` probes each feature timestep alone, plus the plans' planned set, so the
effect of the noise level per organ-size group is visible. ``tune_timesteps`` reuses that sweep
(finished probes are never retrained), grows a set by greedy forward selection on validation
Dice, and writes the winner into the dataset's ``plans.json``. Both live here because the
tuning is the sweep plus a search, with the same configuration names and the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.utils import read_json
from diffprobe.workflows.ablations.organ_sizes import class_sizes, size_groups
from diffprobe.workflows.ablations.report import plot_timesteps, table_rows, write_csv
from diffprobe.workflows.ablations.sweep import (
    AblationResult,
    ProbeRun,
    SweepConfig,
    ablation_dir,
    check_timesteps,
    model_meta,
    score_key,
    score_probe,
)

DEFAULT_TIMESTEPS = (5, 10, 30, 60, 100, 200)


@dataclass
class TuneResult:
    timesteps: list[int]  # the set written to the plans
    dice: float
    greedy_timesteps: list[int]
    greedy_dice: float
    planned_timesteps: list[int]  # the plans' set before tuning
    planned_dice: float
    single_dice: dict[int, float]
    trace: list[dict[str, Any]]  # every evaluated set: step, timesteps, dice, selected
    plans_path: Path
    plans_written: bool
    csv: Path
    sweep: AblationResult
    notes: list[str] = field(default_factory=list)


def timesteps_configuration(timesteps: list[int], pretrained: str, head: str = "fpn") -> str:
    """``ablate_t10__NAME`` for one timestep, ``ablate_t10-30-60__NAME`` for a set (sorted)."""
    ts = "-".join(str(t) for t in sorted(set(timesteps)))
    return f"ablate_t{ts}__{pretrained}" + ("" if head == "fpn" else f"__{head}")


def _schedule(diffusion: dict) -> dict:
    return {k: diffusion[k] for k in ("schedule", "num_timesteps", "beta_start", "beta_end")}


def noise_stds(diffusion: dict, timesteps: list[int]) -> list[float]:
    """sqrt(1 - abar_t) of each timestep under the given plans' schedule (normalised units)."""
    from diffprobe.diffusion import schedule as sch

    abar = sch.alphas_cumprod(**_schedule(diffusion))
    return [float(sch.noise_std(abar, int(t))) for t in timesteps]


def _timesteps_probe(config: SweepConfig, label: str, pretrained: str, timesteps: list[int],
                     groups: dict[str, list[str]], info: dict | None = None) -> ProbeRun:
    return score_probe(config, label, pretrained, timesteps,
                       timesteps_configuration(timesteps, pretrained, config.head), groups, info)


def ablate_timesteps(config: SweepConfig, timesteps: list[int] | None = None,
                     pretrained: str = "default") -> AblationResult:
    """One probe per single timestep, plus one on the plans' feature_timesteps (the planned set)."""
    from diffprobe.preprocessing.access import preprocessed_cases

    _, plans, _ = preprocessed_cases(config.dataset)
    meta = model_meta(pretrained)
    singles = list(dict.fromkeys(int(t) for t in (timesteps or DEFAULT_TIMESTEPS)))
    planned = [int(t) for t in plans["diffusion"]["feature_timesteps"]]
    check_timesteps(singles, pretrained, "--t")
    check_timesteps(planned, pretrained, "the plans' feature_timesteps")
    sizes = class_sizes(config.dataset)
    groups = size_groups(sizes)
    classes = list(sizes)
    diffusion = meta["plans"]["diffusion"]  # the schedule the pretrained denoiser was trained with
    runs = [_timesteps_probe(config, f"t={t}", pretrained, [t], groups,
                             {"run": f"t={t}", "timesteps": [t], "noise_std": noise_stds(diffusion, [t])})
            for t in singles]
    planned_info = {"run": "planned", "timesteps": planned, "noise_std": noise_stds(diffusion, planned)}
    planned_run = _timesteps_probe(config, "planned", pretrained, planned, groups, planned_info)
    runs.append(planned_run)
    columns, rows = table_rows(runs, classes, ["run", "timesteps", "noise_std"])
    out = ablation_dir(config.dataset, "timesteps")
    stem = config.stem(pretrained)
    csv_path = write_csv(out / f"{stem}.csv", columns, rows)
    steps_used = read_json(planned_run.folder / "probe.json")["config"]["steps"]
    title = (f"{paths.dataset_name(config.dataset)}: single-timestep probes, model '{pretrained}', "
             f"fold {config.fold}, {steps_used} steps")
    png = plot_timesteps(runs[:-1], planned_run, title, out / f"{stem}.png")
    return AblationResult("timesteps", runs, classes, groups, columns, rows, csv_path, png)


def greedy_forward_selection(candidates: list[int], score: Callable[[list[int]], float], k: int,
                             single_scores: dict[int, float] | None = None
                             ) -> tuple[list[int], float, list[dict[str, Any]]]:
    """Start from the best single timestep; add the candidate that most improves the score.

    Stops at ``k`` timesteps or when no candidate improves the score strictly. Ties go to the
    earlier candidate. NaN scores count as worst. Returns (sorted set, its score, trace).
    """
    if k < 1:
        raise DiffprobeError(f"--k must be at least 1 (got {k})")
    if not candidates:
        raise DiffprobeError("no candidate timesteps", fix="give them with --t 5 10 30 60")
    candidates = list(dict.fromkeys(int(t) for t in candidates))
    singles = {t: (single_scores or {}).get(t) for t in candidates}
    singles = {t: s if s is not None else score([t]) for t, s in singles.items()}
    trace = [{"step": 1, "timesteps": [t], "dice": s, "selected": False} for t, s in singles.items()]
    first = max(candidates, key=lambda t: (score_key(singles[t]), -candidates.index(t)))
    chosen, best = [first], singles[first]
    trace[candidates.index(first)]["selected"] = True
    step = 1
    while len(chosen) < min(k, len(candidates)):
        step += 1
        trial = {}
        for c in candidates:
            if c in chosen:
                continue
            trial[c] = score(sorted([*chosen, c]))
            trace.append({"step": step, "timesteps": sorted([*chosen, c]), "dice": trial[c], "selected": False})
        pick = max(trial, key=lambda c: (score_key(trial[c]), -candidates.index(c)))
        if not score_key(trial[pick]) > score_key(best):
            break
        chosen, best = sorted([*chosen, pick]), trial[pick]
        next(e for e in trace if e["step"] == step and e["timesteps"] == chosen)["selected"] = True
    return sorted(chosen), best, trace


def _tuned_diffusion(plans: dict, chosen: list[int], record: dict) -> dict:
    """The plans' diffusion block with the chosen timesteps and their noise levels recorded.

    The reference levels become the chosen timesteps' noise levels (in reference units), so a
    later schedule change that keeps noise levels keeps the tuned ones.
    """
    from diffprobe.planning import planner

    diff = dict(plans["diffusion"])
    scale = planner.intensity_scale(plans["preprocessing"]["normalization"])
    levels = [s * scale for s in noise_stds(diff, chosen)]
    new = planner.plan_diffusion(plans["preprocessing"]["normalization"], noise_levels=levels, timesteps=chosen,
                                 **_schedule(diff))
    noise = dict(new["feature_noise"])
    noise["definition"] = (noise["definition"].split("; targets are")[0] + "; reference levels: the noise stds of "
                           "the timesteps chosen by tune_timesteps (validation Dice), in reference units")
    noise["chosen_by"] = "tune_timesteps (greedy forward selection on validation Dice)"
    diff.update({"feature_timesteps": new["feature_timesteps"], "feature_noise": noise,
                 "feature_timesteps_source": "tune_timesteps", "feature_timesteps_tuning": record})
    return diff


def tune_timesteps(config: SweepConfig, candidates: list[int] | None = None, pretrained: str = "default",
                   k: int = 3, write: bool = True) -> TuneResult:
    """Pick the feature timesteps by validation Dice and write them into the dataset's plans.json.

    1. the single-timestep sweep over ``candidates`` (+ the planned set), reusing finished runs;
    2. greedy forward selection from the best single timestep, up to ``k`` timesteps;
    3. the greedy set replaces the plans' feature_timesteps unless the planned set scored
       strictly higher (then the plans keep it); either way the measurement is recorded in
       ``diffusion.feature_timesteps_source`` / ``feature_timesteps_tuning``.
    """
    from diffprobe.planning.plans import PLANS_FILENAME, load_plans, save_plans, validate_plans

    if k < 1:
        raise DiffprobeError(f"--k must be at least 1 (got {k})")
    plans_path = paths.preprocessed_dir(config.dataset) / PLANS_FILENAME
    plans = load_plans(plans_path)
    candidates = list(dict.fromkeys(int(t) for t in (candidates or sorted(
        {*DEFAULT_TIMESTEPS, *plans["diffusion"]["feature_timesteps"]}))))
    sweep = ablate_timesteps(config, candidates, pretrained)
    single = {r.timesteps[0]: r.mean for r in sweep.runs[:-1]}
    planned_run = sweep.runs[-1]

    def score(ts: list[int]) -> float:
        return _timesteps_probe(config, "+".join(map(str, ts)), pretrained, ts, sweep.size_groups).mean

    greedy, greedy_dice, trace = greedy_forward_selection(candidates, score, k, single)
    planned = list(planned_run.timesteps)
    keep_planned = score_key(planned_run.mean) > score_key(greedy_dice) and sorted(planned) != greedy
    chosen, dice = (planned, planned_run.mean) if keep_planned else (greedy, greedy_dice)
    notes = []
    if keep_planned:
        notes.append(f"the planned set {planned} scored higher ({planned_run.mean:.4f}) than the greedy set "
                     f"{greedy} ({greedy_dice:.4f}); the plans keep it")
    model_sched = _schedule(model_meta(pretrained)["plans"]["diffusion"])
    if model_sched != _schedule(plans["diffusion"]):
        notes.append(f"the pretrained model's schedule {model_sched} differs from the dataset plans' "
                     f"{_schedule(plans['diffusion'])}: the timesteps were measured under the model's")
    steps_used = read_json(planned_run.folder / "probe.json")["config"]["steps"]
    record = {"pretrained": pretrained, "fold": config.fold, "probe_steps": steps_used, "head": config.head, "k": k,
              "candidates": candidates, "validation_dice": dice, "greedy_timesteps": greedy,
              "greedy_dice": greedy_dice, "planned_timesteps": planned, "planned_dice": planned_run.mean,
              "single_timestep_dice": {str(t): v for t, v in single.items()}}
    record = _json_safe(record)
    if write:
        plans = load_plans(plans_path)  # fresh read: keep edits made while the probes trained
        if keep_planned:
            plans["diffusion"] = {**plans["diffusion"], "feature_timesteps_source": "tune_timesteps",
                                  "feature_timesteps_tuning": record}
        else:
            plans["diffusion"] = _tuned_diffusion(plans, chosen, record)
        validate_plans(plans, plans_path)
        save_plans(plans, plans_path)  # atomic
    out = ablation_dir(config.dataset, "tune_timesteps")
    rows = [{"step": e["step"], "timesteps": e["timesteps"], "dice_mean": e["dice"], "selected": e["selected"]}
            for e in trace]
    rows.append({"step": "planned", "timesteps": planned, "dice_mean": planned_run.mean,
                 "selected": keep_planned})
    csv_path = write_csv(out / f"{config.stem(pretrained)}.csv", ["step", "timesteps", "dice_mean", "selected"], rows)
    return TuneResult(chosen, dice, greedy, greedy_dice, planned, planned_run.mean, single, trace, plans_path,
                      write, csv_path, sweep, notes)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
