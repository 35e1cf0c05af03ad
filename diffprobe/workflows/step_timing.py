"""Timing real training steps of a planned size class on a device (for compute-budget planning).

The BPR step, the diffusion step and the probe step (head step + its share of feature extraction)
are run a few times on random tensors of the planned shapes with the real networks, trainer and
data loaders; :mod:`diffprobe.workflows.budget` turns the seconds per step into step budgets.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffprobe.devices import loader_workers, usable_cores

WARMUP_STEPS = 2  # the second one is skipped when the first took longer than MAX_MEASURE_SECONDS
MEASURED_STEPS = 3  # at least (unless one step takes longer than MAX_MEASURE_SECONDS) ...
MIN_MEASURE_SECONDS = 1.0  # ... and more, up to MAX_MEASURED_STEPS, until this much was measured (fast steps
MAX_MEASURED_STEPS = 20  # vary most: a short burst of other load would decide 3 steps of 0.05 s)
MAX_MEASURE_SECONDS = 3.0  # per stage: stop measuring (after one timed step) once this much was spent

# The probe's pool and validation settings (diffprobe.workflows.train_probe's defaults); a value in
# plans["training"]["probe"] wins.
PROBE_POOL_DEFAULTS: dict[str, Any] = {"pool_patches": 64, "pool_refresh": 250, "validate_every": 100,
                                       "val_patches": 8, "batch_size": 2, "width": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[int], None], device: torch.device) -> float:
    """Median seconds of ``step(i)`` after ``WARMUP_STEPS`` untimed calls (fewer of both when a step is slow)."""
    warmup, measured, max_seconds = WARMUP_STEPS, MEASURED_STEPS, MAX_MEASURE_SECONDS
    done = 0
    for done in range(1, warmup + 1):
        t0 = time.perf_counter()
        step(done - 1)
        _sync(device)
        if time.perf_counter() - t0 > max_seconds:
            break
    warmup = done
    times: list[float] = []
    spent = 0.0
    while len(times) < max(measured, 1) or (spent < MIN_MEASURE_SECONDS and len(times) < MAX_MEASURED_STEPS):
        t0 = time.perf_counter()
        step(warmup + len(times))
        _sync(device)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > max_seconds:
            break
    return float(statistics.median(times))


def _trainer_step(trainer, loss_fn: Callable[[int], torch.Tensor]) -> Callable[[int], None]:
    """One optimizer step exactly as :meth:`diffprobe.training.trainer.Trainer.fit` takes it."""
    def step(i: int) -> None:
        with trainer._autocast():
            loss = loss_fn(i)
        trainer.apply_gradients(loss)
        float(loss.detach())  # the trainer reads the loss (finite check): a device sync, as in training
    return step


def _random_volume(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(tuple(shape), generator=generator) * 2 - 1).float()


def _bpr_training_crop(plans: dict, model) -> list[int]:
    """The crop pretraining trains the BPR on (the planned crop widened to the BPR's context)."""
    from diffprobe.pretraining.pretrain import bpr_crop

    median = plans.get("fingerprint_summary", {}).get("median_shape_at_target_spacing")
    return bpr_crop(plans["training"]["bpr"]["crop"], model.feature_stride, median)


def time_bpr(plans: dict, device: torch.device, tmp: str) -> float:
    """Seconds per BPR optimizer step: ``max(2, batch)`` crop pairs of the crop pretraining uses."""
    from diffprobe.bpr import BodyPartRegressor
    from diffprobe.pretraining.pretrain import _bpr_loss
    from diffprobe.training.trainer import Trainer, TrainerConfig

    torch.manual_seed(0)
    cfg = plans["training"]["bpr"]
    model = BodyPartRegressor(width=int(cfg["width"]))
    crop = _bpr_training_crop(plans, model)
    pairs = max(2, int(plans["batch_size"]))
    channels = int(plans["network"]["input_channels"])
    trainer = Trainer(model, None, TrainerConfig(total_steps=1000, lr=float(cfg["lr"]), warmup_steps=0), tmp,
                      device, name="bpr timing")
    g = torch.Generator().manual_seed(0)
    batch = {"a": _random_volume((pairs, channels, *crop), g), "b": _random_volume((pairs, channels, *crop), g),
             "offset_vox": torch.stack([torch.randint(-(c // 2), c // 2 + 1, (pairs,), generator=g) for c in crop],
                                       dim=1),
             "spacing": torch.tensor([plans["preprocessing"]["target_spacing"]] * pairs, dtype=torch.float32)}
    loss = lambda i: _bpr_loss(trainer.wrapped, batch, i, 0, model.total_stride)[0]  # noqa: E731
    return _time_steps(_trainer_step(trainer, loss), device)


def _denoiser(plans: dict):
    from diffprobe.planning.view import Plans
    from diffprobe.pretraining.pretrained_model import build_denoiser

    torch.manual_seed(0)
    return build_denoiser(Plans(plans), "bpr", "planned")


def _guided_batch(plans: dict, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    patch = [int(p) for p in plans["patch_size"]]
    channels = int(plans["network"]["input_channels"])
    guidance = int(plans["network"].get("guidance_channels", 3))
    return _random_volume((batch, channels, *patch), g), _random_volume((batch, guidance, *patch), g)


def time_diffusion(plans: dict, device: torch.device, tmp: str) -> float:
    """Seconds per denoiser optimizer step: ``batch`` patches, BPR guidance, EMA, channels_last as planned."""
    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.pretraining.pretrain import DiffusionLoss
    from diffprobe.training.trainer import Trainer, TrainerConfig

    train, cfg = plans["training"], plans["training"]["diffusion"]
    model = _denoiser(plans)
    diffusion = GaussianDiffusion.from_plans(plans)
    tcfg = TrainerConfig(total_steps=1000, lr=float(cfg["lr"]), warmup_steps=0, ema_decay=float(cfg["ema_decay"]),
                         compile=bool(train.get("compile", False)),
                         channels_last=bool(train.get("channels_last", False)),
                         cuda_graphs=bool(train.get("cuda_graphs", False)))
    diffusion_loss = DiffusionLoss(diffusion, 0, 0, tcfg.channels_last)
    trainer = Trainer(model, diffusion_loss, tcfg, tmp, device, name="diffusion timing")
    g = torch.Generator().manual_seed(0)
    x0, guidance = _guided_batch(plans, int(plans["batch_size"]), g)
    batch = {"image": x0, "guidance": guidance}
    loss = lambda i: diffusion_loss(trainer.wrapped, batch, i)[0]  # noqa: E731
    eager = _trainer_step(trainer, loss)

    def step(i: int) -> None:  # the graphed step where the plans ask for it (CUDA), as training takes it
        trainer.step = i
        if trainer.replayed_step(batch) is None:  # (its finite check syncs the device, as in training)
            eager(i)

    return _time_steps(step, device)


def probe_settings(plans: dict) -> dict[str, Any]:
    return {**PROBE_POOL_DEFAULTS, **{k: v for k, v in plans["training"].get("probe", {}).items()
                                      if k in PROBE_POOL_DEFAULTS}}


def extractions_per_step(plans: dict) -> float:
    """Feature-extraction batches per probe step: the pool refills plus the periodic patch validation."""
    cfg = probe_settings(plans)
    bs = int(cfg["batch_size"])
    pool = int(cfg["pool_patches"]) / bs / max(1, int(cfg["pool_refresh"]))
    val = int(cfg["val_patches"]) / bs / int(cfg["validate_every"]) if int(cfg["validate_every"]) > 0 else 0.0
    return pool + val


def time_probe(plans: dict, device: torch.device, tmp: str) -> dict[str, float]:
    """Seconds per probe step (frozen denoiser, feature pool): head step + amortised extraction."""
    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.probe.features import FeatureExtractor
    from diffprobe.probe.head import build_head
    from diffprobe.probe.losses import segmentation_loss
    from diffprobe.training.trainer import Trainer, TrainerConfig

    cfg = probe_settings(plans)
    bs = int(cfg["batch_size"])
    denoiser = _denoiser(plans).to(device).eval()
    extractor = FeatureExtractor(denoiser, GaussianDiffusion.from_plans(plans), plans["diffusion"]["feature_timesteps"])
    num_classes = max(int(v) for v in plans["labels"].values()) + 1
    torch.manual_seed(0)
    head = build_head("fpn", extractor.feature_channels, num_classes, int(cfg["width"]))
    g = torch.Generator().manual_seed(0)
    x0, guidance = _guided_batch(plans, bs, g)
    x0, guidance = x0.to(device), guidance.to(device)
    seeds = list(range(bs))
    feats: dict[str, torch.Tensor] = {}

    def extract(_: int) -> None:
        with torch.no_grad():
            out = extractor(x0, guidance, seeds)
        feats.update({k: v.to(torch.float16) for k, v in out.items()})  # the pool stores float16

    extract_s = _time_steps(extract, device)
    shape = tuple(int(p) for p in plans["patch_size"])
    seg = torch.randint(0, num_classes, (bs, *shape), generator=g).to(device)
    trainer = Trainer(head, None, TrainerConfig(total_steps=1000, lr=float(cfg.get("lr", 2e-2)), warmup_steps=0),
                      tmp, device, name="probe timing")
    loss = lambda i: segmentation_loss(trainer.wrapped({k: v.float() for k, v in feats.items()}, shape),  # noqa: E731
                                       seg)[0]
    head_s = _time_steps(_trainer_step(trainer, loss), device)
    per_step = extractions_per_step(plans)
    return {"step": head_s + per_step * extract_s, "head_step": head_s, "extract_batch": extract_s,
            "extractions_per_step": per_step}


def _synthetic_volume(plans: dict, folder: Path):
    """A random preprocessed case of the median planned shape with a BPR map, written like the real ones."""
    import numpy as np

    from diffprobe.preprocessing.storage import case_paths, save_array
    from diffprobe.preprocessing.volumes import VolumeRef

    patch = [int(p) for p in plans["patch_size"]]
    median = (plans.get("fingerprint_summary") or {}).get("median_shape_at_target_spacing") or patch
    shape = tuple(max(int(round(m)), p) for m, p in zip(median, patch))
    rng = np.random.default_rng(0)
    channels = int(plans["network"]["input_channels"])
    save_array(rng.uniform(-1, 1, (channels, *shape)).astype(np.float32), case_paths(folder, "timing")["data"], patch)
    guide = folder / "timing_bpr.b2nd"
    save_array(rng.uniform(-1, 1, (3, *shape)).astype(np.float16), guide, None)
    spacing = tuple(float(v) for v in plans["preprocessing"]["target_spacing"])
    return VolumeRef(folder, "timing", shape, spacing, guide)


def time_loaders(plans: dict, folder: Path) -> dict[str, float]:
    """CPU seconds the data loader spends per batch (the stages' own batch classes on a synthetic case).

    The diffusion batch (read + BPR-map crop + spatial augmentation: the image cubic, its 3 guidance
    channels linear) is not negligible next to a tiny denoiser step on a 2-core CPU (~24 vs ~110 ms),
    so it is part of the step time there.
    """
    from diffprobe.bpr import BodyPartRegressor
    from diffprobe.pretraining.data import PatchBatches
    from diffprobe.pretraining.pretrain import BprBatches

    ref = _synthetic_volume(plans, folder)
    batch = int(plans["batch_size"])
    patches = PatchBatches([ref], [int(p) for p in plans["patch_size"]], batch, "bpr", True, 0, 0)
    crop = _bpr_training_crop(plans, BodyPartRegressor(width=int(plans["training"]["bpr"]["width"])))
    pairs = BprBatches([ref], crop, max(2, batch), 0, 0)
    cpu = torch.device("cpu")
    return {"diffusion": _time_steps(patches.batch, cpu), "bpr": _time_steps(pairs.batch, cpu)}


def _load_average() -> float | None:
    """The 1-minute load average (Unix), recorded with the timings: other jobs slow the measured steps."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def with_loading(compute: float, loading: float, device: str, num_workers: int) -> float:
    """Step seconds with data loading: overlapped by the loader processes when they have cores of
    their own (a GPU run, or torch not using every core), otherwise added (a CPU run on all cores)."""
    free = usable_cores() - (0 if str(device).startswith("cuda") else torch.get_num_threads())
    if num_workers > 0 and free > 0:
        return max(compute, loading / min(num_workers, free))
    return compute + loading


def measure_step_seconds(plans: dict, device: str, max_diffusion_seconds: float | None = None) -> dict[str, Any]:
    """Seconds per optimizer step of each stage of these plans on ``device`` (real networks, random data),
    data loading included (:func:`with_loading`).

    Returns ``{"bpr": s, "diffusion": s, "probe": s, "parts": {stage: {...}}}`` (``parts``: the step,
    loader and probe components). The denoiser is timed first; when its step takes longer than
    ``max_diffusion_seconds`` (the candidate cannot fit) the other stages are not timed and are
    None. Tests replace this function (``monkeypatch.setattr(budget, "measure_step_seconds", fake)``).
    """
    dev = torch.device(device)
    workers = loader_workers(int(plans["training"].get("num_workers", 0)), device)
    with tempfile.TemporaryDirectory(prefix="diffprobe_budget_") as tmp:
        loading = time_loaders(plans, Path(tmp))
        diffusion = time_diffusion(plans, dev, tmp)
        diffusion_s = with_loading(diffusion, loading["diffusion"], device, workers)
        if max_diffusion_seconds is not None and diffusion_s > max_diffusion_seconds:
            return {"bpr": None, "diffusion": diffusion_s, "probe": None,
                    "parts": {"diffusion": {"step": diffusion, "loader": loading["diffusion"]}}}
        bpr = time_bpr(plans, dev, tmp)
        probe = time_probe(plans, dev, tmp)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"bpr": with_loading(bpr, loading["bpr"], device, workers), "diffusion": diffusion_s,
            "probe": probe["step"],
            "parts": {"bpr": {"step": bpr, "loader": loading["bpr"]},
                      "diffusion": {"step": diffusion, "loader": loading["diffusion"]},
                      "probe": {k: v for k, v in probe.items() if k != "step"}}}


