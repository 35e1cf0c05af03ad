"""plans.json: load, validate, override, save.

The plans file is the single source of configuration for every later stage. It is
meant to be read and edited by people; :func:`load_plans` validates it and names the
offending key when an edit broke it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffprobe.errors import DiffprobeError
from diffprobe.planning import planner
from diffprobe.planning import schedule as sch
from diffprobe.utils import write_json

PLANS_FILENAME = "plans.json"


def save_plans(plans: dict, path: str | Path) -> None:
    write_json(path, plans)


def load_plans(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DiffprobeError("plans file does not exist", path, "run `diffprobe plan_and_preprocess -d <id>` first")
    try:
        plans = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DiffprobeError(f"plans file is not valid JSON ({e})", path,
                             "fix the edit, or rerun plan_and_preprocess with --replan") from None
    validate_plans(plans, path)
    return plans


def _require(cond: bool, path: Path, key: str, what: str) -> None:
    if not cond:
        raise DiffprobeError(f"invalid value for '{key}': {what}", path,
                             "correct the value, or rerun plan_and_preprocess with --replan")


def _is_list_of(v: Any, kind: type, n: int | None = 3) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(
        isinstance(x, kind) and not isinstance(x, bool) for x in v)


def validate_plans(plans: dict, path: str | Path = PLANS_FILENAME) -> None:
    """Raise DiffprobeError naming the first invalid key."""
    path = Path(path)
    _require(isinstance(plans, dict), path, "<root>", "must be a JSON object")
    version = plans.get("plans_version")
    _require(version == planner.PLANS_VERSION, path, "plans_version",
             f"this diffprobe reads version {planner.PLANS_VERSION}, got {version!r}")
    for key in ("preprocessing", "patch_size", "batch_size", "network", "diffusion", "labels"):
        _require(key in plans, path, key, "missing")
    pre = plans["preprocessing"]
    ts = pre.get("target_spacing")
    _require(_is_list_of(ts, (int, float)) and all(v > 0 for v in ts), path, "preprocessing.target_spacing",
             "need three positive numbers (z, y, x) in mm")
    for c, norm in pre.get("normalization", {}).items():
        _require(norm.get("scheme") in ("ct_window", "zscore_per_image"), path,
                 f"preprocessing.normalization.{c}.scheme", "must be 'ct_window' or 'zscore_per_image'")
        if norm["scheme"] == "ct_window":
            w = norm.get("window_hu")
            _require(_is_list_of(w, (int, float), 2) and w[0] < w[1], path,
                     f"preprocessing.normalization.{c}.window_hu", "need [low, high] with low < high")
    patch = plans["patch_size"]
    _require(_is_list_of(patch, int) and all(p > 0 for p in patch), path, "patch_size",
             "need three positive integers (z, y, x)")
    stride = plans["network"].get("total_stride", [1, 1, 1])
    _require(all(p % k == 0 for p, k in zip(patch, stride)), path, "patch_size",
             f"{patch} is not divisible by the network's total stride {stride}; "
             "replan so the topology follows the patch")
    _require(isinstance(plans["batch_size"], int) and plans["batch_size"] >= 1, path, "batch_size",
             "need a positive integer")
    diff = plans["diffusion"]
    _require(diff.get("schedule") in sch.SCHEDULES, path, "diffusion.schedule", f"one of {sch.SCHEDULES}")
    T = diff.get("num_timesteps")
    _require(isinstance(T, int) and T > 1, path, "diffusion.num_timesteps", "need an integer > 1")
    t = diff.get("feature_timesteps")
    _require(_is_list_of(t, int, None) and len(t) > 0 and all(0 <= v < T for v in t), path,
             "diffusion.feature_timesteps", f"need a non-empty list of integers in [0, {T})")
    _require(isinstance(plans["labels"], dict) and 0 in plans["labels"].values(), path, "labels",
             "need the dataset.json label map with background 0")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'diffusion.schedule=cosine' -> (['diffusion', 'schedule'], 'cosine'); values parse as JSON."""
    if "=" not in text:
        raise DiffprobeError(f"override '{text}' is not KEY=VALUE", fix="write e.g. --override batch_size=2")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().split("."), parsed


def apply_override(plans: dict, keys: list[str], value: Any) -> None:
    node = plans
    for k in keys[:-1]:
        if not isinstance(node, dict) or k not in node:
            raise DiffprobeError(f"override key '{'.'.join(keys)}' does not exist in the plans",
                                 fix="see plans.json for the available keys")
        node = node[k]
    if keys[-1] not in node:
        raise DiffprobeError(f"override key '{'.'.join(keys)}' does not exist in the plans",
                             fix="see plans.json for the available keys")
    node[keys[-1]] = value


def replan_timesteps(plans: dict, schedule: str | None = None, **schedule_kwargs: Any) -> dict:
    """Switch the diffusion schedule, keeping the recorded feature noise levels."""
    diff = plans["diffusion"]
    new = planner.plan_diffusion(
        plans["preprocessing"]["normalization"],
        schedule=schedule or diff["schedule"],
        num_timesteps=schedule_kwargs.get("num_timesteps", diff["num_timesteps"]),
        beta_start=schedule_kwargs.get("beta_start", diff["beta_start"]),
        beta_end=schedule_kwargs.get("beta_end", diff["beta_end"]),
        noise_levels=diff["feature_noise"]["reference_levels"],
    )
    plans["diffusion"] = new
    return plans
