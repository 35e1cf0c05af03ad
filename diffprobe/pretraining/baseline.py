"""A randomly initialised, untrained denoiser packaged like a pretrained model.

The control for the method's claim: the same probe on the features of a denoiser that never
saw CT. It shares the source model's BPR (and BPR maps), guidance and plans, so the only
difference is the denoiser's pretraining.

Why not the network's own initialisation: ``DiffusionUNet`` zero-initialises the second
convolution of every residual block and its output convolution, which is right for training
(each block starts as the identity) but makes the *untrained* network degenerate: every
residual branch is zero, the timestep never reaches the features, and a probe on it measures
a stack of skip convolutions rather than "a random network". The control therefore re-runs
PyTorch's standard ``reset_parameters()`` on every module (:func:`reinitialise`): kaiming-
uniform (a = sqrt(5)) weights and uniform biases for every convolution and linear layer,
including the zero-initialised ones, GroupNorm at weight 1 / bias 0.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.training.checkpoint import save_checkpoint
from diffprobe.utils import write_json

# recorded in model.json (and probe.json of from-scratch probes): which initialisation the weights have
INIT_SCHEME = "pytorch_default_reset_parameters"  # kaiming_uniform(a=sqrt(5)) for every conv/linear


def reinitialise(module: nn.Module) -> nn.Module:
    """Run ``reset_parameters()`` on every submodule that has one (PyTorch's default init), in place.

    Uses the global torch RNG: seed it first for a reproducible network. Returns ``module``.
    """
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return module


def standard_init_denoiser(model: PretrainedModel, seed: int) -> nn.Module:
    """``model``'s denoiser architecture with PyTorch's default initialisation everywhere (seeded)."""
    torch.manual_seed(seed)
    return reinitialise(model.build_denoiser())


def make_random_init_model(source: str, name: str, seed: int = 0) -> None:
    """Write ``pretrained/<name>`` = ``source`` with its denoiser replaced by a fresh random one.

    The random denoiser has the standard initialisation (:data:`INIT_SCHEME`, recorded in
    model.json as ``init``). A model of that name made by an older version (no ``init`` recorded:
    the degenerate zero-branch network) or with another seed is rebuilt; probes trained on it
    then refuse to load (the denoiser checksum changed) and must be retrained.
    """
    src, dst = PretrainedModel(source), PretrainedModel(name)
    if not src.exists:
        raise DiffprobeError(f"no pretrained model named '{source}'", src.folder, "run `diffprobe pretrain` first")
    wanted = {"init": INIT_SCHEME, "init_seed": seed, "random_init_of": source}
    if dst.denoiser_checkpoint.is_file() and dst.exists:
        old = dst.meta
        if all(old.get(k) == v for k, v in wanted.items()):
            return
        dst.denoiser_checkpoint.unlink()
    meta = src.meta
    for sub in (src.stage_dir("bpr"), src.bpr_maps_dir):
        target = dst.folder / sub.name
        if sub.is_dir() and not target.is_dir():
            shutil.copytree(sub, target)
    state = standard_init_denoiser(src, seed).state_dict()
    save_checkpoint(dst.denoiser_checkpoint,
                    {"name": "diffusion", "step": 0, "model": state, "ema": state, "config": {"extra": {
                        "stage": "diffusion", "random_init": True, "init": INIT_SCHEME, "seed": seed}},
                     "history": []})
    write_json(dst.meta_path, {**meta, "name": name, **wanted})
