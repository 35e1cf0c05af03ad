"""The body part regressor: a small 3D CNN mapping CT to 3D body coordinates, and its inference.

Output channels, in **world-axis order** (not numpy order!):

* channel 0 = left-right (LR, along array axis x; grows towards patient left),
* channel 1 = anterior-posterior (AP, along y; grows towards posterior),
* channel 2 = cranio-caudal (CC, along z; grows towards superior),

in units of ``scale_per_mm`` (the trainer's choice, e.g. 0.01/mm: 100 mm = 1 unit), at the
network's low resolution (``total_stride`` voxels per output cell).

Why the architecture looks like this: a voxel's body coordinate is not visible locally (a patch
of liver looks the same 2 cm higher up), it has to be inferred from the surrounding anatomy.
So after the strided encoder the model stacks dilated residual blocks and a **global-context
branch** (mean-pooled features through a small MLP, broadcast back and added to every cell),
giving every output cell the whole crop as receptive field.  There are deliberately no
coordinate channels or positional encodings: the position *within the crop* is meaningless
(crops are random), and the losses make the output depend on anatomy only.

No normalisation layers by default (``norm="none"``): per-crop normalisation (Instance/GroupNorm)
subtracts each crop's own feature statistics, and those statistics — how much lung, fat or bone
the crop holds — are position cues; it also makes predictions depend on the field of view.  On
phantoms the unnormalised net learnt the coordinate scale 1.5-3x faster (docs/bpr.md).
``norm="group"`` is available for deeper/wider variants that need it.  The global branch still
sees the whole input, so inference is most faithful with
``predict_coordinates(..., patch_size=<training crop size>)``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffprobe.models.tiling import separable_gaussian, tile_average, window_starts

DEFAULT_STRIDES = [[1, 2, 2], [2, 2, 2], [2, 2, 2]]


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, with at least 2 channels per group (1 group for tiny widths)."""
    for g in (8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, stride: list[int] | int = 1, dilation: int = 1,
                 act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=norm == "none"),
            nn.GroupNorm(_groups(cout), cout) if norm == "group" else nn.Identity(),
        ]
        if act:
            layers.append(nn.LeakyReLU(0.01, inplace=True))
        super().__init__(*layers)


class _ResBlock(nn.Module):
    """Two 3x3x3 convs (optionally dilated) with an identity shortcut."""

    def __init__(self, channels: int, norm: str, dilation: int = 1):
        super().__init__()
        self.conv1 = _ConvNormAct(channels, channels, norm, dilation=dilation)
        self.conv2 = _ConvNormAct(channels, channels, norm, dilation=dilation, act=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class _GlobalContext(nn.Module):
    """Add an MLP of the crop's mean feature vector to every cell: a whole-crop receptive field."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.LeakyReLU(0.01, inplace=True),
                                 nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x.mean(dim=(2, 3, 4)))[:, :, None, None, None]


class BodyPartRegressor(nn.Module):
    """3D CNN: (B, C, z, y, x) CT -> (B, 3, z/sz, y/sy, x/sx) body coordinates (LR, AP, CC).

    ``strides`` has one per-axis (z, y, x) stride per encoder stage (``depth`` stages; default
    ``[[1,2,2],[2,2,2],[2,2,2]]`` truncated/extended with ``[2,2,2]``); channels are
    ``width * 2**stage`` (width, 2 width, 4 width, ...).  ``total_stride`` is their per-axis product;
    inputs should be multiples of it (``predict_coordinates`` pads; training crops must be, for the
    losses' position convention).  ``norm``: "none" (default) or "group" (see module docstring).
    ``config()`` returns the constructor arguments, for checkpoints loaded with ``weights_only=True``.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, depth: int = 3, strides: list[list[int]] | None = None,
                 *, norm: str = "none"):
        super().__init__()
        if norm not in ("none", "group"):
            raise ValueError(f"norm must be 'none' or 'group', got {norm!r}")
        if strides is None:
            strides = [list(s) for s in DEFAULT_STRIDES[:depth]] + [[2, 2, 2]] * max(0, depth - len(DEFAULT_STRIDES))
        strides = [[int(v) for v in s] for s in strides]
        if len(strides) != depth or any(len(s) != 3 or min(s) < 1 for s in strides):
            raise ValueError(f"strides must be {depth} (= depth) lists of three positive ints, got {strides}")
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be positive, got {width}, {in_channels}")
        self.in_channels, self.width, self.depth, self.norm = in_channels, width, depth, norm
        self.strides = strides
        self.total_stride: tuple[int, int, int] = tuple(math.prod(s[a] for s in strides) for a in range(3))

        self.stem = _ConvNormAct(in_channels, width, norm)
        stages, ch = [], width
        for i, s in enumerate(strides):
            cout = width * 2 ** i
            stages.append(nn.Sequential(_ConvNormAct(ch, cout, norm, stride=s), _ResBlock(cout, norm)))
            ch = cout
        self.encoder = nn.Sequential(*stages)
        # Context at the lowest resolution: dilations 2 and 4 widen the local view cheaply,
        # the global branch hands every cell a summary of the whole crop.
        self.context = nn.Sequential(_ResBlock(ch, norm, dilation=2), _ResBlock(ch, norm, dilation=4),
                                     _GlobalContext(ch), _ResBlock(ch, norm))
        self.head = nn.Sequential(nn.Conv3d(ch, ch, 1), nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(ch, 3, 1))

    def config(self) -> dict:
        """Constructor arguments as plain JSON-able values: ``BodyPartRegressor(**model.config())``."""
        return {"in_channels": self.in_channels, "width": self.width, "depth": self.depth,
                "strides": [list(s) for s in self.strides], "norm": self.norm}

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, z, y, x) -> (B, 3, ceil(z/sz), ceil(y/sy), ceil(x/sx)); channels (LR, AP, CC)."""
        return self.head(self.context(self.encoder(self.stem(x))))


@torch.no_grad()
def predict_coordinates(model: BodyPartRegressor, volume: np.ndarray | Tensor,
                        patch_size: tuple[int, int, int] | None = None, full_resolution: bool = True,
                        *, pad_value: float = -1.0, tile_batch: int = 8) -> Tensor:
    """Body coordinates of a whole volume (C, z, y, x) or (z, y, x): (3, z, y, x) float32, or low-res.

    Without ``patch_size`` (or when the volume fits into one patch) it is one forward pass on the
    volume padded with ``pad_value`` at the high end of each axis, to a multiple of
    ``total_stride`` (and to ``patch_size``, so context statistics match training).  Otherwise a
    sliding window with half-patch overlap, window starts on the low-res grid, combined by a
    Gaussian-weighted average on the low-res map.  ``patch_size`` must be a multiple of
    ``total_stride``.  Windows go through the network ``tile_batch`` at a time (same result to
    float rounding; faster, the BPR's convolutions being small).

    ``full_resolution``: trilinear upsampling (align_corners=False, i.e. low-res cell ``p`` sits at
    voxel ``p * stride + (stride - 1) / 2``, the convention the losses use) and cropping to the
    volume's shape; otherwise the low-res map of the padded volume, shape
    ``ceil(shape / total_stride)``.  Runs in eval mode without gradients (the model's training
    flag is restored), on the model's device; deterministic.
    """
    param = next(model.parameters())
    x = torch.as_tensor(volume).to(device=param.device, dtype=param.dtype)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"volume must be (C, z, y, x) or (z, y, x), got shape {tuple(x.shape)}")
    shape = tuple(x.shape[1:])
    stride = model.total_stride
    if patch_size is not None:
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or any(p % s for p, s in zip(patch_size, stride, strict=True)):
            raise ValueError(f"patch_size {patch_size} must be three multiples of total_stride {stride}")
    target = tuple(math.ceil(n / s) * s for n, s in zip(shape, stride, strict=True))
    if patch_size is not None:
        target = tuple(max(t, p) for t, p in zip(target, patch_size, strict=True))
    pad = [v for t, n in zip(reversed(target), reversed(shape), strict=True) for v in (0, t - n)]
    x = F.pad(x, pad, value=pad_value)[None]  # (1, C, *target)

    was_training = model.training
    model.eval()
    try:
        if patch_size is None or all(t <= p for t, p in zip(target, patch_size, strict=True)):
            low = model(x)[0]
        else:
            # The probe's tile loop (diffprobe.models.tiling): windows on multiples of the
            # stride, a separable Gaussian on the low-res output, tile_batch windows per forward
            # (small convolutions amortise per-call costs).
            patch_low = tuple(p // s for p, s in zip(patch_size, stride, strict=True))
            starts = [window_starts(t, p, max(p // 2, s), align=s)
                      for t, p, s in zip(target, patch_size, stride, strict=True)]
            pz, py, px = patch_size

            def predict_batch(chunk: list[tuple[int, int, int]]) -> Tensor:
                return model(torch.cat([x[..., sz:sz + pz, sy:sy + py, sx:sx + px] for sz, sy, sx in chunk]))

            low = tile_average(list(itertools.product(*starts)), predict_batch, 3, target, patch_size,
                               separable_gaussian(patch_low, x.device), stride=stride, batch_size=tile_batch,
                               device=x.device)
    finally:
        model.train(was_training)

    low = low.float()
    if not full_resolution:
        return low
    full = F.interpolate(low[None], size=target, mode="trilinear", align_corners=False)[0]
    return full[:, : shape[0], : shape[1], : shape[2]].contiguous()
