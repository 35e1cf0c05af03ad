"""The "no backbone" control: the probe head on the input itself (image ⊕ guidance), no denoiser.

Why: a probe's Dice mixes what the features carry with what the head and the input already
give. On CT, intensity alone separates several organs and the guidance channels (BPR
coordinates, or physical: mm from the body-crop centre) tell where along the body a voxel
lies, so a pointwise head on just those can score well. This module gives the same head that
input, average-pooled to exactly the scales (strides) the denoiser's decoder taps have, so the
head class, its width and its training are the same as for the real probe and only the
features differ.

It has :class:`~diffprobe.probe.features.FeatureExtractor`'s interface (``feature_channels``,
``feature_strides``, ``levels``, ``signature``, ``network_summary``, ``forward(x0, guidance,
seeds)``), so the probe trainer, the feature pool and the predictor use it unchanged. It
has no parameters; ``denoiser`` is the pooling pyramid (the slot the predictor compiles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InputPyramid(nn.Module):
    """(B, C, z, y, x) -> ``{"dec{l}": average pool of the input with the level's stride}``."""

    def __init__(self, strides: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.strides = {k: tuple(int(s) for s in v) for k, v in strides.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return pool_to_strides(x, self.strides)


def pool_to_strides(x: Tensor, strides: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """``{key: average pool of x with stride}``; stride 1 everywhere is x itself."""
    out = {}
    for key, stride in strides.items():
        # ceil_mode: a partial window at the border still gives an output voxel, so the sizes are
        # ceil(size / stride) like the pool's byte estimate (and the decoder's on divisible sizes)
        out[key] = x if all(s == 1 for s in stride) else F.avg_pool3d(x, stride, stride, ceil_mode=True)
    return out


def input_stack(x0: Tensor, guidance: Tensor | None) -> Tensor:
    """The clean input as the head may read it: image ⊕ guidance channels (in the image's dtype)."""
    return x0 if guidance is None else torch.cat([x0, guidance.to(x0.dtype)], dim=1)


class InputFeatures(nn.Module):
    """Image ⊕ guidance at the decoder scales of ``reference`` (a denoiser of the probe's architecture).

    Args:
        in_channels: image channels.
        guidance_channels: guidance channels (0 for guidance ``none``).
        strides: ``{"dec{l}": (z, y, x) stride}`` of every decoder level of the reference denoiser.
        levels: the levels to return (default: all), as for ``FeatureExtractor``.
    """

    trainable = False

    def __init__(self, in_channels: int, guidance_channels: int, strides: dict[str, tuple[int, ...]],
                 levels: Sequence[int] | None = None) -> None:
        super().__init__()
        available = sorted(int(k[3:]) for k in strides)
        self.levels = sorted(set(available if levels is None else (int(v) for v in levels)))
        if not self.levels or any(lv not in available for lv in self.levels):
            raise ValueError(f"levels must lie in {available}, got {levels}")
        self.in_channels, self.guidance_channels = int(in_channels), int(guidance_channels)
        self.timesteps: list[int] = []  # no noise, no timestep: the clean input
        self.denoiser = InputPyramid({f"dec{lv}": strides[f"dec{lv}"] for lv in self.levels})

    @classmethod
    def like(cls, denoiser: nn.Module, levels: Sequence[int] | None = None) -> InputFeatures:
        """The input features at the scales of ``denoiser`` (a ``DiffusionUNet``; its weights are not used)."""
        return cls(denoiser.in_channels, denoiser.guidance_channels, denoiser.feature_strides, levels)

    @property
    def feature_channels(self) -> dict[str, int]:
        return {f"dec{lv}": self.in_channels + self.guidance_channels for lv in self.levels}

    @property
    def feature_strides(self) -> dict[str, tuple[int, ...]]:
        return dict(self.denoiser.strides)

    @property
    def signature(self) -> tuple:
        """Equal signatures, equal features (the predictor shares extraction between such probes)."""
        return ("input", tuple(self.levels), tuple(sorted(self.feature_strides.items())))

    def network_summary(self, patch_size: Sequence[int]) -> dict:
        """A plans-style network dict for predict's RAM bound: one pooled copy of the input per level."""
        levels = []
        for key, stride in self.feature_strides.items():
            tokens = math.prod(max(1, math.ceil(int(p) / int(s))) for p, s in zip(patch_size, stride, strict=True))
            levels.append({"tokens": tokens, "channels": self.feature_channels[key], "attention": "none"})
        return {"levels": levels, "blocks_per_level": 1}

    def forward(self, x0: Tensor, guidance: Tensor | None, seeds: Sequence[int] | None = None,
                batched: bool = True) -> dict[str, Tensor]:
        """``seeds`` and ``batched`` are accepted for FeatureExtractor's interface and unused (no noise)."""
        if x0.dim() != 5 or x0.shape[1] != self.in_channels:
            raise ValueError(f"x0 must be (B, {self.in_channels}, z, y, x), got {tuple(x0.shape)}")
        if self.guidance_channels and (guidance is None or guidance.shape[1] != self.guidance_channels):
            raise ValueError(f"this extractor needs {self.guidance_channels} guidance channels")
        return self.denoiser(input_stack(x0, guidance if self.guidance_channels else None))

