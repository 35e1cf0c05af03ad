"""GroupNorm for large 3D maps on CUDA: statistics as ordinary reductions, no layout copies.

Why: the GPU profile of 2026-11-30 (H200, paper class, docs/performance.md "GPU day 2") found
GroupNorm the largest cost of both the training step and predict's tile forward. PyTorch's CUDA
kernel computes a group's moments with one thread block per (sample, group) row: a 32 x 128 x 128
map with 8 groups and a batch of 6 is 48 rows of 2 M values for 132 multiprocessors, at 0.5 ms per
call (~6x the time its memory traffic needs). It also needs a contiguous (channels-first) input, so
every channels_last_3d map was copied to channels-first and back, and under bf16 autocast it ran in
float32 (a cast copy in, float32 out).

:func:`group_norm` computes the same normalisation from two float32-accumulated reductions (sum and
sum of squares, reduced across the whole grid by PyTorch's split reductions), then one fused
``addcmul`` that writes the input's dtype in the input's memory layout: the tile forward took 0.54x
the time. :class:`GroupNorm` uses it on CUDA in inference only. Under autograd its backward is ~20
small kernels per norm, and the eager training step got slower (112 -> 179 ms), so training keeps the
native op. On the CPU, and for maps that are not 5-D, the module is exactly ``nn.GroupNorm`` (same
kernels, same bits). CPU results do not change, and the native CPU kernel is 4-5x faster than this
path there (channels_last fp32, 2 threads). ``DIFFPROBE_GROUP_NORM=native`` turns the CUDA path off.

Numerics: the variance is ``E[x^2] - E[x]^2`` in float32, clamped at 0. With activations whose
|mean| is not orders of magnitude above their spread this matches the native Welford result to
float32 rounding (tests/test_group_norm.py); under autocast the output is the input's dtype (bf16)
where the native op returned float32 that the next convolution cast to bf16 anyway.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

MODES = ("auto", "native")


def mode() -> str:
    value = os.environ.get("DIFFPROBE_GROUP_NORM", "auto")
    return value if value in MODES else "auto"


_IN_CAPTURED_STEP = [False]


@contextlib.contextmanager
def reduction_under_autograd() -> Iterator[None]:
    """Within: the reduction path under autograd too, for a training step being captured as a CUDA graph
    (``training.graphed_step``). A replayed graph launches its ~20 backward kernels per norm as one; measured
    that way the paper-class step took 43.7 ms, against 76-112 ms eager with the native op (H200, "GPU day 2")."""
    before = _IN_CAPTURED_STEP[0]
    _IN_CAPTURED_STEP[0] = True
    try:
        yield
    finally:
        _IN_CAPTURED_STEP[0] = before


def is_channels_last(x: Tensor) -> bool:
    """A 5-D map stored channels_last_3d (and not also plain contiguous, as 1-channel or 1-voxel maps are)."""
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.group_norm`` of a 5-D map (B, C, z, y, x), contiguous or channels_last_3d, in its layout and dtype.

    Statistics accumulate in float32 whatever the input dtype; autocast is off inside (its float32
    policy for reductions would first copy a bf16 map to float32)."""
    b, c = x.shape[:2]
    cg = c // groups
    if is_channels_last(x):
        v = x.permute(0, 2, 3, 4, 1).reshape(b, -1, groups, cg)  # a view: (B, voxels, G, C/G)
        dims, param_shape = (1, 3), (1, 1, groups, cg)
    else:
        v = x.reshape(b, groups, cg, -1)  # (B, G, C/G, voxels); a view of a contiguous map
        dims, param_shape = (2, 3), (1, groups, cg, 1)
    n = v.shape[dims[0]] * v.shape[dims[1]]
    with torch.autocast(x.device.type, enabled=False):
        mean = v.sum(dims, keepdim=True, dtype=torch.float32) / n
        mean_sq = torch.linalg.vector_norm(v, 2, dims, keepdim=True, dtype=torch.float32).square() / n
        rstd = torch.rsqrt((mean_sq - mean.square()).clamp_min(0) + eps)
        scale = rstd if weight is None else rstd * weight.float().view(param_shape)
        shift = -mean * scale if bias is None else torch.addcmul(bias.float().view(param_shape), -mean, scale)
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            out = torch.addcmul(shift, v, scale).to(x.dtype)
        else:  # one pass: float32 arithmetic, written in the input's dtype and layout
            out_full = torch.empty_like(x)
            target = out_full.permute(0, 2, 3, 4, 1).reshape(v.shape) if dims == (1, 3) else out_full.view(v.shape)
            torch.addcmul(shift, v, scale, out=target)
            return out_full
    if dims == (1, 3):
        return out.view(b, *x.shape[2:], c).permute(0, 4, 1, 2, 3)
    return out.view(x.shape)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) whose CUDA forward on 5-D maps is :func:`group_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        # inference only: under autograd the composite's backward is ~20 small kernels per norm, and the
        # eager training step got slower (112 -> 179 ms, paper class, H200); graphed it was 44 ms, hence
        # the reduction path inside a captured training step (reduction_under_autograd)
        if x.is_cuda and x.dim() == 5 and mode() == "auto" and (
                _IN_CAPTURED_STEP[0] or not torch.is_grad_enabled()):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)
