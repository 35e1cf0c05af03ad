"""The probe: frozen feature extractor + head, saved and loaded from a trained-probe folder.

Layout of ``<results>/DatasetXXX_Name/diffprobe/<pretrained>__<head>[__finetune]/fold_<f>/``:
``probe.json`` (everything needed to rebuild it: pretrained model name and checksum,
timesteps, levels, patch size, labels, the dataset's plans), ``checkpoint_final.pt`` (head
weights; with ``--finetune`` also the denoiser's), training log and curves, ``validation/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffprobe import paths
from diffprobe.bpr import BodyPartRegressor
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.probe.features import FeatureExtractor
from diffprobe.probe.head import build_head
from diffprobe.training.checkpoint import load_checkpoint, load_state_checked
from diffprobe.utils import read_json

PROBE_FORMAT = 1


class ProbeModel(nn.Module):
    """x_0 patch (+ guidance, noise seeds) -> class logits at the patch resolution."""

    def __init__(self, extractor: FeatureExtractor, head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, x0: Tensor, guidance: Tensor | None, seeds: list[int]) -> Tensor:
        return self.head(self.extractor(x0, guidance, seeds), tuple(x0.shape[2:]))


def configuration_name(pretrained: str, head: str, finetune: bool) -> str:
    return f"{pretrained}__{head}" + ("__finetune" if finetune else "")


def probe_dir(dataset: str | int, configuration: str, fold: str) -> Path:
    return paths.results_dir(dataset) / configuration / f"fold_{fold}"


def file_checksum(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def build_probe(denoiser: nn.Module, meta: dict, timesteps: list[int], levels: list[int] | None, head: str,
                num_classes: int, width: int, finetune: bool) -> ProbeModel:
    diffusion = GaussianDiffusion.from_plans(meta["plans"])
    extractor = FeatureExtractor(denoiser, diffusion, timesteps, levels, trainable=finetune)
    return ProbeModel(extractor, build_head(head, extractor.feature_channels, num_classes, width))


@dataclass
class TrainedProbe:
    """A loaded probe ready for prediction."""

    folder: Path
    meta: dict
    model: ProbeModel
    bpr: BodyPartRegressor | None
    bpr_crop: list[int] | None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.meta["patch_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])


_PROBE_KEYS = ("dataset", "pretrained", "pretrained_checksum", "guidance", "head", "finetune", "timesteps",
               "levels", "patch_size", "num_classes", "labels", "config", "plans")


def _refuse_foreign_probe(folder: Path, meta: dict, meta_path: Path) -> None:
    """Refuse a probe folder copied from another dataset, or a probe.json from another version.

    Why: a probe predicts the label ids of the dataset it was trained on; found under another
    dataset's results folder it would silently write that dataset's files with foreign labels.
    """
    if meta.get("format") != PROBE_FORMAT:
        raise DiffprobeError(f"probe format {meta.get('format')!r} is not supported by this version "
                             f"(it reads format {PROBE_FORMAT})", meta_path,
                             "retrain the probe with this diffprobe version (diffprobe train)")
    missing = [k for k in _PROBE_KEYS if k not in meta]
    if missing:
        raise DiffprobeError(f"probe.json lacks {', '.join(missing)} (edited, or written by another version)",
                             meta_path, "retrain the probe with this diffprobe version (diffprobe train)")
    if folder.parent.parent.name == paths.SUBFOLDER:
        here = folder.parent.parent.parent.name
        if meta["dataset"] != here:
            raise DiffprobeError(f"this probe was trained on {meta['dataset']}, but lies in the results of {here}",
                                 meta_path, f"train a probe for {here} (diffprobe train -d {here}), or move the "
                                 f"folder back under {meta['dataset']}")


def load_trained_probe(folder: Path, device: str | torch.device = "cpu") -> TrainedProbe:
    """Rebuild a probe from its folder; refuses a pretrained model that changed since training,
    a probe from another dataset or version, and checkpoints that do not fit the network."""
    from diffprobe.pretraining.pretrain import MODEL_FORMAT, bpr_crop, load_bpr, model_dir
    from diffprobe.pretraining.sample import load_denoiser

    meta_path, ckpt_path = folder / "probe.json", folder / "checkpoint_final.pt"
    if not meta_path.is_file() or not ckpt_path.is_file():
        raise DiffprobeError("this probe has not finished training", folder,
                             "run `diffprobe train` for it (or resume it with --c)")
    try:
        meta = read_json(meta_path)
    except ValueError as e:
        raise DiffprobeError(f"probe.json is not valid JSON ({e})", meta_path,
                             "retrain the probe (diffprobe train)") from None
    if not isinstance(meta, dict):
        raise DiffprobeError("probe.json must hold a JSON object", meta_path, "retrain the probe (diffprobe train)")
    _refuse_foreign_probe(folder, meta, meta_path)
    pdir = model_dir(meta["pretrained"])
    denoiser_ckpt = pdir / "diffusion" / "checkpoint_final.pt"
    if not denoiser_ckpt.is_file():
        raise DiffprobeError(f"the pretrained model '{meta['pretrained']}' this probe was trained on is missing",
                             pdir, "install it (diffprobe install_model) or retrain the probe")
    if not meta["finetune"] and file_checksum(denoiser_ckpt) != meta["pretrained_checksum"]:
        raise DiffprobeError(f"the pretrained model '{meta['pretrained']}' changed after this probe was trained",
                             denoiser_ckpt, "retrain the probe (diffprobe train) on the current pretrained model")
    model_json = pdir / "model.json"
    pformat = read_json(model_json).get("format") if model_json.is_file() else None
    if pformat != MODEL_FORMAT:
        raise DiffprobeError(f"pretrained model format {pformat!r} is not supported by this version "
                             f"(it reads format {MODEL_FORMAT})", model_json,
                             "pretrain (diffprobe pretrain) or install a model made by this diffprobe version")
    try:
        denoiser, pmeta = load_denoiser(meta["pretrained"], device)
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        raise DiffprobeError("the pretrained denoiser checkpoint does not fit its model.json (another model's "
                             "or another version's checkpoint)", denoiser_ckpt,
                             "reinstall the pretrained model (diffprobe install_model) or pretrain it again") from None
    model = build_probe(denoiser, pmeta, meta["timesteps"], meta["levels"], meta["head"], meta["num_classes"],
                        meta["config"]["width"], meta["finetune"])
    ckpt = load_checkpoint(ckpt_path, device)
    load_state_checked(model if meta["finetune"] else model.head, ckpt.get("model"), ckpt_path, "diffprobe train")
    model = model.to(device).eval()
    bpr = load_bpr(pdir, device) if pmeta["guidance"] == "bpr" else None
    return TrainedProbe(folder, meta, model, bpr, bpr_crop(pdir) if bpr is not None else None)
