"""Re-planning that changes exactly what was asked, plus what is derived from it.

plans.json records the planner's inputs (``planner_inputs``: size class, patch, schedule,
CT window, training budgets, noise levels of the feature timesteps, plain key overrides).
A flag or ``--override`` of a planner input re-runs the planner with that one input changed,
so everything derived from it follows (the topology from the patch, the timesteps from the
schedule or the CT window at the recorded noise levels, the BPR crop from the patch). An
override of any other key is recorded and applied on top of every later re-plan. The
feature timesteps are carried as noise levels, so tuned timesteps survive an unrelated re-plan
and move with a schedule change instead of silently going stale.
"""

from __future__ import annotations

import copy
from typing import Any

from diffprobe.diffusion import schedule as sch
from diffprobe.errors import DiffprobeError
from diffprobe.planning import planner
from diffprobe.planning.plans import apply_override, parse_override

# dotted plans key -> planner input it sets (everything derived from it is re-derived)
INPUT_KEYS: dict[str, str] = {
    "size_class": "size_class", "patch_size": "patch_size", "batch_size": "batch_size",
    "preprocessing.target_spacing": "target_spacing_override", "memory.target_gb": "memory_target_gb",
    "diffusion.schedule": "schedule", "diffusion.num_timesteps": "num_timesteps",
    "diffusion.beta_start": "beta_start", "diffusion.beta_end": "beta_end",
    "diffusion.feature_timesteps": "timesteps", "network.base_channels": "base_channels",
    "network.max_channels": "max_channels", "network.max_levels": "max_levels",
    "network.blocks_per_level": "blocks_per_level",
}
# keys the planner always derives: a plain override of them would contradict the inputs
DERIVED_KEYS = ("network.levels", "network.total_stride", "diffusion.feature_noise", "training.bpr.crop",
                "planner_inputs")


def _input_for(key: str) -> str | None:
    if key in INPUT_KEYS:
        return INPUT_KEYS[key]
    parts = key.split(".")
    if len(parts) == 4 and parts[:2] == ["preprocessing", "normalization"] and parts[3] == "window_hu":
        return "ct_window"
    if parts[0] == "training" and len(parts) > 1:
        return "training"
    return None


def _set_training(inputs: dict, key: str, value: Any) -> None:
    node = inputs.setdefault("training", {})
    *parents, last = key.split(".")[1:]
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value


def merged_inputs(previous: dict | None, plan_kwargs: dict[str, Any] | None,
                  overrides: list[str] | None) -> dict[str, Any]:
    """The planner inputs after applying flags (``plan_kwargs``) and ``--override`` texts."""
    inputs = copy.deepcopy(previous.get("planner_inputs", {})) if previous else {}
    if previous is not None:
        # the feature timesteps travel as noise levels (reference units): tuned or explicit ones survive
        # a re-plan and follow a schedule change; the default levels need no carrying (re-planning with
        # the same flags then gives the same plans, byte for byte)
        levels = list(previous["diffusion"]["feature_noise"]["reference_levels"])
        default = [round(v, 6) for v in sch.reference_noise_levels()]
        inputs.pop("timesteps", None)
        inputs.pop("noise_levels", None)
        if [round(v, 6) for v in levels] != default:
            inputs["noise_levels"] = levels
    for key, value in (plan_kwargs or {}).items():
        if value is not None:
            inputs[key] = value
    raw = dict(inputs.pop("overrides", {}))
    for text in overrides or []:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if any(key == d or key.startswith(d + ".") for d in DERIVED_KEYS):
            raise DiffprobeError(f"'{key}' is derived by the planner and cannot be overridden",
                                 fix="override the input it follows from instead (patch_size, network.base_channels, "
                                     "network.max_levels, diffusion.schedule, diffusion.feature_timesteps, ...)")
        target = _input_for(key)
        if target == "training":
            _set_training(inputs, key, value)
        elif target == "ct_window":
            inputs["ct_window"] = value
        elif target is not None:
            inputs[target] = value
        else:
            raw[key] = value
    if "timesteps" in inputs:
        inputs.pop("noise_levels", None)  # explicit timesteps win over carried levels
    inputs["overrides"] = raw
    return inputs


def replan(fingerprint: dict, previous: dict | None, plan_kwargs: dict[str, Any] | None = None,
           overrides: list[str] | None = None) -> dict:
    """Plans from the fingerprint and the merged inputs; plain overrides applied on top and recorded."""
    inputs = merged_inputs(previous, plan_kwargs, overrides)
    raw = inputs.pop("overrides")
    try:
        plans = planner.plan(fingerprint, **inputs)
    except TypeError as e:  # an input the planner does not know (hand-edited planner_inputs)
        raise DiffprobeError(f"plans.json's planner_inputs are not understood ({e})",
                             fix="replan from scratch with --clean") from None
    for key, value in raw.items():
        apply_override(plans, key.split("."), value)
    plans["planner_inputs"]["overrides"] = raw
    carried = previous is not None and "timesteps" not in inputs
    for k in ("feature_timesteps_source", "feature_timesteps_tuning"):
        if carried and k in previous["diffusion"]:
            plans["diffusion"][k] = previous["diffusion"][k]
    return plans
