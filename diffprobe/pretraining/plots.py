"""Figures of the pretraining stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.preprocessing.storage import load_array
from diffprobe.utils import save_figure


def plot_bpr_coordinates(ref, path: Path) -> Path:
    """Image and the three BPR coordinate maps on axial, coronal and sagittal centre slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = load_array(ref.data_path)[0]
    coords = load_array(ref.guidance_path).astype(np.float32)
    z, y, x = (s // 2 for s in image.shape)
    sz, sy, sx = ref.spacing
    views = [("axial", lambda a: a[z], sy / sx), ("coronal", lambda a: a[:, y][::-1], sz / sx),
             ("sagittal", lambda a: a[:, :, x][::-1], sz / sy)]
    names = ["image", "LR (x)", "AP (y)", "CC (z)"]
    fig, axes = plt.subplots(3, 4, figsize=(12, 8))
    for r, (view, cut, aspect) in enumerate(views):
        for c, arr in enumerate([image, *coords]):
            ax = axes[r, c]
            im = ax.imshow(cut(arr), cmap="gray" if c == 0 else "viridis", aspect=aspect)
            if c:
                fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{names[c]} — {view}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"BPR coordinates: {ref.identifier}")
    fig.tight_layout()
    return save_figure(fig, path)
