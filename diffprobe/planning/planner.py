"""Planner: dataset fingerprint -> plans (target spacing, patch, batch, network, diffusion).

Rules, each overridable (see :func:`plan`):
- **Target spacing**: nnU-Net's rule. Median spacing per axis; if the coarsest axis is
  more than 3x coarser than the others *and* the data have few voxels along it, use the
  10th percentile of that axis's spacings instead (so thick-slice outliers don't decide).
- **Patch size**: aim at the paper's 128x128x32 voxels (x, y, z), never larger than the
  median cropped case, divisible by the network's total per-axis stride, then shrunk
  (largest axis first) until the activation memory estimate fits the memory target.
- **Topology**: nnU-Net-style anisotropic downsampling: an axis is halved while its
  feature map is >= 8 voxels and its spacing is at most 2x the finest spacing.
  Channels double per level up to a cap.
- **Attention per level**: linear ("efficient") attention costs O(N C^2), softmax
  O(N^2 C) for N tokens and C channels; softmax is chosen where N <= C, linear otherwise.
- **Timesteps**: from target noise levels (:mod:`diffprobe.diffusion.schedule`).
"""

from __future__ import annotations

import math

import numpy as np

from diffprobe import __version__
from diffprobe.diffusion import schedule as sch
from diffprobe.fingerprint import AXIS_ORDER
from diffprobe.planning import size_classes

PLANS_VERSION = 2
ANISOTROPY_THRESHOLD = 3.0
DEFAULT_PATCH_ZYX = (32, 128, 128)  # the paper's 128x128x32 (x, y, z)
DEFAULT_MEMORY_TARGET_GB = 8.0
DEFAULT_CT_WINDOW = (-1350.0, 1000.0)  # vox2vec's window
MIN_FEATURE_SIZE = 4
MAX_LEVELS = 5
BASE_CHANNELS = 32
MAX_CHANNELS = 256
BLOCKS_PER_LEVEL = 2
MAX_BATCH = 8


def target_spacing(spacings: np.ndarray, shapes_after_crop: np.ndarray) -> list[float]:
    """nnU-Net's full-resolution target spacing rule (arrays are (case, axis) in z, y, x order)."""
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes_after_crop * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[others])
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(coarse, float(max(target[others])) + 1e-5)
    return [float(v) for v in target]


def topology(patch: list[int], spacing: list[float], max_levels: int = MAX_LEVELS,
             base_channels: int = BASE_CHANNELS, max_channels: int = MAX_CHANNELS) -> list[dict]:
    """Feature-map shape, stride, channels and attention kind of every level."""
    levels = []
    shape, sp = list(patch), list(spacing)
    for level in range(max_levels):
        channels = min(base_channels * 2**level, max_channels)
        if level == 0:
            stride = [1, 1, 1]
        else:
            finest = min(sp)
            stride = [2 if (shape[a] >= 2 * MIN_FEATURE_SIZE and sp[a] <= 2 * finest) else 1 for a in range(3)]
            if stride == [1, 1, 1]:
                break
            shape = [s // k for s, k in zip(shape, stride)]
            sp = [s * k for s, k in zip(sp, stride)]
        tokens = int(np.prod(shape))
        levels.append({
            "level": level,
            "stride_from_previous": stride,
            "feature_shape": shape,
            "spacing": [round(v, 5) for v in sp],
            "channels": channels,
            "tokens": tokens,
            "attention": "softmax" if tokens <= channels else "linear",
        })
    return levels


def total_stride(levels: list[dict]) -> list[int]:
    return [int(np.prod([lv["stride_from_previous"][a] for lv in levels])) for a in range(3)]


def estimate_memory_gb(levels: list[dict], blocks_per_level: int = BLOCKS_PER_LEVEL, heads: int = 4) -> float:
    """Rough training activation memory per sample (fp32 worst case), for relative decisions.

    Per level: encoder + decoder residual blocks keep ~8 tensors of N x C each; softmax
    attention additionally keeps an N x N matrix per head.
    """
    total = 0.0
    for lv in levels:
        n, c = lv["tokens"], lv["channels"]
        total += 2 * blocks_per_level * 8 * n * c * 4
        if lv["attention"] == "softmax":
            total += heads * n * n * 4
        else:
            total += 4 * n * c * 4
    return total / 1024**3


def _fit_patch(aim: list[int], cap: list[int], spacing: list[float], memory_gb: float,
               base_channels: int, max_channels: int, max_levels: int = MAX_LEVELS,
               blocks: int = BLOCKS_PER_LEVEL) -> tuple[list[int], list[dict]]:
    patch = [max(MIN_FEATURE_SIZE, min(a, c)) for a, c in zip(aim, cap)]
    for _ in range(200):
        levels = topology(patch, spacing, max_levels, base_channels, max_channels)
        stride = total_stride(levels)
        rounded = [max(k, (p // k) * k) for p, k in zip(patch, stride)]
        levels = topology(rounded, spacing, max_levels, base_channels, max_channels)
        if estimate_memory_gb(levels, blocks) <= memory_gb or max(rounded) <= MIN_FEATURE_SIZE:
            return rounded, levels
        # shrink the axis that is largest relative to the aim's aspect ratio
        rel = [p / a for p, a in zip(rounded, aim)]
        axis = int(np.argmax([r if p > k else -1 for r, p, k in zip(rel, rounded, stride)]))
        patch = rounded
        patch[axis] = max(stride[axis], rounded[axis] - stride[axis])
    return rounded, levels


def plan(fingerprint: dict, *, size_class: str = "paper", patch_size: list[int] | None = None,
         target_spacing_override: list[float] | None = None, batch_size: int | None = None,
         memory_target_gb: float = DEFAULT_MEMORY_TARGET_GB, schedule: str = "linear", num_timesteps: int = 1000,
         beta_start: float = 1e-4, beta_end: float = 0.02, noise_levels: list[float] | None = None,
         timesteps: list[int] | None = None, ct_window: tuple[float, float] | list[float] = DEFAULT_CT_WINDOW,
         base_channels: int | None = None, max_channels: int | None = None, max_levels: int | None = None,
         blocks_per_level: int | None = None, training: dict | None = None, budget: dict | None = None) -> dict:
    """Build the plans dict from a fingerprint. All shapes are (z, y, x).

    The keyword arguments are the planner's *inputs*; they are recorded under ``planner_inputs``
    so that a later flag or override re-plans from the same inputs with one of them changed,
    and every value derived from it (topology from patch, timesteps from schedule and window)
    follows. ``training`` deep-merges into the size class's step budgets (compute-budget planning
    passes its chosen step counts here; ``budget`` records how they were chosen).
    """
    inputs = {k: v for k, v in dict(
        size_class=size_class, patch_size=patch_size, target_spacing_override=target_spacing_override,
        batch_size=batch_size, memory_target_gb=memory_target_gb, schedule=schedule, num_timesteps=num_timesteps,
        beta_start=beta_start, beta_end=beta_end, noise_levels=noise_levels, timesteps=timesteps,
        ct_window=list(ct_window), base_channels=base_channels, max_channels=max_channels, max_levels=max_levels,
        blocks_per_level=blocks_per_level, training=training, budget=budget).items() if v is not None}
    cls = size_classes.size_class(size_class)
    base_channels = int(base_channels or cls["base_channels"])
    max_channels = int(max_channels or cls["max_channels"])
    max_levels = int(max_levels or cls["max_levels"])
    blocks = int(blocks_per_level or cls["blocks_per_level"])
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    after = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    spacing = [float(v) for v in target_spacing_override] if target_spacing_override else \
        [max(s, m) for s, m in zip(target_spacing(spacings, after), cls.get("min_spacing") or [0.0] * 3)]
    median_shape = np.median(after * spacings / np.asarray(spacing), axis=0)
    aim = list(patch_size) if patch_size else list(cls["patch_aim"])
    cap = aim if patch_size else [int(math.ceil(s)) for s in median_shape]
    patch, levels = _fit_patch(aim, cap, spacing, memory_target_gb, base_channels, max_channels, max_levels, blocks)
    if patch_size:
        levels = topology(patch_size, spacing, max_levels, base_channels, max_channels)
        patch = list(patch_size)
    mem = estimate_memory_gb(levels, blocks)
    memory_batch = int(max(1, min(MAX_BATCH, memory_target_gb // max(mem, 1e-9))))
    batch = int(batch_size or min(cls["batch_size"], memory_batch))
    normalization = {}
    for c, name in fingerprint["channel_names"].items():
        if name.strip().lower() == "ct":
            normalization[c] = {
                "scheme": "ct_window",
                "window_hu": [float(ct_window[0]), float(ct_window[1])],
                "output_range": [-1.0, 1.0],
                "why": "a fixed HU window keeps intensities bounded (diffusion assumes data in [-1, 1]) and "
                       "identical across datasets, so several datasets can be pretrained together",
            }
        else:
            normalization[c] = {"scheme": "zscore_per_image",
                                "why": "non-CT intensities have no absolute scale; per-image z-score"}
    train = _deep_merge(cls["training"], training or {})
    train["bpr"].update({"width": int(cls["bpr_width"]), "crop": list(patch)})
    train["budget"] = budget
    return {
        "plans_version": PLANS_VERSION,
        "diffprobe_version": __version__,
        "dataset": fingerprint["dataset"],
        "axis_order": AXIS_ORDER + ". Every shape, spacing and patch size in this file uses it.",
        "size_class": size_class,
        "planner_inputs": inputs,
        "fingerprint_summary": {
            "median_spacing": fingerprint["median_spacing"],
            "median_shape_at_target_spacing": [round(float(v), 1) for v in median_shape],
            "num_cases": fingerprint["num_cases"],
            "num_labelled": fingerprint["num_labelled"],
        },
        "preprocessing": {
            "target_spacing": spacing,
            "crop": "body (CT: largest component > -500 HU; otherwise non-zero voxels)",
            "resampling": {"image_order": 3, "label_order": 1, "order_z": 0,
                           "anisotropy_threshold": ANISOTROPY_THRESHOLD,
                           "note": "nnU-Net's resampling; separate-z (order_z along the coarse axis) "
                                   "when spacing anisotropy exceeds the threshold"},
            "normalization": normalization,
        },
        "patch_size": patch,
        "batch_size": batch,
        "memory": {"target_gb": memory_target_gb, "estimated_gb_per_sample": round(mem, 3)},
        "network": {
            "input_channels": len(fingerprint["channel_names"]),
            "guidance_channels": 3,
            "base_channels": base_channels,
            "max_channels": max_channels,
            "max_levels": max_levels,
            "blocks_per_level": blocks,
            "total_stride": total_stride(levels),
            "levels": levels,
        },
        "diffusion": plan_diffusion(normalization, schedule, num_timesteps, beta_start, beta_end,
                                    noise_levels, timesteps),
        "training": train,
        "postprocessing": {
            "outside_body": any(n["scheme"] == "ct_window" for n in normalization.values()),
            "why": "CT: voxels outside the body (the crop's body mask, in-plane holes filled) are background in "
                   "predicted label maps; organs lie inside the body, air and the table only carry false "
                   "positives. Per-class largest-component removal is decided by each fold's validation "
                   "(postprocessing.json), not here",
        },
        "labels": dict(fingerprint["labels"]),
        "channel_names": dict(fingerprint["channel_names"]),
    }


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def intensity_scale(normalization: dict) -> float:
    """Intensity units per normalised unit relative to the reference CT window (1 = reference)."""
    ct = [n for n in normalization.values() if n["scheme"] == "ct_window"]
    if not ct:
        return 1.0
    lo, hi = ct[0]["window_hu"]
    out_lo, out_hi = ct[0]["output_range"]
    hu_per_unit = (hi - lo) / (out_hi - out_lo)
    return hu_per_unit / sch.REFERENCE_HU_PER_UNIT


def plan_diffusion(normalization: dict, schedule: str = "linear", num_timesteps: int = 1000,
                   beta_start: float = 1e-4, beta_end: float = 0.02, noise_levels: list[float] | None = None,
                   timesteps: list[int] | None = None) -> dict:
    """Diffusion schedule and feature timesteps chosen by target noise level.

    ``noise_levels`` are noise stds in reference units (the paper's levels by default);
    they are rescaled to this plan's normalisation before picking timesteps, unless
    ``timesteps`` are given explicitly.
    """
    sched = sch.schedule_dict(schedule, num_timesteps, beta_start, beta_end)
    abar = sch.alphas_cumprod(**sched)
    ref_levels = list(noise_levels) if noise_levels else sch.reference_noise_levels()
    scale = intensity_scale(normalization)
    targets = [lv / scale for lv in ref_levels]
    if timesteps and not all(0 <= int(t) < num_timesteps for t in timesteps):
        from diffprobe.errors import DiffprobeError

        raise DiffprobeError(f"feature timesteps {list(timesteps)} must lie in [0, {num_timesteps - 1}]",
                             fix=f"choose timesteps below the schedule's {num_timesteps} steps")
    chosen = [int(t) for t in timesteps] if timesteps else sch.timesteps_for_noise(targets, abar)
    stds = [float(sch.noise_std(abar, t)) for t in chosen]
    if timesteps:  # the levels recorded are those of the timesteps actually used, so a re-plan keeps them
        ref_levels = [s * scale for s in stds]
        targets = stds
    return {
        **sched,
        "prediction": "epsilon",
        "feature_timesteps": chosen,
        "feature_noise": {
            "definition": "noise std sqrt(1 - alphas_cumprod[t]) in normalised intensity units; "
                          "targets are reference levels (paper: t=10,30,60 of the linear schedule with "
                          "the CT window [-1350, 1000] -> [-1, 1]) rescaled to this normalisation",
            "reference_levels": [round(v, 6) for v in ref_levels],
            "target_std": [round(v, 6) for v in targets],
            "achieved_std": [round(v, 6) for v in stds],
            "achieved_std_hu": [round(v * scale * sch.REFERENCE_HU_PER_UNIT, 1) for v in stds]
            if any(n["scheme"] == "ct_window" for n in normalization.values()) else None,
            "chosen_by": "explicit timesteps" if timesteps else "closest noise std to target",
        },
    }
