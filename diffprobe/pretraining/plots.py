"""Figures of the pretraining stages: the BPR's coordinate maps, per scan and as profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprobe.preprocessing.storage import load_array
from diffprobe.utils import save_figure

_NAMES = ["image", "LR (x)", "AP (y)", "CC (z)"]
_CHANNEL_AXES = ((0, 2), (1, 1), (2, 0))  # coordinate channel -> numpy axis it runs along


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _maps_rows(fig, axes, image: np.ndarray, coords: np.ndarray, spacing) -> None:
    """Rows 0-2 of ``axes``: image and the three coordinate maps on axial, coronal and sagittal centre slices."""
    z, y, x = (s // 2 for s in image.shape)
    sz, sy, sx = spacing
    views = [("axial", lambda a: a[z], sy / sx), ("coronal", lambda a: a[:, y][::-1], sz / sx),
             ("sagittal", lambda a: a[:, :, x][::-1], sz / sy)]
    for r, (view, cut, aspect) in enumerate(views):
        for c, arr in enumerate([image, *coords]):
            ax = axes[r, c]
            im = ax.imshow(cut(arr), cmap="gray" if c == 0 else "viridis", aspect=aspect)
            if c:
                fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{_NAMES[c]} — {view}", fontsize=9)
            ax.axis("off")


def plot_bpr_coordinates(ref, path: Path) -> Path:
    """Image and the three BPR coordinate maps on axial, coronal and sagittal centre slices."""
    plt = _plt()
    image = load_array(ref.data_path)[0]
    coords = load_array(ref.guidance_path).astype(np.float32)
    fig, axes = plt.subplots(3, 4, figsize=(12, 8))
    _maps_rows(fig, axes, image, coords, ref.spacing)
    fig.suptitle(f"BPR coordinates: {ref.identifier}")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bpr_scan(image: np.ndarray, coords: np.ndarray, spacing, scale_per_mm: float, title: str,
                  path: Path, quality: dict | None = None) -> Path:
    """One scan: the maps on three centre slices, and below each coordinate's profile along its axis.

    Profile: the mean coordinate per index along the channel's own axis, in mm
    (coordinate / ``scale_per_mm``, shifted to start at 0) against the position in mm; the dashed
    line is the anchored slope (1 mm per mm). A flat or saw-toothed CC profile is the failure
    this figure exists to show.
    """
    plt = _plt()
    coords = np.asarray(coords, np.float32)
    fig, axes = plt.subplots(4, 4, figsize=(12, 10.5), gridspec_kw={"height_ratios": [1, 1, 1, 0.9]})
    _maps_rows(fig, axes, image, coords, spacing)
    axes[3, 0].axis("off")
    if quality:
        lines = [f"Spearman CC vs slice: {quality['spearman_cc']:.3f}"]
        lines += [f"{k}: range {quality['range_mm'][k]:.0f} / extent {quality['extent_mm'][k]:.0f} mm, "
                  f"slope {quality['slope'][k]:.2f}" for k in ("LR", "AP", "CC")]
        tiles = quality.get("tile_disagreement_mm")
        if tiles:
            lines.append("tile disagreement (mm): " + ", ".join(f"{k} {v:.1f}" for k, v in tiles.items()))
        axes[3, 0].text(0, 0.5, "\n".join(lines), fontsize=7.5, va="center", transform=axes[3, 0].transAxes)
    for i, (channel, axis) in enumerate(_CHANNEL_AXES):
        ax = axes[3, i + 1]
        other = tuple(a for a in range(3) if a != axis)
        prof = coords[channel].mean(axis=other) / scale_per_mm
        mm = np.arange(prof.size) * spacing[axis]
        ax.plot(mm, prof - prof[0], lw=1.5, label="BPR")
        ax.plot(mm, mm, "k--", lw=0.8, label="1 mm/mm")
        ax.set_title(f"{_NAMES[i + 1]} profile", fontsize=9)
        ax.set_xlabel("position along the axis (mm)", fontsize=8)
        ax.set_ylabel("coordinate (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bpr_profiles(profiles: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path) -> Path:
    """CC coordinate (mm) against slice position (mm) for every scan, one panel each (rho in the title).

    ``profiles``: name -> (slice positions mm, mean CC coordinate per slice in mm, Spearman rho).
    """
    plt = _plt()
    n = max(1, len(profiles))
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, (mm, cc, rho)) in zip(axes.flat, profiles.items()):
        ax.axis("on")
        ax.plot(mm, cc - cc[0], lw=1.5)
        ax.plot(mm, mm, "k--", lw=0.8)
        ax.set_title(f"{name}: rho {rho:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("BPR cranio-caudal coordinate along each scan (dashed: 1 mm per mm)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
