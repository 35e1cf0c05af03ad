"""Self-attention blocks over the voxels of a 3D feature map.

Both blocks are residual and pre-norm: ``x + proj(attend(qkv(norm(x))))``. They differ only in
how the heads attend, which is why they share :class:`Attention3d`:

- :class:`LinearAttention3d` is "efficient attention" (Shen et al. 2021, "Efficient Attention:
  Attention with Linear Complexities"): q is softmax-normalised over the channels of its head,
  k over the tokens, and the product is reassociated as ``q (k^T v)``. The d x d context per
  head makes the cost O(N d^2) instead of O(N^2 d), which is what makes attention affordable
  on the fine levels of a 3D UNet (tens of thousands of voxels).
- :class:`SoftmaxAttention3d` is standard ``softmax(q k^T / sqrt(d)) v`` through
  :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels
  where available). The planner uses it where tokens <= channels, where it is the cheaper one.

Layout: heads are kept as (B, heads, d, N) -- channels-major, the layout a (B, C, z, y, x)
map reshapes to without copying -- so the linear variant never transposes an N-sized tensor.
The output projection is *not* zero-initialised: the residual already makes the block start
close to identity, and a zero projection would leave q/k/v without gradient at the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffprobe.models.group_norm import GroupNorm, is_channels_last  # noqa: F401 - re-exported

ATTENTION_KINDS = ("linear", "softmax")


def num_groups(channels: int, groups: int) -> int:
    """GroupNorm group count: ``groups`` when it divides ``channels``, else their gcd (never fails)."""
    return math.gcd(channels, groups) or 1


def num_heads_for(channels: int, num_heads: int) -> int:
    """Head count that divides ``channels`` (the gcd), so odd channel counts still build."""
    return math.gcd(channels, num_heads) or 1


def add_residual(h: Tensor, residual: Tensor) -> Tensor:
    """``residual + h``, into ``h`` where that gives the same result (same dtype: under autocast a
    bfloat16 ``h`` must not pull a float32 residual stream down to its precision)."""
    return h.add_(residual) if h.dtype == residual.dtype and h.shape == residual.shape else residual + h


def pointwise(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A 1x1x1 convolution; on a channels_last_3d map a matrix product on its (B, z, y, x, C) view, whose
    result is again channels_last_3d (CPU convolutions of small batches copied the layout around it)."""
    if not is_channels_last(x):
        return conv(x)
    out = F.linear(x.permute(0, 2, 3, 4, 1), conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)
    return out.permute(0, 4, 1, 2, 3)


class Attention3d(nn.Module):
    """Shared pre-norm residual multi-head attention over a (B, C, z, y, x) map; subclasses define :meth:`attend`.

    The qkv projection is one 1x1x1 convolution producing channels ordered [q | k | v], each split
    into ``heads`` contiguous groups of ``head_dim`` channels (see :meth:`split_heads`).
    """

    kind: str = ""

    def __init__(self, channels: int, num_heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.heads = num_heads_for(channels, num_heads)
        self.head_dim = channels // self.heads
        self.norm = GroupNorm(num_groups(channels, groups), channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv3d(channels, channels, kernel_size=1)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of the normalised input, each (B, heads, head_dim, N) with N = z*y*x."""
        b = x.shape[0]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, -1)
        q, k, v = qkv.unbind(1)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if is_channels_last(x):
            return self._forward_tokens(x)
        q, k, v = self.split_heads(x)
        out = self.attend(q, k, v).reshape(x.shape)
        if not torch.is_grad_enabled():  # inference: the residual added in place (ResBlock3d.forward)
            return add_residual(self.proj(out), x)
        return x + self.proj(out)

    def _forward_tokens(self, x: Tensor) -> Tensor:
        """The same block on a channels_last_3d map, token-major throughout.

        A channels_last_3d (B, C, z, y, x) map *is* a (B, N, C) token matrix in memory: the 1x1x1
        projections become matrix products on it (the convolutions' own weights, viewed), heads are
        strided views, and the result is again a channels_last_3d map. The channels-major path
        would copy qkv to channels-first, run the projection on a channels-first map and add a
        channels-first result to a channels_last residual (three layout round trips per block)."""
        b, c = x.shape[:2]
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # a view when norm keeps the layout
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)  # (B, N, 3C)
        # (B, N, 3, heads, d) -> q, k, v as (B, heads, d, N) strided views, the layout attend() takes
        q, k, v = qkv.view(b, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 4, 1).unbind(0)
        out = self.attend(q, k, v)  # (B, heads, d, N)
        out = out.permute(0, 3, 1, 2).reshape(b, -1, c)  # (B, N, C): one copy
        h = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        h = h.view(b, *x.shape[2:], c).permute(0, 4, 1, 2, 3)  # channels_last_3d (B, C, z, y, x)
        if not torch.is_grad_enabled():
            return add_residual(h, x)
        return x + h

    def attention_macs(self, batch: int, tokens: int) -> int:
        """Multiply-accumulates of the head matmuls (not the projections), for FLOP accounting."""
        raise NotImplementedError  # pragma: no cover - abstract


class LinearAttention3d(Attention3d):
    """Efficient attention: ``softmax_d(q) @ (softmax_N(k)^T v)`` per head, cost O(N d^2)."""

    kind = "linear"

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: softmax over the head's channels; k: softmax over the tokens (Shen et al., eq. 5).
        q = q.softmax(dim=-2)
        k = k.softmax(dim=-1)
        # context[i, j] = sum_n k[i, n] v[j, n]  -> (B, h, d_k, d_v)
        context = torch.matmul(k, v.transpose(-1, -2))
        # out[j, n] = sum_i q[i, n] context[i, j] -> (B, h, d_v, N)
        return torch.matmul(context.transpose(-1, -2), q)

    def attention_macs(self, batch: int, tokens: int) -> int:
        # k^T v and q . context: each B * h * N * d * d
        return 2 * batch * self.heads * tokens * self.head_dim * self.head_dim


class SoftmaxAttention3d(Attention3d):
    """Standard scaled dot-product attention per head, cost O(N^2 d)."""

    kind = "softmax"

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # SDPA wants (B, h, N, d); the result goes back to (B, h, d, N).
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2)

    def attention_macs(self, batch: int, tokens: int) -> int:
        # q k^T and A v: each B * h * N * N * d
        return 2 * batch * self.heads * tokens * tokens * self.head_dim


def make_attention(kind: str, channels: int, num_heads: int = 4, groups: int = 8) -> Attention3d:
    """Build the attention block of one level (``kind`` in :data:`ATTENTION_KINDS`)."""
    if kind == "linear":
        return LinearAttention3d(channels, num_heads, groups)
    if kind == "softmax":
        return SoftmaxAttention3d(channels, num_heads, groups)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
