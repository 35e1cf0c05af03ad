"""Compute-budget planning: time real training steps on this device, then plan what fits.

``diffprobe plan_and_preprocess -d 1 --budget_minutes 30 [-device cpu|cuda]`` asks for a plan
whose pretraining (BPR + diffusion) plus probe training take about 30 minutes here. How:

1. **Candidates**: the size classes allowed on the device, small to large (CPU: tiny, cpu,
   small; GPU: + paper). A ``size_class`` given together with the budget is the only candidate
   (only the step counts are planned then). Each candidate's plans are built with
   :func:`~diffprobe.planning.replan.replan` from the same inputs and overrides the final
   plan uses, so the timed networks are exactly the ones that will be trained.
2. **Timing**: for each candidate, the real networks are built from its plans on the device
   (fixed seed) and real optimizer steps are timed on random tensors of the planned shapes,
   through the stages' own loss functions and the shared trainer's step (autocast, AdamW,
   gradient clipping, EMA, channels_last_3d as planned): the BPR on ``max(2, batch)`` crop
   pairs, the denoiser on ``batch`` patches with 3 guidance channels, and the probe as it
   trains with a feature pool: one FPN-head step on pooled features plus the amortised
   feature extraction (``pool_patches`` patches per ``pool_refresh`` steps, and the patch
   validation's ``val_patches`` per ``validate_every`` steps). The data loading of a BPR and a
   diffusion batch is timed too, by the stages' own batch classes on a synthetic case of the
   median planned shape (the diffusion batch's cubic augmentation costs as much as a tiny
   denoiser step on 2 CPU cores), and added to the step where the loader processes share the
   cores with torch (:func:`with_loading`). ``WARMUP_STEPS`` untimed steps, then the median of
   at least ``MEASURED_STEPS`` timed ones (more for fast steps, fewer for slow ones). Timings
   of a candidate whose networks and shapes are unchanged are reused from the previous plans'
   record (the timing cache), so re-planning with another budget compares like with like and
   costs nothing. A larger candidate is not timed once a smaller one does not fit, nor beyond
   its denoiser step when that alone cannot buy its minimum steps.
3. **Split**: of the budget, ``SPLIT`` = BPR 15 %, diffusion 45 %, probe 35 %, and 5 %
   margin for what the step times do not hold (process start-up, BPR-map inference,
   checkpoints, plots, the final sliding-window validation). Steps per stage =
   floor(stage seconds / (measured seconds per step x ``RUN_OVERHEAD``)): a real run's steps are
   slower than the timed ones (loader contention over an hour, logging, checkpoints; measured per
   stage on the shared real CTs). BPR steps are capped at ``CAP_FACTOR`` x the class's own
   default (2x: more steps of this small network buy little), probe steps at 4x; the seconds a
   cap frees go to diffusion. The probe's share is large because its steps are what fit the
   labels: on the shared real CT the same pretrained model's probe fitted its training case at
   mean Dice 0.75 after 2000 steps and 0.83 after 4000 (``docs/results.md``, "More probe steps").
   Steps fixed by the user this run (``--override training.<stage>.steps=N``) are kept and paid
   for first.
4. **Choice**: the largest candidate whose steps reach the class's minimum in every stage,
   ``max(MIN_STEPS[stage], MIN_FRACTION x class default)``: a larger network trained far
   short of its schedule is worse than a smaller one trained fully. When not even the
   smallest candidate reaches its minimum, it is planned with what fits (at least one step)
   and a note says so.

Monotone by construction: with the step times fixed, every stage's steps are a
non-decreasing function of the budget, "fits" is therefore monotone too, and the chosen class
is the largest fitting one. So a smaller budget never plans a larger network, nor, for the
same network, more steps in any stage, nor more planned seconds. (Switching to a smaller
network at a smaller budget may give that smaller network more steps than the larger one had:
it is faster per step; the planned seconds still do not grow.)

The record, ``plans["training"]["budget"]``: minutes, device, threads, split, minimums, every
candidate with its measured seconds per step per stage (and their parts: step, loader, the
probe's head step and extraction), the chosen
class, its steps, planned seconds per stage and in total, and how long the timing took.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffprobe.devices import loader_workers, usable_cores
from diffprobe.errors import DiffprobeError
from diffprobe.planning import size_classes
from diffprobe.planning.replan import merged_inputs, replan
from diffprobe.workflows.step_timing import (  # noqa: F401  (PROBE_POOL_DEFAULTS re-exported)
    PROBE_POOL_DEFAULTS,
    _load_average,
    measure_step_seconds,
    probe_settings,
)

STAGES = ("bpr", "diffusion", "probe")
# Probe 35 % (was 20 %, diffusion 60 %): the probe was the stage short of steps (docs/results.md,
# "More probe steps"); the planned hour's diffusion steps fell by about a fifth for it (3681 -> 2969).
SPLIT: dict[str, float] = {"bpr": 0.15, "diffusion": 0.45, "probe": 0.35}
MARGIN = 0.05  # start-up, BPR maps, checkpoints, plots, final validation
# Seconds a real training step takes per second of its timed step, per stage. Why: the timed steps run
# alone for a few seconds; a real run shares the cores with its loader process for an hour, logs,
# checkpoints and evaluates. Measured on the shared real CTs (2-core CPU, idle machine, `cpu` class
# planned for 60 min): BPR 0.265 s/step real vs 0.162 timed (1.6x), diffusion 0.697 vs 0.590 (1.2x),
# probe 648 s for 2000 steps vs 629 planned, final validation included (1.0x); the 60-min plan took 69.
RUN_OVERHEAD: dict[str, float] = {"bpr": 1.6, "diffusion": 1.2, "probe": 1.0}
MIN_STEPS: dict[str, int] = {"bpr": 100, "diffusion": 300, "probe": 500}
MIN_FRACTION = 0.25  # of the class's default steps: a class below this is too short-trained to choose
CAP_FACTOR: dict[str, float | None] = {"bpr": 2.0, "diffusion": None, "probe": 4.0}
CPU_CANDIDATES = ("tiny", "cpu", "small")
GPU_CANDIDATES = ("tiny", "cpu", "small", "paper")
TIMING_VERSION = 2  # bump when what is timed changes: cached timings of an older version are not reused
# (2: guidance channels augmented linearly, loader processes per device)

StepTimer = Callable[[dict, str], dict[str, Any]]


# ---- the rule (pure: plans + step times -> steps) -----------------------------------------------
def min_steps(size_class: str) -> dict[str, int]:
    """The fewest steps per stage that make ``size_class`` worth choosing."""
    train = size_classes.size_class(size_class)["training"]
    return {s: max(MIN_STEPS[s], int(math.ceil(MIN_FRACTION * int(train[s]["steps"])))) for s in STAGES}


def step_caps(size_class: str) -> dict[str, int | None]:
    train = size_classes.size_class(size_class)["training"]
    return {s: None if CAP_FACTOR[s] is None else int(CAP_FACTOR[s] * int(train[s]["steps"])) for s in STAGES}


def allocate(budget_minutes: float, seconds_per_step: dict[str, float], size_class: str,
             fixed_steps: dict[str, int] | None = None) -> dict[str, Any]:
    """Steps and planned seconds per stage for one candidate (monotone in ``budget_minutes``).

    ``fixed_steps``: stages whose steps the user fixed; they are paid for first and the other
    stages share what is left in proportion to ``SPLIT``.
    """
    fixed = {s: int(v) for s, v in (fixed_steps or {}).items() if s in STAGES}
    seconds_per_step = {s: seconds_per_step[s] * RUN_OVERHEAD[s] for s in STAGES}  # what a real step costs
    usable = budget_minutes * 60.0 * (1.0 - MARGIN)
    free = [s for s in STAGES if s not in fixed]
    left = max(0.0, usable - sum(fixed[s] * seconds_per_step[s] for s in fixed))
    share_sum = sum(SPLIT[s] for s in free) or 1.0
    seconds = {s: left * SPLIT[s] / share_sum for s in free}
    caps = step_caps(size_class)
    freed = 0.0
    steps: dict[str, int] = dict(fixed)
    for s in free:
        raw = seconds[s] / seconds_per_step[s]
        if caps[s] is not None and raw > caps[s]:
            freed += seconds[s] - caps[s] * seconds_per_step[s]  # only the capped part: monotone in the budget
            steps[s] = caps[s]
        else:
            steps[s] = int(math.floor(raw))
    if "diffusion" in free:
        steps["diffusion"] = int(math.floor((seconds["diffusion"] + freed) / seconds_per_step["diffusion"]))
    mins = min_steps(size_class)
    fits = all(steps[s] >= mins[s] for s in free) and all(steps[s] >= 1 for s in STAGES)
    planned = {s: round(steps[s] * seconds_per_step[s], 1) for s in STAGES}
    planned["total"] = round(sum(planned[s] for s in STAGES), 1)
    return {"steps": {s: steps[s] for s in STAGES}, "fits": fits, "min_steps": mins, "planned_seconds": planned}


def choose(budget_minutes: float, timings: Sequence[tuple[str, dict[str, float] | None]],
           fixed_steps: dict[str, int] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Index of the chosen candidate (the largest that fits, else the first) and every allocation.

    ``timings``: (size class, seconds per step per stage or None when not timed), small to large.
    """
    allocations: list[dict[str, Any]] = []
    chosen = None
    for i, (cls, sps) in enumerate(timings):
        if sps is None:
            allocations.append({"fits": False, "steps": None, "planned_seconds": None})
            continue
        alloc = allocate(budget_minutes, sps, cls, fixed_steps)
        allocations.append(alloc)
        if alloc["fits"]:
            chosen = i
    if chosen is None:
        chosen = 0
        a = allocations[0]
        sps = timings[0][1]
        if a["steps"] is not None and sps is not None:  # planned anyway with what fits, at least one step each
            a["steps"] = {s: max(1, a["steps"][s]) for s in STAGES}
            a["planned_seconds"] = {s: round(a["steps"][s] * sps[s], 1) for s in STAGES}
            a["planned_seconds"]["total"] = round(sum(a["planned_seconds"][s] for s in STAGES), 1)
    return chosen, allocations


# ---- timing --------------------------------------------------------------------------------------
def timing_key(plans: dict, device: str) -> str:
    """What a step time depends on: the networks, shapes, batch, step settings, device and torch."""
    train = plans["training"]
    relevant = {
        "version": TIMING_VERSION, "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None,
        "network": plans["network"], "patch_size": plans["patch_size"], "batch_size": plans["batch_size"],
        "bpr": {k: train["bpr"].get(k) for k in ("width", "crop")},
        "probe": probe_settings(plans), "feature_timesteps": len(plans["diffusion"]["feature_timesteps"]),
        "num_classes": max(int(v) for v in plans["labels"].values()) + 1,
        "channels_last": train.get("channels_last"), "compile": train.get("compile"),
        **({"cuda_graphs": True} if train.get("cuda_graphs") else {}),  # (absent when off: older keys still hold)
        "ema": train["diffusion"].get("ema_decay") is not None,
        "loader_workers": loader_workers(int(train.get("num_workers", 0)), device),
    }
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the entry point -----------------------------------------------------------------------------
def _candidates(device: str, plan_kwargs: dict, candidates: Sequence[str] | None) -> list[str]:
    if plan_kwargs.get("size_class"):
        return [str(plan_kwargs["size_class"])]
    allowed = list(GPU_CANDIDATES if str(device).startswith("cuda") else CPU_CANDIDATES)
    if candidates is None:
        return allowed
    unknown = [c for c in candidates if c not in size_classes.SIZE_CLASSES]
    if unknown:
        raise DiffprobeError(f"unknown size class(es) {unknown} among the budget candidates",
                             fix=f"use some of {', '.join(size_classes.SIZE_CLASSES)}")
    order = list(size_classes.SIZE_CLASSES)
    return sorted(dict.fromkeys(candidates), key=order.index)


def _fixed_steps(plan_kwargs: dict, overrides: list[str] | None) -> dict[str, int]:
    """Steps the user fixed in this run (``plan_kwargs['training']`` or ``--override training.<s>.steps``)."""
    fixed: dict[str, int] = {}
    for s in STAGES:
        v = ((plan_kwargs.get("training") or {}).get(s) or {}).get("steps")
        if v is not None:
            fixed[s] = int(v)
    only = merged_inputs(None, None, overrides).get("training", {})
    for s in STAGES:
        v = (only.get(s) or {}).get("steps")
        if v is not None:
            fixed[s] = int(v)
    return fixed


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(float(value), 5) if isinstance(value, (int, float)) else value


def _complete(timing: dict) -> bool:
    return all(timing.get(s) is not None for s in STAGES)


def _cached_timings(previous: dict | None) -> dict[str, dict]:
    """Timing key -> seconds per step, from the previous plans' budget record."""
    record = ((previous or {}).get("training") or {}).get("budget") or {}
    out = {}
    for c in record.get("candidates", []) or []:
        if isinstance(c, dict) and c.get("timing_key") and isinstance(c.get("seconds_per_step"), dict) \
                and c["seconds_per_step"].get("diffusion") is not None:
            out[c["timing_key"]] = {**c["seconds_per_step"], "parts": c.get("parts")}
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def plan_for_budget(fingerprint: dict, previous: dict | None, plan_kwargs: dict, overrides: list[str] | None,
                    budget_minutes: float, device: str, *, candidates: Sequence[str] | None = None,
                    step_seconds: dict[str, dict[str, float]] | None = None) -> dict:
    """Planner kwargs (``size_class``, ``training={bpr/diffusion/probe: {steps}}``, ``budget={record}``)
    that make pretraining + probe training fit ``budget_minutes`` on ``device``.

    ``candidates``: restrict the size classes tried (default: those allowed on the device);
    ``step_seconds``: ``{size_class: {"bpr": s, "diffusion": s, "probe": s}}`` instead of timing
    (tests, what-if planning). Merge the result into the planner kwargs and call
    :func:`~diffprobe.planning.replan.replan`.
    """
    from diffprobe.devices import resolve_device

    try:
        budget_minutes = float(budget_minutes)
    except (TypeError, ValueError):
        budget_minutes = float("nan")
    if not budget_minutes > 0 or math.isinf(budget_minutes):
        raise DiffprobeError(f"--budget_minutes must be a positive number of minutes, got {budget_minutes}",
                             fix="e.g. --budget_minutes 30")
    plan_kwargs = dict(plan_kwargs or {})
    dev = resolve_device(device)
    names = _candidates(dev, plan_kwargs, candidates)
    fixed = _fixed_steps(plan_kwargs, overrides)
    cache = _cached_timings(previous)
    load = _load_average()  # before timing (our own steps would count in it)
    t_start = time.perf_counter()
    timings: list[tuple[str, dict[str, float] | None]] = []
    rows: list[dict[str, Any]] = []
    for name in names:
        cand_plans = replan(fingerprint, previous, {**plan_kwargs, "size_class": name}, overrides)
        key = timing_key(cand_plans, dev)
        row: dict[str, Any] = {"size_class": name, "patch_size": cand_plans["patch_size"],
                               "batch_size": cand_plans["batch_size"],
                               "base_channels": cand_plans["network"]["base_channels"],
                               "levels": len(cand_plans["network"]["levels"]), "timing_key": key}
        if rows and not rows[-1]["fits"]:
            row.update({"timed": "skipped (a smaller candidate did not fit)", "seconds_per_step": None,
                        "fits": False})
            rows.append(row)
            timings.append((name, None))
            continue
        # the denoiser's step alone tells when even the whole budget cannot buy its minimum steps (the
        # smallest candidate is always timed in full: it is planned when nothing fits)
        limit = None if "diffusion" in fixed or not rows else \
            budget_minutes * 60.0 * (1.0 - MARGIN) / min_steps(name)["diffusion"] / RUN_OVERHEAD["diffusion"]
        cached = cache.get(key)
        if step_seconds is not None and name in step_seconds:
            measured, how = dict(step_seconds[name]), "injected"
        elif cached is not None and (_complete(cached) or (limit is not None and cached["diffusion"] > limit)):
            measured, how = cached, "cached (previous plans, same networks and device)"
        else:
            t0 = time.perf_counter()
            measured, how = measure_step_seconds(cand_plans, dev, max_diffusion_seconds=limit), "measured"
            row["timing_seconds"] = round(time.perf_counter() - t0, 2)
        # rounded as recorded, so a re-plan from the cached record decides exactly as this one
        measured = {**measured, **{s: None if measured.get(s) is None else round(float(measured[s]), 5)
                                   for s in STAGES}}
        if not _complete(measured):
            row.update({"timed": how + "; diffusion only: its step alone is too slow for the minimum steps",
                        "seconds_per_step": {s: measured[s] for s in STAGES}, "fits": False})
            if measured.get("parts"):
                row["parts"] = _rounded(measured["parts"])
            rows.append(row)
            timings.append((name, None))
            continue
        sps = {s: float(measured[s]) for s in STAGES}
        row.update({"timed": how, "seconds_per_step": {s: round(sps[s], 5) for s in STAGES}})
        if measured.get("parts"):
            row["parts"] = _rounded(measured["parts"])
        timings.append((name, sps))
        _, allocs = choose(budget_minutes, [(name, sps)], fixed)
        row["fits"] = bool(allocs[0]["fits"])
        rows.append(row)
    chosen, allocs = choose(budget_minutes, timings, fixed)
    for row, alloc in zip(rows, allocs):
        if alloc.get("steps") is not None:
            row.update({"steps": alloc["steps"], "min_steps": alloc["min_steps"],
                        "planned_seconds": alloc["planned_seconds"]})
    alloc = allocs[chosen]
    notes = []
    if not alloc["fits"]:
        notes.append(f"{budget_minutes:g} min is too short for the minimum steps of the smallest candidate "
                     f"'{names[chosen]}' ({alloc['min_steps']}); planned with what fits")
    if fixed:
        notes.append(f"steps fixed by the user: {fixed}")
    if load is not None and dev == "cpu" and any(r["timed"] == "measured" for r in rows) and load > usable_cores():
        notes.append(f"the CPU was busy while timing (load {load:.1f} on {usable_cores()} cores): the plan assumes it "
                     "stays this busy; re-plan on an idle machine for a plan of the machine alone")
    record = {
        "minutes": budget_minutes, "device": dev, "torch_threads": torch.get_num_threads(), "cpu_cores": usable_cores(),
        "load_average": None if load is None else round(load, 2),
        "rule": "largest candidate whose steps reach max(min_steps, min_fraction x class default) in every stage; "
                "steps = floor(stage seconds / (seconds per timed step x run_overhead)); BPR and probe capped at "
                "cap_factor x the class default, the freed seconds go to diffusion",
        "split": {**SPLIT, "margin": MARGIN}, "run_overhead": RUN_OVERHEAD, "min_steps": MIN_STEPS,
        "min_fraction": MIN_FRACTION, "cap_factor": CAP_FACTOR, "candidates": rows, "chosen": names[chosen],
        "steps": alloc["steps"],
        "planned_seconds": alloc["planned_seconds"],
        "planned_minutes": round(alloc["planned_seconds"]["total"] / 60.0, 2),
        "timing_seconds": round(time.perf_counter() - t_start, 2), "notes": notes,
    }
    previous_training = ((previous or {}).get("planner_inputs") or {}).get("training") or {}
    training = _deep_merge(_deep_merge(previous_training, plan_kwargs.get("training") or {}),
                           {s: {"steps": int(alloc["steps"][s])} for s in STAGES})
    return {"size_class": names[chosen], "training": training, "budget": record}
