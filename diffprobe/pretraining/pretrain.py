"""``diffprobe pretrain``: BPR, then BPR-guided diffusion, into a named pretrained model.

Layout of ``<results root>/pretrained/<name>/``:
``model.json`` (datasets, preset, guidance, attention, the reference plans), ``bpr/`` and
``diffusion/`` (trainer outputs: checkpoints, log, loss curve), ``bpr_maps/<dataset>/<case>.b2nd``
(BPR coordinates of every training volume, (3, z, y, x) float16) and ``bpr_coordinates.png``.
The first dataset's plans are the reference (spacing, normalisation, diffusion schedule).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprobe import __version__, paths
from diffprobe.bpr import BodyPartRegressor, bpr_losses, collate_pairs, predict_coordinates, sample_crop_pair
from diffprobe.devices import resolve_device
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.models import DiffusionUNet
from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.preprocessing.storage import load_array, open_array, save_array
from diffprobe.pretraining import data as pdata
from diffprobe.pretraining.presets import resolve_preset
from diffprobe.training import distributed as dist_utils
from diffprobe.training.checkpoint import load_state_checked
from diffprobe.training.trainer import Trainer, TrainerConfig
from diffprobe.utils import read_json, write_json

STAGES = ("bpr", "diffusion", "all")
BPR_SCALE_PER_MM = 0.01  # anchored scale: 100 mm = 1 coordinate unit
MODEL_FORMAT = 1


@dataclass
class PretrainResult:
    model_dir: Path
    stages_run: list[str] = field(default_factory=list)
    histories: dict[str, list] = field(default_factory=dict)


def model_dir(name: str) -> Path:
    # a plain folder name only: "--name ../x" must not write (or read) outside results/pretrained
    return paths.results_root() / "pretrained" / paths.check_name(name)


def available_datasets() -> list[str]:
    root = paths.preprocessed_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / paths.SUBFOLDER / "plans.json").is_file())


def collect_volumes(datasets: list[str]) -> tuple[list[pdata.VolumeRef], dict, list[str]]:
    refs: list[pdata.VolumeRef] = []
    reference_plans: dict | None = None
    names = []
    for spec in datasets:
        data_dir, plans, ids = preprocessed_cases(spec)
        reference_plans = reference_plans or plans
        names.append(data_dir.parent.parent.name)
        refs.extend(pdata.volume_refs(data_dir, ids))
    assert reference_plans is not None
    return refs, reference_plans, names


# ---- BPR ------------------------------------------------------------------------------------
class BprBatches:
    """Crop pairs with known offsets, deterministic per step; reads only a region around each pair."""

    def __init__(self, volumes: list[pdata.VolumeRef], crop: list[int], batch_size: int, seed: int, rank: int):
        self.volumes, self.crop, self.batch_size, self.seed, self.rank = volumes, tuple(crop), batch_size, seed, rank

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = pdata.step_rng(self.seed, step, self.rank, stream=1)
        pairs, spacings = [], []
        for _ in range(self.batch_size):
            ref = self.volumes[int(rng.integers(len(self.volumes)))]
            region = tuple(int(c * 1.5) for c in self.crop)
            span = np.maximum(np.array(ref.shape) - np.array(region), 0)
            start = np.array([int(rng.integers(0, s + 1)) for s in span])
            vol = pdata.read_region(open_array(ref.data_path), start, region, fill=-1.0)
            pairs.append(sample_crop_pair(vol, self.crop, rng, noise_std=0.02))
            spacings.append(ref.spacing)
        out = collate_pairs(pairs)
        out["spacing"] = torch.tensor(spacings, dtype=torch.float32)
        out["step"] = step
        return out


def _bpr_loss(model, batch, step: int, seed: int, total_stride):
    a, b = batch["a"], batch["b"]
    device = next(model.parameters()).device
    out = model(torch.cat([a, b]).to(device))
    out_a, out_b = out[: a.shape[0]], out[a.shape[0]:]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    losses = bpr_losses(out_a.float(), out_b.float(), batch["offset_vox"].to(device), batch["spacing"].to(device),
                        total_stride, torch.tensor(BPR_SCALE_PER_MM), rng_generator=g)
    return losses["total"], {k: float(v.detach()) for k, v in losses.items() if k != "total"}


def train_bpr(volumes, cfg: dict, out: Path, device: torch.device, resume: bool, seed: int,
              show_progress: bool) -> tuple[BodyPartRegressor, list]:
    torch.manual_seed(seed)  # the initial weights: same seed, same model (a resumed run loads them instead)
    model = BodyPartRegressor(width=cfg["bpr_width"])
    crop = [max(k, (c // k) * k) for c, k in zip(cfg["bpr_crop"], model.total_stride)]
    tcfg = TrainerConfig(total_steps=cfg["bpr_steps"], lr=cfg["bpr_lr"], warmup_steps=cfg["warmup_steps"],
                         checkpoint_every=cfg["checkpoint_every"], seed=seed, samples_per_step=2 * cfg["batch_size"],
                         extra={"stage": "bpr", "width": cfg["bpr_width"], "crop": crop})
    trainer = Trainer(model, functools.partial(_bpr_loss, seed=seed, total_stride=model.total_stride), tcfg,
                      out / "bpr", device, name="bpr")
    if resume:
        trainer.resume()
    source = BprBatches(volumes, crop, max(2, cfg["batch_size"]), seed, dist_utils.rank())
    hist = trainer.fit(lambda start: pdata.loader(source, start, cfg["num_workers"]), show_progress)
    return model, hist


def with_bpr_maps(volumes: list[pdata.VolumeRef], out: Path) -> list[pdata.VolumeRef]:
    """The volumes with their BPR map paths: ``<model>/bpr_maps/<dataset>/<case>.b2nd``."""
    return [dataclasses.replace(v, guidance_path=out / "bpr_maps" / v.data_dir.parent.parent.name /
                                f"{v.identifier}.b2nd") for v in volumes]


def write_bpr_maps(model: BodyPartRegressor, volumes: list[pdata.VolumeRef], crop: list[int], out: Path,
                   device: torch.device) -> list[pdata.VolumeRef]:
    """Coordinates of every volume, computed once per volume (skipped when already written)."""
    model = model.to(device).eval()
    refs = with_bpr_maps(volumes, out)
    for ref in refs:
        if not ref.guidance_path.is_file():
            coords = predict_coordinates(model, load_array(ref.data_path), tuple(crop))
            save_array(coords.cpu().numpy().astype(np.float16), ref.guidance_path, None)
    return refs


# ---- diffusion -----------------------------------------------------------------------------
def _diffusion_loss(model, batch, step: int, diffusion: GaussianDiffusion, seed: int, rank: int,
                    channels_last: bool = False):
    device = next(model.parameters()).device
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x0 = batch["image"].to(device).contiguous(memory_format=fmt)
    guidance = batch["guidance"].to(device).contiguous(memory_format=fmt) if batch["guidance"] is not None else None
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)
    t = diffusion.sample_timesteps(x0.shape[0], g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    return diffusion.training_loss(model, x0, guidance, t, noise), {}


def build_denoiser(cfg: dict, plans: dict, guidance: str, attention: str) -> DiffusionUNet:
    return DiffusionUNet(plans["network"]["input_channels"], 0 if guidance == "none" else 3, cfg["levels"],
                         cfg["blocks_per_level"], attention)


def train_diffusion(volumes, cfg: dict, plans: dict, guidance: str, attention: str, out: Path,
                    device: torch.device, resume: bool, seed: int, show_progress: bool) -> tuple[DiffusionUNet, list]:
    torch.manual_seed(seed)  # the initial weights: same seed, same model, whether or not BPR ran in this process
    model = build_denoiser(cfg, plans, guidance, attention)
    diffusion = GaussianDiffusion.from_plans(plans)
    tcfg = TrainerConfig(total_steps=cfg["diffusion_steps"], lr=cfg["diffusion_lr"],
                         warmup_steps=cfg["warmup_steps"], ema_decay=cfg["ema_decay"],
                         checkpoint_every=cfg["checkpoint_every"], seed=seed, samples_per_step=cfg["batch_size"],
                         compile=cfg.get("compile", False), channels_last=cfg.get("channels_last", False),
                         extra={"stage": "diffusion", "guidance": guidance, "attention": attention})
    rank = dist_utils.rank()
    loss = functools.partial(_diffusion_loss, diffusion=diffusion, seed=seed, rank=rank,
                             channels_last=tcfg.channels_last)
    trainer = Trainer(model, loss, tcfg, out / "diffusion", device, name="diffusion")
    if resume:
        trainer.resume()
    source = pdata.PatchBatches(volumes, cfg["patch_size"], cfg["batch_size"], guidance, True, seed, rank)
    hist = trainer.fit(lambda start: pdata.loader(source, start, cfg["num_workers"]), show_progress)
    return model, hist


def pretrain(datasets: list[str] | None = None, name: str = "default", stage: str = "all", preset: str = "tiny",
             guidance: str = "bpr", attention: str = "planned", device: str = "auto", resume: bool = False,
             overrides: dict[str, Any] | None = None, seed: int = 0, show_progress: bool = True) -> PretrainResult:
    """Pretrain BPR and/or the diffusion model on the given preprocessed datasets (default: all)."""
    if stage not in STAGES:
        raise DiffprobeError(f"unknown stage '{stage}'", fix=f"use one of {', '.join(STAGES)}")
    if guidance not in pdata.GUIDANCE_MODES:
        raise DiffprobeError(f"unknown guidance '{guidance}'", fix=f"use one of {', '.join(pdata.GUIDANCE_MODES)}")
    datasets = list(datasets or available_datasets())
    if not datasets:
        raise DiffprobeError("no preprocessed dataset found", paths.preprocessed_root(),
                             "run `diffprobe plan_and_preprocess -d <id>` first")
    dev = dist_utils.init_from_env(resolve_device(device))
    volumes, plans, names = collect_volumes(datasets)
    cfg = resolve_preset(plans, preset, overrides)
    out = model_dir(name)
    meta_path = out / "model.json"
    if meta_path.is_file() and not resume:
        raise DiffprobeError(f"a pretrained model named '{name}' already exists", out,
                             "continue it with --c, or choose another --name")
    if meta_path.is_file():
        old = read_json(meta_path)
        if old["guidance"] != guidance or old["attention"] != attention or old["preset"]["preset"] != preset:
            raise DiffprobeError("--c must use the same --guidance, --attention and --preset as the original run",
                                 meta_path, f"rerun with --guidance {old['guidance']} --attention {old['attention']} "
                                 f"--preset {old['preset']['preset']}")
    meta = {"format": MODEL_FORMAT, "diffprobe_version": __version__, "name": name, "datasets": names,
            "guidance": guidance, "attention": attention, "preset": cfg, "seed": seed, "plans": plans}
    if dist_utils.is_main_process():
        write_json(meta_path, meta)
    result = PretrainResult(out)
    run_bpr = stage in ("bpr", "all") and guidance == "bpr"
    if run_bpr:
        bpr_model, result.histories["bpr"] = train_bpr(volumes, cfg, out, dev, resume, seed, show_progress)
        result.stages_run.append("bpr")
    if guidance == "bpr" and stage in ("diffusion", "all"):
        if not run_bpr:
            bpr_model = load_bpr(out, dev)
        crop = bpr_crop(out)
        if dist_utils.is_main_process():
            volumes = write_bpr_maps(bpr_model, volumes, crop, out, dev)
            from diffprobe.pretraining.plots import plot_bpr_coordinates

            plot_bpr_coordinates(volumes[0], out / "bpr_coordinates.png")
            _write_bpr_consistency(volumes, plans, out)
        dist_utils.barrier()
        volumes = with_bpr_maps(volumes, out)
    if stage in ("diffusion", "all"):
        _, result.histories["diffusion"] = train_diffusion(volumes, cfg, plans, guidance, attention, out, dev,
                                                           resume, seed, show_progress)
        result.stages_run.append("diffusion")
    return result


def _write_bpr_consistency(volumes: list[pdata.VolumeRef], plans: dict, out: Path) -> dict | None:
    """Organ-centroid spread in BPR vs array coordinates on the labelled training volumes."""
    from diffprobe.bpr.evaluate import organ_centroid_spread

    by_dir: dict[Path, list[pdata.VolumeRef]] = {}
    for v in volumes:
        by_dir.setdefault(v.data_dir, []).append(v)
    report = {}
    for data_dir, refs in by_dir.items():
        maps = {r.identifier: load_array(r.guidance_path) for r in refs}
        labels = read_json(data_dir.parent / "plans.json")["labels"]
        report[data_dir.parent.parent.name] = organ_centroid_spread(
            data_dir, [r.identifier for r in refs], maps, labels, BPR_SCALE_PER_MM)
    write_json(out / "bpr_consistency.json", report)
    return report


def _bpr_checkpoint(out: Path, device: torch.device | str = "cpu") -> dict:
    from diffprobe.training.checkpoint import load_checkpoint

    path = out / "bpr" / "checkpoint_final.pt"
    if not path.is_file():
        raise DiffprobeError("the BPR stage has not finished for this model", path,
                             "run `diffprobe pretrain --stage bpr` (or --stage all) first")
    return load_checkpoint(path, device)


def bpr_crop(out: Path) -> list[int]:
    """The crop the BPR was trained on (the preset's, rounded to its stride): its inference window."""
    return [int(c) for c in _bpr_checkpoint(out)["config"]["extra"]["crop"]]


def load_bpr(out: Path, device: torch.device | str = "cpu") -> BodyPartRegressor:
    ckpt = _bpr_checkpoint(out, device)
    model = BodyPartRegressor(width=int(ckpt["config"]["extra"]["width"]))
    load_state_checked(model, ckpt["model"], out / "bpr", "diffprobe pretrain")
    return model.to(device).eval()
