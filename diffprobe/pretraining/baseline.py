"""A randomly initialised, untrained denoiser packaged like a pretrained model.

The control for the method's claim: the same probe on the features of a denoiser that never
saw CT. It shares the source model's BPR (and BPR maps), preset, guidance and plans, so the
only difference is the denoiser's pretraining.
"""

from __future__ import annotations

import shutil

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.training.checkpoint import save_checkpoint
from diffprobe.utils import write_json


def make_random_init_model(source: str, name: str, seed: int = 0) -> None:
    """Write ``pretrained/<name>`` = ``source`` with its denoiser replaced by a fresh random one."""
    src, dst = PretrainedModel(source), PretrainedModel(name)
    if not src.exists:
        raise DiffprobeError(f"no pretrained model named '{source}'", src.folder, "run `diffprobe pretrain` first")
    if dst.denoiser_checkpoint.is_file():
        return
    meta = src.meta
    for sub in (src.stage_dir("bpr"), src.bpr_maps_dir):
        target = dst.folder / sub.name
        if sub.is_dir() and not target.is_dir():
            shutil.copytree(sub, target)
    torch.manual_seed(seed)
    state = src.build_denoiser().state_dict()
    save_checkpoint(dst.denoiser_checkpoint,
                    {"name": "diffusion", "step": 0, "model": state, "ema": state, "config": {"extra": {
                        "stage": "diffusion", "random_init": True}}, "history": []})
    write_json(dst.meta_path, {**meta, "name": name, "random_init_of": source})
