"""The body part regressor: a small 3D CNN mapping CT to 3D body coordinates, and its inference.

Output channels, in **world-axis order** (not numpy order!):

* channel 0 = left-right (LR, along array axis x; grows towards patient left),
* channel 1 = anterior-posterior (AP, along y; grows towards posterior),
* channel 2 = cranio-caudal (CC, along z; grows towards superior),

in units of ``scale_per_mm`` (the trainer's choice, e.g. 0.01/mm: 100 mm = 1 unit), on the
output grid (``total_stride`` voxels per output cell).

How a crop's coordinates are made (docs/bpr.md has the measurements behind each choice):

* **Known geometry** (``units_per_voxel`` = scale per mm x spacing, a buffer set by the trainer):
  inside one crop the coordinates of two voxels differ by their physical displacement, which is
  known exactly — so the model does not have to learn it, it adds the ramp
  ``units_per_voxel * (voxel - crop centre)`` per axis.
* **Position of the crop** (what has to be learnt): one 3-vector per crop, the body coordinate of
  the crop centre, from the mean of the features (a whole-crop receptive field). A voxel's level
  in the body is not visible locally; it has to be read off the surrounding anatomy, and a
  per-crop vector can use features that vary within the crop (lung here, liver there) without
  making the map uneven. Two crops of one scan agree exactly when their position vectors differ
  by the crops' displacement — what the losses train — so whole-volume inference from tiles has
  no seams when the model is right, and the seams it does show measure how wrong it is
  (``diffprobe.bpr.evaluate.tile_disagreement``).
* Optionally (``local_head=True``) a per-cell correction on top (non-rigid anatomy); off by
  default: on CPU budgets it only added noise.
* **Wide, coarse input**: the input is average-pooled (``input_pool``, default 2x4x4) before the
  convolutions, so a crop that holds whole axial slices costs what a patch at full resolution
  would. BatchNorm (running statistics at inference: no per-crop normalisation, which would
  subtract exactly the position cues). No coordinate channels: the crop's own position in the
  array says nothing about the anatomy.

``predict_coordinates(..., patch_size=<training crop size>)`` gives inference the context of training.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffprobe.models.group_norm import GroupNorm
from diffprobe.models.tiling import separable_gaussian, tile_average, window_starts

DEFAULT_STRIDES = [[1, 2, 2], [2, 2, 2], [2, 2, 2]]
DEFAULT_INPUT_POOL = [2, 4, 4]  # average-pool the input (z, y, x) first: a wide field of view at the same cost
DEFAULT_OUTPUT_STRIDE = [1, 4, 4]  # output grid (z, y, x); cheap, the map is the known ramp plus one vector
DEFAULT_NORM = "batch"
NORMS = ("batch", "group", "none")


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, with at least 2 channels per group (1 group for tiny widths)."""
    for g in (8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return GroupNorm(_groups(channels), channels)
    return nn.Identity()


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, stride: list[int] | int = 1, dilation: int = 1,
                 act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=norm == "none"),
            _norm(norm, cout),
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


def _triple(values, name: str, default: list[int]) -> list[int]:
    out = list(default) if values is None else [int(v) for v in values]
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"{name} must be three positive ints (z, y, x), got {values}")
    return out


class BodyPartRegressor(nn.Module):
    """3D CNN: (B, C, z, y, x) CT -> (B, 3, z/oz, y/oy, x/ox) body coordinates (LR, AP, CC).

    Features: input average-pooled by ``input_pool``, a stem conv, ``depth`` stages (strided conv +
    residual block; channels ``width * 2**stage``; ``strides`` default ``[[1,2,2],[2,2,2],[2,2,2]]``
    truncated/extended with ``[2,2,2]``), dilated residual blocks and a global-context block.
    ``feature_stride`` = input_pool x strides. Output on the grid of ``total_stride`` (=
    ``output_stride``, which should divide ``feature_stride``): ramp (``units_per_voxel``) + crop
    position (MLP of the mean feature) [+ local head, upsampled]. Inputs should be multiples of
    ``feature_stride`` (training crops must be multiples of ``total_stride``, for the losses'
    position convention; ``predict_coordinates`` pads to multiples of ``total_stride``).
    ``norm``: "batch" (default), "group" or "none". ``config()`` returns the constructor
    arguments, for checkpoints loaded with ``weights_only=True``; ``units_per_voxel`` is also a
    buffer, so ``load_state_dict`` restores it into a model built without it.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, depth: int = 3, strides: list[list[int]] | None = None,
                 *, norm: str = DEFAULT_NORM, units_per_voxel: list[float] | None = None,
                 input_pool: list[int] | None = None, output_stride: list[int] | None = None,
                 local_head: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if strides is None:
            strides = [list(s) for s in DEFAULT_STRIDES[:depth]] + [[2, 2, 2]] * max(0, depth - len(DEFAULT_STRIDES))
        strides = [[int(v) for v in s] for s in strides]
        if len(strides) != depth or any(len(s) != 3 or min(s) < 1 for s in strides):
            raise ValueError(f"strides must be {depth} (= depth) lists of three positive ints, got {strides}")
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be positive, got {width}, {in_channels}")
        pool = _triple(input_pool, "input_pool", DEFAULT_INPUT_POOL)
        out_stride = _triple(output_stride, "output_stride", DEFAULT_OUTPUT_STRIDE)
        upv = [0.0, 0.0, 0.0] if units_per_voxel is None else [float(v) for v in units_per_voxel]
        if len(upv) != 3:
            raise ValueError(f"units_per_voxel must be three numbers (z, y, x), got {units_per_voxel}")
        self.in_channels, self.width, self.depth, self.norm = in_channels, width, depth, norm
        self.strides, self.input_pool, self.output_stride = strides, pool, out_stride
        self.local_head = bool(local_head)
        self.feature_stride: tuple[int, int, int] = tuple(pool[a] * math.prod(s[a] for s in strides)
                                                          for a in range(3))
        self.total_stride: tuple[int, int, int] = tuple(out_stride)

        self.stem = _ConvNormAct(in_channels, width, norm)
        stages, ch = [], width
        for i, s in enumerate(strides):
            cout = width * 2 ** i
            stages.append(nn.Sequential(_ConvNormAct(ch, cout, norm, stride=s), _ResBlock(cout, norm)))
            ch = cout
        self.encoder = nn.Sequential(*stages)
        # Context at the lowest resolution: dilations 2 and 4 widen the local view cheaply,
        # the global block hands every cell a summary of the whole crop.
        self.context = nn.Sequential(_ResBlock(ch, norm, dilation=2), _ResBlock(ch, norm, dilation=4),
                                     _GlobalContext(ch), _ResBlock(ch, norm))
        self.position = nn.Sequential(nn.Linear(2 * ch, ch), nn.LeakyReLU(0.01, inplace=True), nn.Linear(ch, 3))
        self.vote = nn.Sequential(nn.Conv3d(ch, ch, 1), nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(ch, 6, 1))
        self.head = nn.Sequential(nn.Conv3d(ch, ch, 1), nn.LeakyReLU(0.01, inplace=True),
                                  nn.Conv3d(ch, 3, 1)) if self.local_head else None
        # coordinate units per voxel along (z, y, x): scale_per_mm * spacing; zeros = no ramp
        self.register_buffer("units_per_voxel", torch.tensor(upv, dtype=torch.float32))

    def config(self) -> dict:
        """Constructor arguments as plain JSON-able values: ``BodyPartRegressor(**model.config())``."""
        return {"in_channels": self.in_channels, "width": self.width, "depth": self.depth,
                "strides": [list(s) for s in self.strides], "norm": self.norm,
                "units_per_voxel": [float(v) for v in self.units_per_voxel], "input_pool": list(self.input_pool),
                "output_stride": list(self.output_stride), "local_head": self.local_head}

    def ramp(self, out_shape: tuple[int, int, int], device=None, dtype=torch.float32,
             stride: tuple[int, int, int] | None = None) -> Tensor:
        """(1, 3, *out_shape): ``units_per_voxel`` x each output cell's voxel offset from the grid centre,
        channels (LR, AP, CC) along (x, y, z); cell ``p`` stands for voxel ``p * stride + (stride - 1) / 2``."""
        axes = []
        for a, (n, s) in enumerate(zip(out_shape, stride or self.total_stride, strict=True)):
            t = (torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) * s * self.units_per_voxel[a]
            shape = [1, 1, 1]
            shape[a] = n
            axes.append(t.reshape(shape).expand(*out_shape))
        return torch.stack(axes[::-1])[None].to(dtype)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, z, y, x) -> (B, channels, z/fz, y/fy, x/fx) at ``feature_stride``."""
        if self.input_pool != [1, 1, 1]:
            x = F.avg_pool3d(x, self.input_pool, ceil_mode=True)
        return self.context(self.encoder(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, z, y, x) -> (B, 3, ceil(z/oz), ceil(y/oy), ceil(x/ox)); channels (LR, AP, CC)."""
        out_shape = tuple(math.ceil(n / s) for n, s in zip(x.shape[2:], self.total_stride, strict=True))
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)  # what is where; what is there
        g = self.position(pooled)
        v = self.vote(f)
        votes = (v[:, :3] - self.ramp(tuple(f.shape[2:]), f.device, f.dtype, self.feature_stride)).flatten(2)
        g = g + (torch.softmax(v[:, 3:].flatten(2), dim=-1) * votes).sum(-1)
        out = g[:, :, None, None, None].expand(-1, -1, *out_shape)
        if self.head is not None:
            local = self.head(f)
            if tuple(local.shape[2:]) != out_shape:
                local = F.interpolate(local, size=out_shape, mode="trilinear", align_corners=False)
            out = out + local
        return out + self.ramp(out_shape, out.device, out.dtype)


@torch.no_grad()
def predict_coordinates(model: BodyPartRegressor, volume: np.ndarray | Tensor,
                        patch_size: tuple[int, int, int] | None = None, full_resolution: bool = True,
                        *, pad_value: float = -1.0, tile_batch: int = 8) -> Tensor:
    """Body coordinates of a whole volume (C, z, y, x) or (z, y, x): (3, z, y, x) float32, or low-res.

    Without ``patch_size`` (or when the volume fits into one patch) it is one forward pass on the
    volume padded to a multiple of ``total_stride`` (and to ``patch_size``, so context statistics
    match training).  In-plane the padding is ``pad_value`` (air) at the high end; along z the end
    slices are repeated (the body goes on above and below a scan), and a volume thinner than the
    patch is centred in it. Why: with air below it, a thin scan looks like the end of a body and its
    cranio-caudal coordinate is badly off. Measured on the real CTs (slabs of 9 slices at 3 mm cut
    from long scans, alone vs inside the whole scan; ``docs/bpr.md``): mean error 145-175 mm with air
    at the high end, 21-29 mm with repeated slices; with 20 slices 52-73 mm vs 12-24 mm.  Otherwise a
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
    before_z = (target[0] - shape[0]) // 2 if patch_size is not None and shape[0] < patch_size[0] else 0
    x = F.pad(x[None], (0, 0, 0, 0, before_z, target[0] - shape[0] - before_z), mode="replicate")
    x = F.pad(x, (0, target[2] - shape[2], 0, target[1] - shape[1]), value=pad_value)  # (1, C, *target)

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
    return full[:, before_z: before_z + shape[0], : shape[1], : shape[2]].contiguous()
