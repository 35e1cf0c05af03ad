"""``diffprobe sample``: draw patches by the reverse process next to real patches.

The visible proof that the denoiser learned CT. Guidance for each sample is taken from a
real patch (its BPR coordinates / physical mm from the body-crop centre), so each generated
patch should look like anatomy from the same body position as the real patch beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.pretraining import data as pdata
from diffprobe.pretraining.bpr_maps import with_bpr_maps
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.utils import save_figure


def load_denoiser(name: str, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[torch.nn.Module, dict]:
    """The pretrained denoiser (EMA weights by default) and its model.json."""
    model = PretrainedModel(name)
    return model.load_denoiser(device, use_ema), model.meta


def sample_patches(name: str, num: int = 4, method: str = "ddim", steps: int = 50, seed: int = 0,
                   device: str = "cpu", output: Path | None = None) -> Path:
    """Generate ``num`` patches (DDPM or DDIM) and save a PNG of real vs generated centre slices."""
    pretrained = PretrainedModel(name)
    model, meta = pretrained.load_denoiser(device), pretrained.meta
    plans = meta["plans"]
    data_dir, _, ids = preprocessed_cases(meta["datasets"][0])
    refs = pdata.volume_refs(data_dir, ids)
    if meta["guidance"] == "bpr":
        refs = with_bpr_maps(refs, pretrained.folder)
    real = pdata.PatchBatches(refs, plans["patch_size"], num, meta["guidance"], augment=False,
                              seed=seed).batch(0)
    guidance = real["guidance"].to(device) if real["guidance"] is not None else None
    diffusion = GaussianDiffusion.from_plans(plans)
    g = torch.Generator().manual_seed(seed)
    shape = tuple(real["image"].shape)
    with torch.no_grad():
        if method == "ddpm":
            fake = diffusion.ddpm_sample(model, shape, guidance, generator=g, device=device)
        elif method == "ddim":
            fake = diffusion.ddim_sample(model, shape, guidance, steps=steps, generator=g, device=device)
        else:
            raise DiffprobeError(f"unknown sampling method '{method}'", fix="use ddpm or ddim")
    output = output or pretrained.folder / f"samples_{method}.png"
    _plot(real["image"].numpy(), fake.cpu().numpy(), output, f"{name}: real (top) vs {method} samples (bottom)")
    return output


def _plot(real: np.ndarray, fake: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = real.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    for i in range(n):
        for r, arr in enumerate((real, fake)):
            ax = axes[r, i]
            ax.imshow(arr[i, 0, arr.shape[2] // 2], cmap="gray", vmin=-0.02, vmax=0.40)  # [-200, 300] HU
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
