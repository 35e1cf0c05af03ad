"""plans.json: load, validate, override, save.

The plans file is the single source of configuration for every later stage. It is
meant to be read and edited by people; :func:`load_plans` validates it and names the
offending key when an edit broke it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffprobe.diffusion import schedule as sch
from diffprobe.errors import DiffprobeError
from diffprobe.planning import planner
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffprobeError(f"plans file is not valid JSON ({e})", path,
                             f"fix the edit, or rewrite the plans with {_replan_fix(path)}") from None
    validate_plans(plans, path)
    return plans


def _replan_fix(path: Path) -> str:
    """The command that rewrites this plans.json (``<preprocessed>/DatasetXXX_Name/diffprobe/plans.json``)."""
    dataset = path.parent.parent.name if path.parent.name == "diffprobe" else "<id>"
    return f"`diffprobe plan_and_preprocess -d {dataset} --replan` (hand edits are lost)"


def _require(cond: bool, path: Path, key: str, what: str) -> None:
    if not cond:
        raise DiffprobeError(f"invalid value for '{key}': {what}", path,
                             f"correct the value, or rewrite the plans with {_replan_fix(path)}")


def _is_list_of(v: Any, kind: type, n: int | None = 3) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(
        isinstance(x, kind) and not isinstance(x, bool) for x in v)


def has_ct_channel(plans: dict) -> bool:
    """Whether a channel of the plans is CT (dataset.json name "CT"): only then is there a HU body mask."""
    return any(str(n).strip().lower() == "ct" for n in (plans.get("channel_names") or {}).values())


def validate_plans(plans: dict, path: str | Path = PLANS_FILENAME) -> None:
    """Raise DiffprobeError naming the first invalid key.

    Why every type is checked: plans.json is edited by hand, and a later stage indexing a
    string or a negative size would fail with a traceback far from the edit that caused it.
    """
    path = Path(path)
    _require(isinstance(plans, dict), path, "<root>", "must be a JSON object")
    version = plans.get("plans_version")
    _require(version == planner.PLANS_VERSION, path, "plans_version",
             f"this diffprobe reads version {planner.PLANS_VERSION}, got {version!r}")
    for key in ("preprocessing", "patch_size", "batch_size", "network", "diffusion", "labels"):
        _require(key in plans, path, key, "missing")
    for key in ("preprocessing", "network", "diffusion", "labels"):
        _require(isinstance(plans[key], dict), path, key, f"must be a JSON object, got {plans[key]!r}"[:200])
    pre = plans["preprocessing"]
    ts = pre.get("target_spacing")
    _require(_is_list_of(ts, (int, float)) and all(v > 0 for v in ts), path, "preprocessing.target_spacing",
             "need three positive numbers (z, y, x) in mm")
    norms = pre.get("normalization", {})
    _require(isinstance(norms, dict), path, "preprocessing.normalization",
             "must map channel numbers to {'scheme': ...} objects")
    for c, norm in norms.items():
        _require(isinstance(norm, dict), path, f"preprocessing.normalization.{c}", "must be a JSON object")
        _require(norm.get("scheme") in ("ct_window", "zscore_per_image"), path,
                 f"preprocessing.normalization.{c}.scheme",
                 f"must be 'ct_window' or 'zscore_per_image', got {norm.get('scheme')!r}")
        if norm["scheme"] == "ct_window":
            w = norm.get("window_hu")
            _require(_is_list_of(w, (int, float), 2) and w[0] < w[1], path,
                     f"preprocessing.normalization.{c}.window_hu", f"need two numbers low, high with low < high, "
                     f"got {w!r}")
    patch = plans["patch_size"]
    _require(_is_list_of(patch, int) and all(p > 0 for p in patch), path, "patch_size",
             f"need three positive integers (z, y, x), got {patch!r}")
    stride = plans["network"].get("total_stride", [1, 1, 1])
    _require(_is_list_of(stride, int) and all(k > 0 for k in stride), path, "network.total_stride",
             f"need three positive integers, got {stride!r}")
    _require(all(p % k == 0 for p, k in zip(patch, stride)), path, "patch_size",
             f"{patch} is not divisible by the network's total stride {stride}; "
             "replan so the topology follows the patch")
    _require(isinstance(plans["batch_size"], int) and not isinstance(plans["batch_size"], bool)
             and plans["batch_size"] >= 1, path, "batch_size", f"need a positive integer, got {plans['batch_size']!r}")
    diff = plans["diffusion"]
    _require(diff.get("schedule") in sch.SCHEDULES, path, "diffusion.schedule",
             f"one of {', '.join(sch.SCHEDULES)}, got {diff.get('schedule')!r}")
    T = diff.get("num_timesteps")
    _require(isinstance(T, int) and not isinstance(T, bool) and T > 1, path, "diffusion.num_timesteps",
             f"need an integer > 1, got {T!r}")
    t = diff.get("feature_timesteps")
    _require(_is_list_of(t, int, None) and len(t) > 0 and all(0 <= v < T for v in t), path,
             "diffusion.feature_timesteps", f"need a non-empty list of integers from 0 to {T - 1}, got {t!r}")
    _require(0 in plans["labels"].values(), path, "labels", "need the dataset.json label map with background 0")
    post = plans.get("postprocessing", {})
    _require(isinstance(post, dict), path, "postprocessing", "must be a JSON object, e.g. {\"outside_body\": true}")
    _require(isinstance(post.get("outside_body", False), bool), path, "postprocessing.outside_body",
             f"must be true or false, got {post.get('outside_body')!r}")
    _require(not post.get("outside_body") or has_ct_channel(plans), path, "postprocessing.outside_body",
             "needs a CT channel (the body is found above -500 HU); set it to false")
    _validate_consistency(plans, path)


def _validate_consistency(plans: dict, path: Path) -> None:
    """Refuse hand edits that contradict what the planner derives from them (they would train
    something other than what plans.json says), naming the flag that makes the edit properly."""
    net, diff = plans["network"], plans["diffusion"]
    levels = net.get("levels")
    _require(isinstance(levels, list) and len(levels) > 0 and all(isinstance(lv, dict) for lv in levels), path,
             "network.levels", "need the planned list of levels; set the topology with --override "
             "network.max_levels=N / network.base_channels=C instead of editing levels")
    stride = [1, 1, 1]
    for lv in levels:
        _require(_is_list_of(lv.get("stride_from_previous"), int) and isinstance(lv.get("channels"), int), path,
                 "network.levels", "each level needs stride_from_previous (3 integers) and channels")
        stride = [s * k for s, k in zip(stride, lv["stride_from_previous"])]
    _require(stride == net.get("total_stride", stride), path, "network.total_stride",
             f"{net.get('total_stride')} is not the product of the levels' strides {stride}")
    if "base_channels" in net:
        _require(levels[0]["channels"] == net["base_channels"], path, "network.base_channels",
                 f"{net['base_channels']} but level 0 has {levels[0]['channels']} channels: change the width with "
                 "--override network.base_channels=C so the levels follow")
    achieved = diff.get("feature_noise", {}).get("achieved_std")
    if isinstance(achieved, list) and len(achieved) == len(diff["feature_timesteps"]):
        abar = sch.alphas_cumprod(**{k: diff[k] for k in ("schedule", "num_timesteps", "beta_start", "beta_end")})
        actual = [float(sch.noise_std(abar, int(t))) for t in diff["feature_timesteps"]]
        _require(all(abs(a - b) < 1e-4 for a, b in zip(actual, achieved)), path, "diffusion",
                 "the schedule or the feature timesteps were edited without re-deriving the noise levels "
                 f"(timesteps {diff['feature_timesteps']} give noise std {[round(v, 4) for v in actual]}, "
                 f"planned {achieved}); use --override diffusion.schedule=... or --t ... so they follow")
    training = plans.get("training")
    if training is not None:
        for stage in ("bpr", "diffusion", "probe"):
            block = training.get(stage) if isinstance(training, dict) else None
            _require(isinstance(block, dict), path, f"training.{stage}", "must be a JSON object")
            steps, lr = block.get("steps"), block.get("lr")
            _require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0, path,
                     f"training.{stage}.steps", f"need a non-negative integer, got {steps!r}")
            _require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, path,
                     f"training.{stage}.lr", f"need a positive number, got {lr!r}")


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
