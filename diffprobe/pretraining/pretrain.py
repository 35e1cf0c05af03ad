"""``diffprobe pretrain``: BPR, then BPR-guided diffusion, into a named pretrained model.

Everything trained is built from the dataset's plans.json (network, patch, batch, schedule,
step budgets: see docs/plans.md); the flags given here (``--diffusion_steps`` ...) override
single training values for this run. The plans actually used are snapshotted into the
model's ``model.json``, so probing and prediction rebuild exactly the trained networks.
The folder layout is owned by :class:`~diffprobe.pretraining.pretrained_model.PretrainedModel`.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprobe import __version__, paths
from diffprobe.bpr import BodyPartRegressor, bpr_losses, collate_pairs, sample_crop_pair, sample_far_pair
from diffprobe.devices import loader_workers, resolve_device
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.guidance import GUIDANCE_MODES
from diffprobe.planning.compat import data_differences
from diffprobe.planning.view import Plans
from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.preprocessing.storage import open_array
from diffprobe.pretraining import data as pdata
from diffprobe.pretraining.bpr_maps import write_bpr_maps
from diffprobe.pretraining.bpr_report import write_bpr_reports
from diffprobe.pretraining.pretrained_model import MODEL_FORMAT, PretrainedModel, build_denoiser
from diffprobe.training import distributed as dist_utils
from diffprobe.training.trainer import Trainer, TrainerConfig
from diffprobe.utils import read_json, write_json

STAGES = ("bpr", "diffusion", "all")
BPR_SCALE_PER_MM = 0.01  # anchored scale: 100 mm = 1 coordinate unit
BPR_CONTEXT = (2, 4, 4)  # BPR crop = planned crop x this (z, y, x): whole axial slices of context
BPR_FAR_FRACTION = 0.5  # share of BPR crop pairs at independent places of a volume (docs/bpr.md)
BPR_NOISE_STD = 0.02  # Gaussian noise on crop b (normalised units, ~23 HU)
__all__ = ["MODEL_FORMAT", "PretrainResult", "pretrain", "model_dir", "available_datasets", "collect_volumes"]

# pretrain's flags -> the plans key they override (a path in plans.json)
RUN_OVERRIDES: dict[str, tuple[str, ...]] = {
    "diffusion_steps": ("training", "diffusion", "steps"), "diffusion_lr": ("training", "diffusion", "lr"),
    "bpr_steps": ("training", "bpr", "steps"), "bpr_lr": ("training", "bpr", "lr"),
    "batch_size": ("batch_size",), "num_workers": ("training", "num_workers"),
    "checkpoint_every": ("training", "checkpoint_every"), "compile": ("training", "compile"),
    "channels_last": ("training", "channels_last"), "warmup_steps": ("training", "diffusion", "warmup_steps"),
    "ema_decay": ("training", "diffusion", "ema_decay"), "cuda_graphs": ("training", "cuda_graphs"),
}


@dataclass
class PretrainResult:
    model_dir: Path
    stages_run: list[str] = field(default_factory=list)
    histories: dict[str, list] = field(default_factory=dict)


def model_dir(name: str) -> Path:
    """The folder of the pretrained model ``name`` (see PretrainedModel)."""
    return PretrainedModel(name).folder


def available_datasets() -> list[str]:
    root = paths.preprocessed_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / paths.SUBFOLDER / "plans.json").is_file())


def collect_volumes(datasets: list[str]) -> tuple[list[pdata.VolumeRef], dict, list[str]]:
    """Every preprocessed volume of the datasets, the first dataset's plans (the reference) and the names.

    Refuses datasets whose spacing, normalisation or channels differ from the first one: a
    model trained on both would see two intensity or size scales for the same anatomy.
    """
    refs: list[pdata.VolumeRef] = []
    reference_plans: dict | None = None
    names = []
    for spec in datasets:
        data_dir, plans, ids = preprocessed_cases(spec)
        name = data_dir.parent.parent.name
        if reference_plans is not None:
            diffs = data_differences(reference_plans, plans)
            if diffs:
                raise DiffprobeError(f"{name} cannot be pretrained together with {names[0]}: " + "; ".join(diffs),
                                     data_dir.parent / "plans.json",
                                     f"plan both alike, e.g. `diffprobe plan_and_preprocess -d {name} --target_spacing "
                                     f"{' '.join(str(v) for v in reference_plans['preprocessing']['target_spacing'])}"
                                     "`, or pretrain them separately")
        reference_plans = reference_plans or plans
        names.append(name)
        refs.extend(pdata.volume_refs(data_dir, ids))
    assert reference_plans is not None
    return refs, reference_plans, names


def run_plans(plans: dict, overrides: dict[str, Any] | None) -> dict:
    """The plans this run trains with: the dataset's, with the run's flags applied to their keys."""
    out = copy.deepcopy(plans)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in RUN_OVERRIDES:
            raise DiffprobeError(f"unknown pretraining override '{key}'", fix=f"use one of {', '.join(RUN_OVERRIDES)}"
                                 "; network and patch are planned: `diffprobe plan_and_preprocess --override ...`")
        node = out
        *parents, last = RUN_OVERRIDES[key]
        for k in parents:
            node = node[k]
        node[last] = value
    return out


# ---- BPR ------------------------------------------------------------------------------------
class BprBatches:
    """Crop pairs with known offsets, deterministic per step; reads only the crops' regions.

    A ``far_fraction`` of the pairs are two crops at independent places of one volume (long-range
    order and distance: the coordinate must be right across the whole scan); the others overlap
    (``sample_crop_pair``: consistency of the same voxels seen in two contexts).
    """

    def __init__(self, volumes: list[pdata.VolumeRef], crop: list[int], batch_size: int, seed: int, rank: int,
                 far_fraction: float | None = None, noise_std: float | None = None):
        self.volumes, self.crop, self.batch_size, self.seed, self.rank = volumes, tuple(crop), batch_size, seed, rank
        self.far_fraction = BPR_FAR_FRACTION if far_fraction is None else float(far_fraction)
        self.noise_std = BPR_NOISE_STD if noise_std is None else float(noise_std)
        # long scans hold more distinct levels: volumes are drawn by their length along z plus one crop
        lengths = np.array([v.shape[0] + self.crop[0] for v in volumes], float)
        self.weights = lengths / lengths.sum()

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = pdata.step_rng(self.seed, step, self.rank, stream=1)
        pairs, spacings = [], []
        for i in range(self.batch_size):
            ref = self.volumes[int(rng.choice(len(self.volumes), p=self.weights))]
            arr = open_array(ref.data_path)
            # deterministic split (not a coin per pair): every batch holds both kinds
            if i < round(self.far_fraction * self.batch_size):
                pairs.append(sample_far_pair(functools.partial(_read_crop, arr), tuple(ref.shape), self.crop, rng,
                                             noise_std=self.noise_std))
            else:
                region = tuple(int(c * 1.5) for c in self.crop)
                span = np.maximum(np.array(ref.shape) - np.array(region), 0)
                start = np.array([int(rng.integers(0, s + 1)) for s in span])
                vol = pdata.read_region(arr, start, region, fill=-1.0)
                pairs.append(sample_crop_pair(vol, self.crop, rng, noise_std=self.noise_std))
            spacings.append(ref.spacing)
        out = collate_pairs(pairs)
        out["spacing"] = torch.tensor(spacings, dtype=torch.float32)
        out["step"] = step
        return out


def _read_crop(arr, start, size) -> np.ndarray:
    return pdata.read_region(arr, start, size, fill=-1.0)


def bpr_crop(planned: list[int], feature_stride: tuple[int, int, int],
             median_shape: list[float] | None = None) -> list[int]:
    """The BPR's training crop and inference window: the planned crop (``training.bpr.crop``) times
    :data:`BPR_CONTEXT`, but no larger than the median volume (``median_shape``, rounded up), in
    multiples of the BPR's ``feature_stride`` (its input is average-pooled, so the convolutions
    cost what the planned crop at full resolution would)."""
    out = []
    for a, (c, f, k) in enumerate(zip(planned, BPR_CONTEXT, feature_stride, strict=True)):
        n = c * f
        if median_shape is not None:
            n = min(n, math.ceil(median_shape[a] / k) * k)
        out.append(max(k, int(round(n / k)) * k))
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


def train_bpr(volumes, plans: Plans, out: Path, device: torch.device, resume: bool, seed: int,
              show_progress: bool) -> tuple[BodyPartRegressor, list]:
    """Train the BPR as planned (``training.bpr``: steps, lr, width, crop)."""
    torch.manual_seed(seed)  # the initial weights: same seed, same model (a resumed run loads them instead)
    cfg, train = plans.stage("bpr"), plans.training
    spacing = [float(v) for v in plans.raw["preprocessing"]["target_spacing"]]
    model = BodyPartRegressor(width=int(cfg["width"]), units_per_voxel=[BPR_SCALE_PER_MM * v for v in spacing])
    crop = bpr_crop(cfg["crop"], model.feature_stride, np.median([v.shape for v in volumes], axis=0).tolist())
    warmup = cfg.get("warmup_steps", train["diffusion"]["warmup_steps"])
    tcfg = TrainerConfig(total_steps=int(cfg["steps"]), lr=float(cfg["lr"]), warmup_steps=int(warmup),
                         checkpoint_every=int(train["checkpoint_every"]), seed=seed,
                         samples_per_step=2 * max(2, plans.batch_size),
                         extra={"stage": "bpr", "width": int(cfg["width"]), "crop": crop})
    trainer = Trainer(model, functools.partial(_bpr_loss, seed=seed, total_stride=model.total_stride), tcfg,
                      out / "bpr", device, name="bpr")
    if resume:
        trainer.resume()
    source = BprBatches(volumes, crop, max(2, plans.batch_size), seed, dist_utils.rank())
    hist = trainer.fit(lambda start: pdata.loader(source, start, int(train["num_workers"])), show_progress)
    return model, hist


# ---- diffusion -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionLoss:
    """The ε-MSE loss of a diffusion step, in the two parts a captured step needs
    (``training.graphed_step.SplitLoss``): ``inputs`` (host: the batch to the device, t and noise from a
    generator seeded by (seed, step, rank)) and ``body`` (device only: q_sample, denoiser, MSE)."""

    diffusion: GaussianDiffusion
    seed: int
    rank: int
    channels_last: bool = False

    def inputs(self, batch, step: int, device: torch.device) -> dict[str, torch.Tensor | None]:
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        x0 = batch["image"].to(device).contiguous(memory_format=fmt)
        guide = batch["guidance"]
        guidance = guide.to(device).contiguous(memory_format=fmt) if guide is not None else None
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 64 + self.rank)
        t = self.diffusion.sample_timesteps(x0.shape[0], g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        return {"x0": x0, "guidance": guidance, "t": t, "noise": noise}

    def body(self, model, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        return self.diffusion.training_loss(model, inputs["x0"], inputs["guidance"], inputs["t"], inputs["noise"])

    def __call__(self, model, batch, step: int):
        device = next(model.parameters()).device
        return self.body(model, self.inputs(batch, step, device)), {}


def train_diffusion(volumes, plans: Plans, guidance: str, attention: str, out: Path,
                    device: torch.device, resume: bool, seed: int, show_progress: bool) -> tuple[torch.nn.Module, list]:
    """Train the denoiser as planned (network, patch, batch, schedule, ``training.diffusion``)."""
    torch.manual_seed(seed)  # the initial weights: same seed, same model, whether or not BPR ran in this process
    model = build_denoiser(plans, guidance, attention)
    diffusion = GaussianDiffusion.from_plans(plans.raw)
    cfg, train = plans.stage("diffusion"), plans.training
    tcfg = TrainerConfig(total_steps=int(cfg["steps"]), lr=float(cfg["lr"]), warmup_steps=int(cfg["warmup_steps"]),
                         ema_decay=float(cfg["ema_decay"]), checkpoint_every=int(train["checkpoint_every"]), seed=seed,
                         samples_per_step=plans.batch_size, compile=bool(train.get("compile", False)),
                         channels_last=bool(train.get("channels_last", False)),
                         cuda_graphs=bool(train.get("cuda_graphs", False)),
                         extra={"stage": "diffusion", "guidance": guidance, "attention": attention})
    rank = dist_utils.rank()
    loss = DiffusionLoss(diffusion, seed, rank, tcfg.channels_last)
    trainer = Trainer(model, loss, tcfg, out / "diffusion", device, name="diffusion")
    if resume:
        trainer.resume()
    source = pdata.PatchBatches(volumes, plans.patch_size, plans.batch_size, guidance, True, seed, rank)
    hist = trainer.fit(lambda start: pdata.loader(source, start, int(train["num_workers"])), show_progress)
    return model, hist


def _check_resume(old: dict, meta: dict, meta_path: Path) -> None:
    """--c must continue the same model: same guidance, attention, network and schedule."""
    if old.get("format") != MODEL_FORMAT:
        raise DiffprobeError(f"pretrained model format {old.get('format')!r} cannot be continued by this version",
                             meta_path, "pretrain under a new --name")
    if old["guidance"] != meta["guidance"] or old["attention"] != meta["attention"]:
        raise DiffprobeError("--c must use the same --guidance and --attention as the original run", meta_path,
                             f"rerun with --guidance {old['guidance']} --attention {old['attention']}")
    changed = [k for k in ("network", "patch_size", "diffusion", "preprocessing")
               if old["plans"].get(k) != meta["plans"].get(k)]
    if changed:
        raise DiffprobeError(f"the dataset was re-planned since this model was started ({', '.join(changed)} "
                             "changed)", meta_path, "pretrain under a new --name, or restore the plans the model "
                             "was trained with (its model.json holds them)")


def pretrain(datasets: list[str] | None = None, name: str = "default", stage: str = "all",
             guidance: str = "bpr", attention: str = "planned", device: str = "auto", resume: bool = False,
             overrides: dict[str, Any] | None = None, seed: int = 0, show_progress: bool = True) -> PretrainResult:
    """Pretrain BPR and/or the diffusion model on the given preprocessed datasets (default: all).

    The networks, patch, batch and step budgets come from the first dataset's plans.json;
    ``overrides`` (keys of :data:`RUN_OVERRIDES`) change single training values for this run.
    """
    if stage not in STAGES:
        raise DiffprobeError(f"unknown stage '{stage}'", fix=f"use one of {', '.join(STAGES)}")
    if guidance not in GUIDANCE_MODES:
        raise DiffprobeError(f"unknown guidance '{guidance}'", fix=f"use one of {', '.join(GUIDANCE_MODES)}")
    model = PretrainedModel(name)
    datasets = list(datasets or available_datasets())
    if not datasets:
        raise DiffprobeError("no preprocessed dataset found", paths.preprocessed_root(),
                             "run `diffprobe plan_and_preprocess -d <id>` first")
    dev = dist_utils.init_from_env(resolve_device(device))
    exists = dist_utils.main_process_value(model.exists)  # rank 0's view, before it writes model.json below
    with dist_utils.together("pretrain: reading the datasets and the model"):  # a setup error stops all ranks
        volumes, dataset_plans, names = collect_volumes(datasets)
        planned = run_plans(dataset_plans, overrides)
        if (overrides or {}).get("num_workers") is None:  # the machine's loader processes (a GPU's cores are idle)
            planned["training"]["num_workers"] = loader_workers(int(planned["training"].get("num_workers", 0)), dev)
        plans = Plans(planned)
        out = model.folder
        if exists and not resume:
            raise DiffprobeError(f"a pretrained model named '{name}' already exists", out,
                                 "continue it with --c, or choose another --name")
        meta = {"format": MODEL_FORMAT, "diffprobe_version": __version__, "name": name, "datasets": names,
                "guidance": guidance, "attention": attention, "seed": seed, "plans": plans.raw}
        if exists:
            _check_resume(read_json(model.meta_path), meta, model.meta_path)
        if dist_utils.is_main_process():
            write_json(model.meta_path, meta)
    result = PretrainResult(out)
    run_bpr = stage in ("bpr", "all") and guidance == "bpr"
    if run_bpr:
        _, result.histories["bpr"] = train_bpr(volumes, plans, out, dev, resume, seed, show_progress)
        result.stages_run.append("bpr")
    if guidance == "bpr" and stage in ("diffusion", "all"):
        bpr_model, crop = model.load_bpr(dev)
        volumes = write_bpr_maps(bpr_model, volumes, crop, out, dev)  # under DDP: each rank its share
        write_bpr_reports(volumes, out, BPR_SCALE_PER_MM, dev)
    if stage in ("diffusion", "all"):
        _, result.histories["diffusion"] = train_diffusion(volumes, plans, guidance, attention, out, dev,
                                                           resume, seed, show_progress)
        result.stages_run.append("diffusion")
    return result


def _write_bpr_consistency(volumes: list[pdata.VolumeRef], out: Path) -> dict | None:
    """The BPR reports of ``out`` (``bpr_report.write_bpr_reports``; kept for benchmarks/bench_bpr.py)."""
    return write_bpr_reports(volumes, out, BPR_SCALE_PER_MM)
