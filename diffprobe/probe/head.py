"""Probing heads on the frozen multi-scale features.

``fpn`` (default): in the style of vox2vec's FPN head — per scale a pointwise (1x1x1)
projection and pointwise residual blocks, then upsample-and-add from the coarsest scale to
the finest, a pointwise block after each merge and a final 1x1x1 convolution to the
classes. Pointwise layers keep the head small, so the segmentation quality is the
features' doing, not the head's.

``linear``: linear probing — per scale a 1x1x1 convolution to the classes, upsampled
(trilinear, itself linear) to the input resolution and summed: the logits are a linear
function of the features.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("fpn", "linear")


def _groups(channels: int, wanted: int = 8) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class PointwiseBlock(nn.Module):
    """x + 1x1x1 conv(SiLU(GroupNorm(x))): a residual MLP applied at every voxel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.conv = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class FPNHead(nn.Module):
    """Features ``{"dec{l}": (B, C_l, ...)}`` -> logits (B, K, *output size)."""

    def __init__(self, feature_channels: dict[str, int], num_classes: int, width: int = 32, blocks: int = 1) -> None:
        super().__init__()
        self.keys = sorted(feature_channels, key=lambda k: int(k[3:]))  # fine -> coarse
        # GroupNorm on the raw features: the denoiser's taps differ in scale between levels and
        # timesteps; normalising them makes one learning rate fit every scale (vox2vec uses BatchNorm).
        self.lateral = nn.ModuleDict({
            k: nn.Sequential(nn.GroupNorm(_groups(feature_channels[k]), feature_channels[k]),
                             nn.Conv3d(feature_channels[k], width, 1), *[PointwiseBlock(width) for _ in range(blocks)])
            for k in self.keys})
        self.merge = nn.ModuleDict({k: PointwiseBlock(width) for k in self.keys[:-1]})
        self.out = nn.Sequential(nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv3d(width, num_classes, 1))

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
    if kind == "linear":
        return LinearHead(feature_channels, num_classes)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
