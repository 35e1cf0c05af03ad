"""A randomly initialised, untrained denoiser packaged like a pretrained model.

The control for the method's claim: the same probe on the features of a denoiser that never
saw CT. It shares the source model's BPR (and BPR maps), preset, guidance and plans, so the
only difference is the denoiser's pretraining.
"""

from __future__ import annotations

import shutil

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrain import build_denoiser, model_dir
from diffprobe.training.checkpoint import save_checkpoint
from diffprobe.utils import read_json, write_json


def make_random_init_model(source: str, name: str, seed: int = 0) -> None:
    """Write ``pretrained/<name>`` = ``source`` with its denoiser replaced by a fresh random one."""
    src, dst = model_dir(source), model_dir(name)
    if not (src / "model.json").is_file():
        raise DiffprobeError(f"no pretrained model named '{source}'", src, "run `diffprobe pretrain` first")
    if (dst / "diffusion" / "checkpoint_final.pt").is_file():
        return
    meta = read_json(src / "model.json")
    for sub in ("bpr", "bpr_maps"):
        if (src / sub).is_dir() and not (dst / sub).is_dir():
            shutil.copytree(src / sub, dst / sub)
    torch.manual_seed(seed)
    model = build_denoiser(meta["preset"], meta["plans"], meta["guidance"], meta["attention"])
    state = model.state_dict()
    save_checkpoint(dst / "diffusion" / "checkpoint_final.pt",
                    {"name": "diffusion", "step": 0, "model": state, "ema": state, "config": {"extra": {
                        "stage": "diffusion", "random_init": True}}, "history": []})
    write_json(dst / "model.json", {**meta, "name": name, "random_init_of": source})
