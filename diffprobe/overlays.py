"""Overlay figure: CT slices with true and predicted organ contours (demo, reports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.evaluation.evaluate import label_files
from diffprobe.io.image_io import read_image, read_label
from diffprobe.utils import save_figure


def plot_overlays(images: Path, labels: Path, predictions: Path, output: Path, max_cases: int = 4) -> Path:
    """One row per case: the axial slice with most foreground, true contours solid, predicted dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = label_files(labels)
    preds = label_files(predictions)
    cases = [c for c in sorted(refs) if c in preds][:max_cases]
    fig, axes = plt.subplots(len(cases), 2, figsize=(9, 4.2 * len(cases)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, case in enumerate(cases):
        image_file = next(iter(sorted(images.glob(f"{case}_0000*"))))
        img = read_image(image_file).array
        ref, pred = read_label(refs[case]).array, read_label(preds[case]).array
        z = int(np.argmax((ref > 0).sum(axis=(1, 2))))
        for col, (title, seg) in enumerate((("reference", ref), ("prediction", pred))):
            ax = axes[row, col]
            ax.imshow(img[z], cmap="gray", vmin=-200, vmax=300)
            for lab in (v for v in np.unique(np.concatenate([ref[z].ravel(), pred[z].ravel()])) if v):
                if (seg[z] == lab).any():
                    ax.contour(seg[z] == lab, levels=[0.5], colors=[cmap(int(lab) % 10)], linewidths=1.2,
                               linestyles="solid" if col == 0 else "dashed")
            ax.set_title(f"{case} z={z}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, output, dpi=90)
