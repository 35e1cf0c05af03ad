"""``PretrainedModel``: the one owner of a pretrained-model folder.

Layout of ``<results root>/pretrained/<name>/``: ``model.json`` (format, datasets, guidance,
attention, seed and the plans snapshot the networks were built from), ``bpr/`` and
``diffusion/`` (trainer outputs: checkpoints, log, loss curve), ``bpr_maps/<dataset>/<case>.b2nd``
(derived cache, see :mod:`diffprobe.pretraining.bpr_maps`) and ``bpr_coordinates.png``.
No other module spells out these paths: pretraining, probing, prediction, export and the
ablations all go through this class.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import torch

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.planning.view import Plans
from diffprobe.utils import read_json

MODEL_FORMAT = 2
DENOISER_CKPT = "diffusion/checkpoint_final.pt"
BPR_CKPT = "bpr/checkpoint_final.pt"


def file_checksum(path: Path) -> str:
    """First 16 hex digits of the file's SHA-1 (identifies a checkpoint's exact weights)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def weights_checksum(state: dict) -> str:
    """First 16 hex digits of the SHA-1 over a state dict's names and tensor bytes (file-format independent)."""
    h = hashlib.sha1()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:16]


def check_dataset_names(meta: dict, source: Path) -> None:
    """Refuse a model.json whose dataset names are not plain ``DatasetXXX_Name`` folder names.

    Why: stages open folders from these names (``diffprobe sample`` reads
    ``<preprocessed>/<first dataset>/``); a model.json copied or downloaded from elsewhere with
    ``../x`` or ``/abs`` there would make them read outside the data roots.
    """
    names = meta.get("datasets", [])
    found = list(names) if isinstance(names, list) else [names]
    plans = meta.get("plans")
    if isinstance(plans, dict) and "dataset" in plans:
        found.append(plans["dataset"])
    bad = [n for n in found if not paths.is_dataset_folder_name(n)]
    if bad:
        raise DiffprobeError(f"model.json names dataset(s) {', '.join(repr(n) for n in bad)} that are not plain "
                             "DatasetXXX_Name folder names (they could point outside the data roots)",
                             source, "pretrain the model again (diffprobe pretrain) or install an archive written "
                             "by `diffprobe export_model`; do not edit the dataset names in model.json")


class PretrainedModel:
    """A named pretrained model on disk: its files, its metadata, and how to rebuild its networks."""

    def __init__(self, name: str, folder: Path | None = None) -> None:
        # a plain folder name only: "--name ../x" must not write (or read) outside results/pretrained
        self.name = paths.check_name(name)
        self.folder = folder or paths.results_root() / "pretrained" / self.name

    # ---- files --------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.folder / "model.json"

    @property
    def denoiser_checkpoint(self) -> Path:
        return self.folder / DENOISER_CKPT

    @property
    def bpr_checkpoint(self) -> Path:
        return self.folder / BPR_CKPT

    @property
    def bpr_maps_dir(self) -> Path:
        return self.folder / "bpr_maps"

    def stage_dir(self, stage: str) -> Path:
        """Trainer output folder of a stage ('bpr' or 'diffusion')."""
        return self.folder / stage

    @property
    def exists(self) -> bool:
        return self.meta_path.is_file()

    @property
    def finished(self) -> bool:
        """model.json and the final denoiser checkpoint are both there."""
        return self.exists and self.denoiser_checkpoint.is_file()

    def checksum(self) -> str:
        """Checksum of the final denoiser weights: a probe records it and refuses a changed model."""
        return file_checksum(self.denoiser_checkpoint)

    def bpr_checksum(self) -> str | None:
        return file_checksum(self.bpr_checkpoint) if self.bpr_checkpoint.is_file() else None

    # ---- metadata -----------------------------------------------------------------------
    @cached_property
    def meta(self) -> dict:
        """model.json, checked for this version's format."""
        if not self.exists:
            raise DiffprobeError(f"no pretrained model named '{self.name}'", self.folder,
                                 "run `diffprobe pretrain --name NAME` first (or install_model)")
        try:
            meta = read_json(self.meta_path)
        except ValueError as e:
            raise DiffprobeError(f"model.json is not valid JSON ({e})", self.meta_path,
                                 "pretrain the model again or reinstall it") from None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != MODEL_FORMAT:
            raise DiffprobeError(f"pretrained model format {fmt!r} is not supported by this version "
                                 f"(it reads format {MODEL_FORMAT})", self.meta_path,
                                 "pretrain (diffprobe pretrain) or install a model made by this diffprobe version")
        check_dataset_names(meta, self.meta_path)
        return meta

    @property
    def plans(self) -> Plans:
        """The plans snapshot the model was trained with (network, schedule, normalisation, budgets)."""
        return Plans(self.meta["plans"])

    def check_timesteps(self, timesteps: list[int] | None, option: str = "--t") -> None:
        """Refuse feature timesteps outside this model's diffusion schedule, before anything is loaded.

        Why here: the valid range is the model's ``num_timesteps`` (its model.json plans); a
        timestep outside it would otherwise surface as a ValueError deep in the feature extractor.
        ``option`` names where the timesteps came from in the message (``--t``, or a plans key).
        """
        steps = int(self.meta["plans"]["diffusion"]["num_timesteps"])
        bad = [int(t) for t in timesteps or [] if not 0 <= int(t) < steps]
        if bad:
            fix = (f"choose {option} between 0 and {steps - 1}, e.g. {option} 10 50 (or leave it out: the planned "
                   "feature timesteps)" if option.startswith("-") else f"use timesteps between 0 and {steps - 1}")
            raise DiffprobeError(f"{option} {' '.join(map(str, bad))}: outside the diffusion steps of the pretrained "
                                 f"model '{self.name}', 0 to {steps - 1} (num_timesteps {steps} in its plans)",
                                 self.meta_path, fix)

    @property
    def guidance(self) -> str:
        return str(self.meta["guidance"])

    @property
    def attention(self) -> str:
        return str(self.meta["attention"])

    # ---- networks -----------------------------------------------------------------------
    def build_denoiser(self) -> torch.nn.Module:
        """An untrained denoiser of this model's architecture (from its plans snapshot)."""
        return build_denoiser(self.plans, self.guidance, self.attention)

    def require_finished(self) -> None:
        if not self.denoiser_checkpoint.is_file():
            raise DiffprobeError(f"the pretrained model '{self.name}' has no final denoiser checkpoint",
                                 self.denoiser_checkpoint,
                                 f"finish it with `diffprobe pretrain --name {self.name} --c`")

    def load_denoiser(self, device: str | torch.device = "cpu", use_ema: bool = True) -> torch.nn.Module:
        """The pretrained denoiser (EMA weights by default), in eval mode on ``device``."""
        from diffprobe.training.checkpoint import load_checkpoint, load_state_checked

        self.meta  # noqa: B018 - format check before anything is loaded
        self.require_finished()
        ckpt = load_checkpoint(self.denoiser_checkpoint, device)
        model = self.build_denoiser()
        try:
            load_state_checked(model, ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"],
                               self.denoiser_checkpoint, "diffprobe pretrain")
        except RuntimeError as e:
            if "state_dict" not in str(e):
                raise
            raise DiffprobeError("the pretrained denoiser checkpoint does not fit its model.json (another model's "
                                 "or another version's checkpoint)", self.denoiser_checkpoint,
                                 "reinstall the pretrained model (diffprobe install_model) or pretrain it "
                                 "again") from None
        return model.to(device).eval()

    def _bpr_checkpoint(self, device: torch.device | str = "cpu") -> dict:
        from diffprobe.training.checkpoint import load_checkpoint

        if not self.bpr_checkpoint.is_file():
            raise DiffprobeError("the BPR stage has not finished for this model", self.bpr_checkpoint,
                                 "run `diffprobe pretrain --stage bpr` (or --stage all) first")
        return load_checkpoint(self.bpr_checkpoint, device)

    def load_bpr(self, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, list[int]]:
        """The trained BPR in eval mode and the crop it was trained on (its inference window)."""
        from diffprobe.bpr import BodyPartRegressor
        from diffprobe.training.checkpoint import load_state_checked

        ckpt = self._bpr_checkpoint(device)
        extra = ckpt["config"]["extra"]
        model = BodyPartRegressor(width=int(extra["width"]))
        load_state_checked(model, ckpt["model"], self.stage_dir("bpr"), "diffprobe pretrain")
        return model.to(device).eval(), [int(c) for c in extra["crop"]]


def build_denoiser(plans: Plans, guidance: str, attention: str) -> torch.nn.Module:
    """The planned denoiser: levels, blocks and channels from plans; guidance channels from the mode."""
    from diffprobe.guidance import guidance_channels
    from diffprobe.models import DiffusionUNet

    return DiffusionUNet(plans.input_channels, guidance_channels(guidance), plans.levels, plans.blocks_per_level,
                         attention)
