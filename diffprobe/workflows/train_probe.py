"""``diffprobe train``: fit a probing head on the frozen denoiser's features for one fold.

Reads the dataset's plans (labels, feature timesteps), the pretrained model (denoiser, BPR,
patch size) and the fold's cases; trains with the shared Trainer (AdamW, warm-up + cosine,
checkpoints, exact resume with ``--c``); reports a pseudo-Dice on fixed foreground-centred
validation patches while training and, at the end, the Dice of full sliding-window
predictions of the validation cases (``validation/summary.json``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffprobe import __version__
from diffprobe.devices import resolve_device
from diffprobe.errors import DiffprobeError
from diffprobe.planning.compat import model_timesteps
from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.preprocessing.storage import case_paths
from diffprobe.pretraining import data as pdata
from diffprobe.pretraining.bpr_maps import write_bpr_maps
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.probe.augment import IntensityAugment, SpatialAugment
from diffprobe.probe.data import THIN_PADDINGS, LabelledPatches, labelled_volumes
from diffprobe.probe.feature_pool import FeaturePool, feature_bytes_per_patch, pool_size_for_budget
from diffprobe.probe.head import HEADS
from diffprobe.probe.losses import dice_per_class, segmentation_loss
from diffprobe.probe.model import (
    EXTRACTORS,
    INITS,
    PROBE_FORMAT,
    ProbeFolder,
    ProbeModel,
    build_probe,
    configuration_name,
    probe_dir,
)
from diffprobe.probe.splits import fold_cases, parse_fold
from diffprobe.training import distributed as dist_utils
from diffprobe.training.trainer import Trainer, TrainerConfig
from diffprobe.utils import read_json, write_json

# what plans.json does not plan (its training.probe block gives steps, lr, width and batch size)
PROBE_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "batch_size": 2, "lr": 2e-2, "finetune_lr": 1e-4, "width": 32, "warmup_steps": 20,
    "checkpoint_every": 100, "validate_every": 100, "val_patches": 8, "oversample_foreground": 0.5,
    "levels": None, "pool_patches": 64, "pool_refresh": 250, "pool_gb": 4.0, "guidance_shift": 0.0,
    "augment": 0.0, "intensity_augment": 0.0, "thin_padding": "mirror", "with_input": False,
}
PLANNED_KEYS = ("steps", "lr", "width", "batch_size")


@dataclass
class ProbeTrainResult:
    folder: Path
    history: list = field(default_factory=list)
    validation: dict | None = None


def probe_config(overrides: dict[str, Any] | None, plans: dict | None = None) -> dict[str, Any]:
    """The probe's settings: defaults, then the dataset's planned budget, then the run's overrides."""
    cfg = dict(PROBE_DEFAULTS)
    planned = (plans or {}).get("training", {}).get("probe", {})
    cfg.update({k: planned[k] for k in PLANNED_KEYS if k in planned})
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise DiffprobeError(f"unknown probe setting '{key}'", fix=f"use one of {', '.join(cfg)}")
        if value is not None:
            cfg[key] = value
    if cfg["thin_padding"] not in THIN_PADDINGS:
        raise DiffprobeError(f"probe setting thin_padding={cfg['thin_padding']!r} is not one of "
                             f"{', '.join(THIN_PADDINGS)}", fix="use --override thin_padding=mirror (default) or air")
    return cfg


def dataset_volumes(dataset: str | int, pretrained: PretrainedModel, device: torch.device | str
                    ) -> tuple[list[pdata.VolumeRef], dict, Path]:
    """The dataset's preprocessed volumes, with BPR maps from the pretrained BPR when it guides."""
    data_dir, plans, ids = preprocessed_cases(dataset)
    refs = pdata.volume_refs(data_dir, ids)
    if pretrained.guidance == "bpr":
        bpr, crop = pretrained.load_bpr(device)
        refs = write_bpr_maps(bpr, refs, crop, pretrained.folder, device)
    return refs, plans, data_dir


def labelled_ids(data_dir: Path, ids: list[str]) -> list[str]:
    return [i for i in ids if read_json(case_paths(data_dir, i)["properties"]).get("labelled")]


def fold_split(dataset: str | int, fold: str) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of ``fold`` (``all`` or one of the dataset's splits).

    Why its own step: it needs only the preprocessed case list, so a fold that does not exist
    (``-f -1``, ``-f 7`` of 5 folds) is refused before a denoiser or BPR map is loaded.
    """
    data_dir, _, ids = preprocessed_cases(dataset)
    return fold_cases(data_dir.parent, labelled_ids(data_dir, ids), fold)


def _loss(model, batch, step: int, probe: ProbeModel, frozen: bool):
    device = next(probe.head.parameters()).device
    if "features" in batch:  # from the feature pool: features already extracted
        return segmentation_loss(model(batch["features"], batch["shape"]), batch["seg"].to(device))
    x0 = batch["image"].to(device)
    guidance = batch["guidance"].to(device) if batch["guidance"] is not None else None
    if frozen:
        with torch.no_grad():
            feats = probe.extractor(x0, guidance, batch["seeds"])
        logits = model(feats, tuple(x0.shape[2:]))
    else:
        logits = model(x0, guidance, batch["seeds"])
    return segmentation_loss(logits, batch["seg"].to(device))


class PatchValidation:
    """Pseudo-Dice per class on fixed foreground-centred patches of the validation cases."""

    def __init__(self, probe: ProbeModel, patches: LabelledPatches, labels: dict[str, int], chunk: int):
        self.probe, self.batch, self.chunk = probe, patches.batch(0), chunk
        self.names = {v: k for k, v in labels.items()}
        self.num_classes = max(labels.values()) + 1

    def __call__(self, _model) -> dict[str, float]:
        device = next(self.probe.head.parameters()).device
        preds = []
        b = self.batch
        for i in range(0, b["image"].shape[0], self.chunk):
            g = b["guidance"][i:i + self.chunk].to(device) if b["guidance"] is not None else None
            logits = self.probe(b["image"][i:i + self.chunk].to(device), g, b["seeds"][i:i + self.chunk])
            preds.append(logits.argmax(1).cpu())
        dice = dice_per_class(torch.cat(preds), b["seg"], self.num_classes)
        out = {f"val_dice_{self.names.get(c + 1, c + 1)}": d for c, d in enumerate(dice)}
        valid = [d for d in dice if d == d]
        out["val_dice_mean"] = sum(valid) / len(valid) if valid else float("nan")
        return out


def _feature_pool(probe: ProbeModel, source: LabelledPatches, cfg: dict, seed: int,
                  device: torch.device) -> FeaturePool | None:
    """The frozen probe's feature pool over the training patches, or None (extract per step) when
    pooling is off or nothing fits. The pool fills itself from ``source``'s batches, so it sees
    the same patches (and oversampling) per-step extraction would."""
    per_patch = feature_bytes_per_patch(probe.extractor, source.patch)
    useful = cfg["batch_size"] * min(int(cfg["steps"]), int(cfg["pool_refresh"]))  # more would never be drawn
    wanted = min(int(cfg["pool_patches"]), useful)
    size = pool_size_for_budget(wanted, cfg["batch_size"], per_patch, float(cfg["pool_gb"]))
    if size < cfg["batch_size"]:
        return None
    return FeaturePool(probe.extractor, source, size, cfg["batch_size"], int(cfg["pool_refresh"]), seed, device)


def train_probe(dataset: str | int, fold: str = "0", pretrained: str = "default", head: str = "fpn",
                finetune: bool = False, device: str = "auto", resume: bool = False,
                overrides: dict[str, Any] | None = None, timesteps: list[int] | None = None,
                seed: int = 0, show_progress: bool = True, final_validation: bool = True,
                configuration: str | None = None, extractor: str = "denoiser", init: str = "pretrained",
                train_cases: list[str] | None = None, head_init: Path | None = None) -> ProbeTrainResult:
    """Train one fold's probe; returns its folder, training history and validation summary.

    The controls of ``diffprobe ablate controls`` (defaults: the method itself):
    ``extractor="input"`` trains the head on the input pooled to the denoiser's scales (no
    denoiser features); ``init="scratch"`` trains the denoiser's architecture from a standard
    random initialisation end to end (implies ``finetune``); ``train_cases`` restricts the
    fold's training cases to a subset (label-efficiency sweep). All three go to probe.json.
    ``head_init`` (with ``finetune``) starts the head from a finished frozen probe's folder
    instead of a fresh head (:mod:`diffprobe.probe.warm_start`); probe.json names it.
    """
    if head not in HEADS:
        raise DiffprobeError(f"unknown head '{head}'", fix=f"use one of {', '.join(HEADS)}")
    if extractor not in EXTRACTORS or init not in INITS or (extractor == "input" and (init != "pretrained"
                                                                                      or finetune)):
        raise ValueError(f"extractor {extractor!r} / init {init!r} / finetune {finetune}: use extractor one of "
                         f"{EXTRACTORS}, init one of {INITS}; the input extractor has nothing to train or init")
    finetune = finetune or init == "scratch"  # a network from random weights must be trained
    if head_init is not None and (not finetune or init == "scratch"):
        raise ValueError("head_init starts a fine-tune of the pretrained denoiser: use it with finetune=True")
    model = PretrainedModel(pretrained)
    pmeta = model.meta
    # refused up front, not as a ValueError of the feature extractor or after the BPR maps: --t, then -f
    model.check_timesteps(timesteps)
    train_ids, val_ids = fold_split(dataset, fold)
    fold = parse_fold(fold)  # as folder names write it: "01" trains fold_1
    dev = dist_utils.init_from_env(resolve_device(device))
    if init == "scratch":
        from diffprobe.pretraining.baseline import standard_init_denoiser

        denoiser = standard_init_denoiser(model, seed).to(dev)
    else:
        denoiser = model.load_denoiser(dev)
    refs, plans, data_dir = dataset_volumes(dataset, model, dev)
    cfg = probe_config(overrides, plans)
    if train_cases is not None:
        unknown = sorted(set(train_cases) - set(train_ids))
        if unknown or not train_cases:
            raise DiffprobeError(f"train_cases must be a non-empty subset of fold {fold}'s training cases "
                                 f"(not in it: {', '.join(unknown[:5]) or 'none given'})", data_dir.parent,
                                 "choose cases from the fold's training cases (splits_final.json)")
        train_ids = [i for i in train_ids if i in set(train_cases)]
    dataset_timesteps = [int(t) for t in (timesteps or plans["diffusion"]["feature_timesteps"])]
    # the dataset plans its timesteps under its schedule; the denoiser knows its own: map by noise level
    timesteps = model_timesteps(plans, pmeta["plans"], dataset_timesteps, pretrained, data_dir.parent / "plans.json")
    labels = plans["labels"]
    num_classes = max(labels.values()) + 1
    patch = model.plans.patch_size
    torch.manual_seed(seed)  # the head's initialisation: same seed, same probe
    probe = build_probe(denoiser, pmeta, timesteps, cfg["levels"], head, num_classes, cfg["width"], finetune,
                        extractor, bool(cfg["with_input"]))
    probe = probe.to(dev)

    default_name = configuration_name(pretrained, head, finetune, bool(cfg["with_input"]))
    folder = probe_dir(dataset, configuration or default_name, str(fold))
    meta = {"format": PROBE_FORMAT, "diffprobe_version": __version__, "dataset": data_dir.parent.parent.name,
            "fold": str(fold), "pretrained": pretrained, "pretrained_checksum": model.checksum(),
            "guidance": pmeta["guidance"], "head": head, "finetune": finetune, "timesteps": timesteps,
            "dataset_timesteps": dataset_timesteps, "extractor": extractor, "init": init,
            "levels": probe.extractor.levels, "patch_size": patch, "num_classes": num_classes, "labels": labels,
            "train_cases": train_ids, "val_cases": val_ids, "config": cfg, "seed": seed, "plans": plans,
            "head_init": None if head_init is None else ProbeFolder(head_init).configuration}
    meta_path = folder / "probe.json"
    # rank 0 decides whether the probe exists: another rank could see the probe.json rank 0 writes below
    existed = dist_utils.main_process_value(meta_path.is_file())
    if existed and not resume:
        raise DiffprobeError("this probe was already trained", folder, "continue it with --c or delete the folder")
    if existed:
        old = read_json(meta_path)
        keys = ("pretrained_checksum", "timesteps", "head", "finetune", "patch_size", "extractor", "init",
                "head_init")
        defaults = {"extractor": "denoiser", "init": "pretrained"}  # probe.json written before these keys
        changed = [k for k in keys if old.get(k, defaults.get(k)) != meta[k]]
        if bool(old["config"].get("with_input", False)) != bool(cfg["with_input"]):  # another head input width
            changed.append("with_input")
        if changed:
            raise DiffprobeError(f"--c with different {', '.join(changed)} than the original run", meta_path,
                                 "use the original settings, or train into a fresh folder")
    if head_init is not None:  # before resume, which then loads the run's own later weights over it
        from diffprobe.probe.warm_start import warm_start_head

        warm_start_head(probe, Path(head_init), meta, dev)
    if dist_utils.is_main_process():
        write_json(meta_path, meta)

    by_id = {r.identifier: r for r in refs}
    train_vols = labelled_volumes([by_id[i] for i in train_ids])
    val_vols = labelled_volumes([by_id[i] for i in val_ids])
    rank = dist_utils.rank()
    source = LabelledPatches(train_vols, patch, cfg["batch_size"], pmeta["guidance"], cfg["oversample_foreground"],
                             seed, rank, guidance_shift=cfg["guidance_shift"],
                             augment=SpatialAugment(p=float(cfg["augment"])), thin_padding=str(cfg["thin_padding"]),
                             intensity=IntensityAugment.for_normalization(
                                 float(cfg["intensity_augment"]), plans["preprocessing"]["normalization"]["0"]))
    validation = PatchValidation(probe, LabelledPatches(val_vols, patch, cfg["val_patches"], pmeta["guidance"], 1.0,
                                                        seed + 1, thin_padding=str(cfg["thin_padding"])),
                                 labels, cfg["batch_size"])
    tcfg = TrainerConfig(total_steps=cfg["steps"], lr=cfg["finetune_lr"] if finetune else cfg["lr"],
                         warmup_steps=cfg["warmup_steps"], checkpoint_every=cfg["checkpoint_every"], seed=seed,
                         samples_per_step=cfg["batch_size"], validate_every=cfg["validate_every"],
                         extra={"stage": "probe", "head": head, "finetune": finetune})
    trainer = Trainer(probe if finetune else probe.head, functools.partial(_loss, probe=probe, frozen=not finetune),
                      tcfg, folder, dev, name=f"probe fold {fold}", validate=validation)
    if resume:
        trainer.resume()
    pool = _feature_pool(probe, source, cfg, seed, dev) if not finetune else None
    history = trainer.fit(pool.batches if pool else (lambda start: pdata.loader(source, start, 0)), show_progress)
    result = ProbeTrainResult(folder, history)
    if final_validation and dist_utils.is_main_process():
        from diffprobe.predict.validation import validate_fold

        result.validation = validate_fold(folder, data_dir, val_ids, dev, show_progress)
    return result


def frozen_probe_folder(dataset: str | int, fold: str, pretrained: str, head: str, finetune: bool,
                        with_input: bool = False) -> Path:
    """The fold's frozen probe a fine-tune starts its head from (``diffprobe train --finetune --warm_start``)."""
    if not finetune:
        raise DiffprobeError("--warm_start starts a fine-tune from the frozen probe", fix="add --finetune")
    return probe_dir(dataset, configuration_name(pretrained, head, False, with_input), str(parse_fold(fold)))


def validate_probe(dataset: str | int, fold: str = "0", pretrained: str = "default", head: str = "fpn",
                   finetune: bool = False, device: str = "auto", show_progress: bool = True,
                   configuration: str | None = None, with_input: bool = False) -> dict:
    """The final validation of a finished probe again (nnU-Net's ``--val``): ``validation/summary.json``
    and the fold's largest-component decision ``postprocessing.json``, e.g. for a probe trained before
    that decision existed. No training step runs."""
    from diffprobe.predict.validation import validate_fold

    folder = probe_dir(dataset, configuration or configuration_name(pretrained, head, finetune, with_input),
                       str(parse_fold(fold)))
    probe_folder = ProbeFolder(folder)
    if not probe_folder.finished:
        raise DiffprobeError("no finished probe to validate", folder,
                             "train it first: diffprobe train -d DATASET -f FOLD (without --val)")
    data_dir, _, _ = preprocessed_cases(dataset)
    val_ids = probe_folder.read_meta()["val_cases"]
    return validate_fold(folder, data_dir, val_ids, resolve_device(device), show_progress)
