"""The probe: frozen feature extractor + head, saved and loaded from a trained-probe folder.

Layout of ``<results>/DatasetXXX_Name/diffprobe/<pretrained>__<head>[__finetune]/fold_<f>/``:
``probe.json`` (everything needed to rebuild it: pretrained model name and checksum,
timesteps, levels, patch size, labels, the dataset's plans), ``checkpoint_final.pt`` (head
weights; with ``--finetune`` also the denoiser's), training log and curves, ``validation/``.
probe.json's optional ``extractor`` ("input": head on the pooled input, no denoiser) and
``init`` ("scratch": denoiser trained end to end from random weights) are the controls of
``diffprobe ablate controls``; absent, they mean "denoiser" and "pretrained".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffprobe import paths
from diffprobe.bpr import BodyPartRegressor
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrained_model import file_checksum  # noqa: F401  (re-exported)
from diffprobe.probe.features import FeatureExtractor
from diffprobe.probe.head import build_head
from diffprobe.training.checkpoint import load_checkpoint, load_state_checked
from diffprobe.utils import read_json

PROBE_FORMAT = 2  # 2: BatchNorm head (format 1 heads normalised per patch)


class ProbeModel(nn.Module):
    """x_0 patch (+ guidance, noise seeds) -> class logits at the patch resolution."""

    def __init__(self, extractor: FeatureExtractor, head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, x0: Tensor, guidance: Tensor | None, seeds: list[int]) -> Tensor:
        return self.head(self.extractor(x0, guidance, seeds), tuple(x0.shape[2:]))


def configuration_name(pretrained: str, head: str, finetune: bool, with_input: bool = False) -> str:
    return f"{pretrained}__{head}" + ("__withinput" if with_input else "") + ("__finetune" if finetune else "")


def probe_dir(dataset: str | int, configuration: str, fold: str) -> Path:
    return paths.results_dir(dataset) / configuration / f"fold_{fold}"


EXTRACTORS = ("denoiser", "input")  # probe.json "extractor"; "input": the no-backbone control
INITS = ("pretrained", "scratch")  # probe.json "init"; "scratch": the denoiser trained from random weights


def build_probe(denoiser: nn.Module, meta: dict, timesteps: list[int], levels: list[int] | None, head: str,
                num_classes: int, width: int, finetune: bool, extractor: str = "denoiser",
                with_input: bool = False) -> ProbeModel:
    """Head on the denoiser's features (``with_input``: ⊕ the pooled input, probe setting ``with_input``),
    or (``extractor="input"``) on the input pooled to the denoiser's scales
    (:class:`~diffprobe.probe.input_features.InputFeatures`; weights unused)."""
    if extractor == "input" and with_input:
        raise ValueError("with_input adds the input to the denoiser's features; the input extractor has it already")
    if extractor == "input":
        from diffprobe.probe.input_features import InputFeatures

        features: nn.Module = InputFeatures.like(denoiser, levels)
    elif extractor == "denoiser":
        diffusion = GaussianDiffusion.from_plans(meta["plans"])
        features = FeatureExtractor(denoiser, diffusion, timesteps, levels, trainable=finetune, with_input=with_input)
    else:
        raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
    return ProbeModel(features, build_head(head, features.feature_channels, num_classes, width))


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

    @property
    def thin_padding(self) -> str:
        """How training filled the short axes of thin volumes (``config.thin_padding``; older probes: air)."""
        return str((self.meta.get("config") or {}).get("thin_padding", "air"))


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


class ProbeFolder:
    """A trained-probe folder on disk: ``probe.json``, ``checkpoint_final.pt``, logs, ``validation/``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def of(cls, dataset: str | int, configuration: str, fold: str) -> ProbeFolder:
        return cls(probe_dir(dataset, configuration, fold))

    @property
    def configuration(self) -> str:
        """The configuration this fold folder belongs to (``<configuration>/fold_<f>``), as ``predict -c`` names it."""
        return self.folder.parent.name

    @property
    def meta_path(self) -> Path:
        return self.folder / "probe.json"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint_final.pt"

    @property
    def validation_dir(self) -> Path:
        return self.folder / "validation"

    @property
    def finished(self) -> bool:
        return self.meta_path.is_file() and self.checkpoint.is_file()

    def read_meta(self) -> dict:
        """probe.json, checked (format, keys, dataset it lies under)."""
        try:
            meta = read_json(self.meta_path)
        except ValueError as e:
            raise DiffprobeError(f"probe.json is not valid JSON ({e})", self.meta_path,
                                 "retrain the probe (diffprobe train)") from None
        if not isinstance(meta, dict):
            raise DiffprobeError("probe.json must hold a JSON object", self.meta_path,
                                 "retrain the probe (diffprobe train)")
        _refuse_foreign_probe(self.folder, meta, self.meta_path)
        return meta


def load_trained_probe(folder: Path, device: str | torch.device = "cpu") -> TrainedProbe:
    """Rebuild a probe from its folder; refuses a pretrained model that changed since training,
    a probe from another dataset or version, and checkpoints that do not fit the network."""
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    probe_folder = ProbeFolder(folder)
    if not probe_folder.finished:
        raise DiffprobeError("this probe has not finished training", folder,
                             "run `diffprobe train` for it (or resume it with --c)")
    meta = probe_folder.read_meta()
    pretrained = PretrainedModel(meta["pretrained"])
    if not pretrained.denoiser_checkpoint.is_file():
        raise DiffprobeError(f"the pretrained model '{meta['pretrained']}' this probe was trained on is missing",
                             pretrained.folder, "install it (diffprobe install_model) or retrain the probe")
    extractor, init = meta.get("extractor", "denoiser"), meta.get("init", "pretrained")
    # the denoiser's pretrained weights matter only to a frozen probe on them
    uses_weights = extractor == "denoiser" and init == "pretrained"
    if uses_weights and not meta["finetune"] and pretrained.checksum() != meta["pretrained_checksum"]:
        raise DiffprobeError(f"the pretrained model '{meta['pretrained']}' changed after this probe was trained",
                             pretrained.denoiser_checkpoint,
                             "retrain the probe (diffprobe train) on the current pretrained model")
    # a from-scratch probe's checkpoint holds the whole network; the input extractor only needs the scales
    denoiser = pretrained.load_denoiser(device) if uses_weights else pretrained.build_denoiser().to(device).eval()
    model = build_probe(denoiser, pretrained.meta, meta["timesteps"], meta["levels"], meta["head"],
                        meta["num_classes"], meta["config"]["width"], meta["finetune"], extractor,
                        bool(meta["config"].get("with_input", False)))
    ckpt = load_checkpoint(probe_folder.checkpoint, device)
    load_state_checked(model if meta["finetune"] else model.head, ckpt.get("model"), probe_folder.checkpoint,
                       "diffprobe train")
    model = model.to(device).eval()
    bpr, crop = pretrained.load_bpr(device) if pretrained.guidance == "bpr" else (None, None)
    return TrainedProbe(folder, meta, model, bpr, crop)
