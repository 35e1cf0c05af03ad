"""Probing heads on the frozen multi-scale features.

``fpn`` (default): in the style of vox2vec's FPN head — per scale a pointwise (1x1x1)
projection and pointwise residual blocks, then upsample-and-add from the coarsest scale to
the finest, a pointwise block after each merge and a final 1x1x1 convolution to the
classes. Pointwise layers keep the head small, so the segmentation quality is the
features' doing, not the head's.

Normalisation is BatchNorm (as vox2vec's), not a per-patch GroupNorm: a pointwise head decides
a voxel's class from absolute feature levels (a vessel is brighter than liver, spleen sits at
another BPR coordinate), and a per-patch normalisation rescales those levels by whatever else
is in the patch, so the same voxel got another class in another crop. Measured on the shared
real CT (48 fixed training patches, 300 steps): training-patch Dice 0.12 -> 0.20 on the image +
guidance channels, 0.11 -> 0.13 on the tiny denoiser's features. At inference the running
statistics are used: a voxel's logits do not depend on the rest of its tile.

``context``: the ``fpn`` head whose blocks at every level but the finest are 3x3x3 residual
convolutions (replicate padding) instead of pointwise ones. Why: a pointwise head can only re-weigh what
each voxel's features already say; on other patients' scans the frozen probe puts the aorta on the
vertebral body, which is as bright as the aorta in the labelled slab (``docs/results.md``, "The aorta on
the spine"). This head lets the decision read the neighbourhood (at the coarsest, stride-8 level two
blocks see +-16 voxels), to test whether the features carry the context a pointwise head cannot combine.
The finest level stays pointwise: there a 3x3x3 block would cost about as much as the rest of the head.

``linear``: linear probing — per scale a 1x1x1 convolution to the classes, upsampled
(trilinear, itself linear) to the input resolution and summed: the logits are a linear
function of the features.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("fpn", "context", "linear")


def _norm(channels: int) -> nn.Module:
    """Batch statistics while training, running statistics at inference (see the module docstring)."""
    return nn.BatchNorm3d(channels)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(BatchNorm(x))): with ``kernel`` 1 (default) a residual MLP applied at every voxel;
    with 3 a residual 3x3x3 convolution (replicate padding: a tile's border sees its own edge, not zeros)."""

    def __init__(self, channels: int, kernel: int = 1) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.conv = (nn.Conv3d(channels, channels, 1) if kernel == 1 else
                     nn.Conv3d(channels, channels, kernel, padding=kernel // 2, padding_mode="replicate"))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class FPNHead(nn.Module):
    """Features ``{"dec{l}": (B, C_l, ...)}`` -> logits (B, K, *output size).

    ``context_kernel`` > 1: the blocks of every level but the finest read are that size (the ``context`` head).
    """

    def __init__(self, feature_channels: dict[str, int], num_classes: int, width: int = 32, blocks: int = 1,
                 context_kernel: int = 1) -> None:
        super().__init__()
        self.keys = sorted(feature_channels, key=lambda k: int(k[3:]))  # fine -> coarse
        kernel = {k: 1 if i == 0 else context_kernel for i, k in enumerate(self.keys)}
        # normalising the raw features: the denoiser's taps differ in scale between levels and
        # timesteps; normalised, one learning rate fits every scale
        self.lateral = nn.ModuleDict({
            k: nn.Sequential(_norm(feature_channels[k]),
                             nn.Conv3d(feature_channels[k], width, 1),
                             *[ResidualBlock(width, kernel[k]) for _ in range(blocks)])
            for k in self.keys})
        self.merge = nn.ModuleDict({k: ResidualBlock(width, kernel[k]) for k in self.keys[:-1]})
        self.out = nn.Sequential(_norm(width), nn.SiLU(), nn.Conv3d(width, num_classes, 1))

    def forward(self, features: dict[str, Tensor], output_size: tuple[int, ...]) -> Tensor:
        h = self.lateral[self.keys[-1]](features[self.keys[-1]])
        for k in reversed(self.keys[:-1]):
            lat = self.lateral[k](features[k])
            h = self.merge[k](lat + F.interpolate(h, size=lat.shape[2:], mode="trilinear", align_corners=False))
        logits = self.out(h)
        if tuple(logits.shape[2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=tuple(output_size), mode="trilinear", align_corners=False)
        return logits


class LinearHead(nn.Module):
    """Sum over scales of upsampled 1x1x1 projections: logits linear in the features."""

    def __init__(self, feature_channels: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({k: nn.Conv3d(c, num_classes, 1) for k, c in feature_channels.items()})

    def forward(self, features: dict[str, Tensor], output_size: tuple[int, ...]) -> Tensor:
        out = None
        for k, proj in self.proj.items():
            y = proj(features[k])
            if tuple(y.shape[2:]) != tuple(output_size):
                y = F.interpolate(y, size=tuple(output_size), mode="trilinear", align_corners=False)
            out = y if out is None else out + y
        return out


def build_head(kind: str, feature_channels: dict[str, int], num_classes: int, width: int = 32) -> nn.Module:
    if kind == "fpn":
        return FPNHead(feature_channels, num_classes, width)
    if kind == "context":
        return FPNHead(feature_channels, num_classes, width, context_kernel=3)
    if kind == "linear":
        return LinearHead(feature_channels, num_classes)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")


def mean_logits(heads: list[nn.Module], features: dict[str, Tensor], output_size: tuple[int, ...]) -> Tensor:
    """The float32 mean of several heads' logits on the same features (fold heads sharing one extraction);
    one head: its logits."""
    total = None
    for head in heads:
        out = head(features, output_size).float()
        total = out if total is None else total.add_(out)
    return total.div_(len(heads)) if len(heads) > 1 else total
