"""The DDPM epsilon-prediction denoiser: a 3D UNet built from the plans' ``network`` section.

Why it looks the way it does (paper: "Medical Semantic Segmentation with Diffusion Pretrain",
arXiv 2501.19265): the denoiser is pretrained on unlabelled CT with body-part-regression (BPR)
coordinates as guidance, then frozen; a probe reads its decoder features. So

- the topology (per-axis strides, channels, attention kind per level) comes from the planner,
  nnU-Net style, and the UNet never invents its own: CT is anisotropic, and only the axes
  with stride 2 are halved (strided conv / transposed conv with kernel = stride);
- guidance channels are concatenated to the noisy input, so the features know *where* in the
  body they are;
- every decoder level is a named feature tap (``dec0`` finest .. ``dec{L-1}`` bottleneck), and
  ``max_level`` stops the decoder early when a probe only reads coarse levels.

Level structure (L levels, ``B`` = ``blocks_per_level``)::

    stem conv -> enc0: B res blocks + attn
              -> down(stride_1) -> enc1: B res blocks + attn -> ... -> enc{L-1}
    dec{L-1} = B res blocks + attn on enc{L-1}            (the bottleneck's second half)
    dec{l}   = up(dec{l+1}) ++ enc{l} -> B res blocks + attn   (l < L-1)
    eps      = GroupNorm -> SiLU -> conv(dec0)

The timestep enters every residual block as a FiLM scale/shift after its second GroupNorm;
the last conv of each block and the output conv are zero-initialised so the untrained net is
close to identity-plus-zero and early training is stable.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffprobe.models.attention import (
    ATTENTION_KINDS,
    Attention3d,
    add_residual,
    make_attention,
    num_groups,
    pointwise,
)
from diffprobe.models.group_norm import GroupNorm

ATTENTION_MODES = ("planned", "none", *ATTENTION_KINDS)
# Kernel sizes (first conv, second conv) of the residual block that replaces each attention block
# when attention="none". Pointwise (1x1x1): such a block has ~2C^2 weights (+ its timestep FiLM)
# against attention's 4C^2, so the attention-free net stays within ~1-15% of the planned one's
# parameters and FLOPs for any blocks_per_level. A full 3x3x3 block would add ~40% parameters
# (27C^2 per conv dwarfs attention), (3, 1) ~20% at 2 blocks per level but ~37% at 1.
MIX_KERNEL: tuple[int, int] = (1, 1)


_ONEDNN = torch.backends.mkldnn.is_available()


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that sends batch-1 float32 CPU convolutions to oneDNN.

    PyTorch's backend heuristic picks its naive ``slow_conv3d`` kernel for a batch of one when
    ``C * z * y <= 20480`` -- i.e. exactly the small-channel, full-resolution levels of this net at
    sliding-window inference on CPU -- which is ~8x slower than oneDNN there. Same maths, same
    autograd; every other case (GPU, autocast, meta, batches > 1, 1x1x1 kernels, ``torch.compile``,
    which picks its own kernels) is untouched.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and input.shape[0] == 1 and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and max(self.kernel_size) > 1
                and _ONEDNN and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
            return torch.ops.aten.mkldnn_convolution(input, weight, bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM/Transformer sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim).

    Computed in float32 whatever the autocast dtype, because the high frequencies of a
    t in [0, 1000) are not representable in bf16.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-Conv twice, timestep FiLM after the second norm, residual (1x1x1 skip if channels change).

    ``kernel_size`` is 3 (or a (first, second) pair) for the ordinary blocks; the attention-free
    variant of the net uses :data:`MIX_KERNEL` blocks in place of attention.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int = 8,
                 kernel_size: tuple[int, int] | int = 3) -> None:
        super().__init__()
        k1, k2 = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.norm1 = GroupNorm(num_groups(in_channels, groups), in_channels)
        self.conv1 = Conv3d(in_channels, out_channels, k1, padding=k1 // 2)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = GroupNorm(num_groups(out_channels, groups), out_channels)
        self.conv2 = Conv3d(out_channels, out_channels, k2, padding=k2 // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        if not torch.is_grad_enabled():
            # inference: the same maths with fewer full-size temporaries (SiLU in place, FiLM as one
            # addcmul, residual added in place): the `cpu` class's predict forward took 0.88x the time
            # on 2 threads, the same on 1 (docs/performance.md, "In-place inference"); training keeps
            # autograd's ops
            h = self.conv1(F.silu(self.norm1(x), inplace=True))
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
            return add_residual(self.conv2(F.silu(h, inplace=True)), self._skip(x))
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self._skip(x) + h

    def _skip(self, x: Tensor) -> Tensor:
        return pointwise(self.skip, x) if isinstance(self.skip, nn.Conv3d) else self.skip(x)


class Stage(nn.Module):
    """One level's half: ``blocks`` residual blocks then attention (or its convolutional stand-in)."""

    def __init__(self, in_channels: int, channels: int, blocks: int, emb_dim: int, attention: str,
                 num_heads: int, groups: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock3d(in_channels if i == 0 else channels, channels, emb_dim, groups) for i in range(blocks)
        )
        self.attn: nn.Module
        if attention == "none":
            # Attention-free stand-in: one more (pointwise) residual block of about attention's size,
            # so the capacity comparison changes the token mixing, not the parameter budget.
            self.attn = ResBlock3d(channels, channels, emb_dim, groups, kernel_size=MIX_KERNEL)
        else:
            self.attn = make_attention(attention, channels, num_heads, groups)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, emb)
        if isinstance(self.attn, ResBlock3d):
            return self.attn(x, emb)
        return self.attn(x)


class DiffusionUNet(nn.Module):
    """Timestep-conditioned 3D UNet predicting the DDPM noise epsilon, with decoder feature taps.

    Args:
        in_channels: image channels (the noised channels; epsilon has as many).
        guidance_channels: extra conditioning channels concatenated to the input (BPR coordinates);
            0 disables guidance.
        levels: the plans' ``network.levels`` (dicts with ``stride_from_previous``, ``channels``,
            ``attention``; other keys are ignored).
        blocks_per_level: residual blocks per encoder and per decoder stage.
        attention: ``"planned"`` (each level's planned kind), ``"linear"`` / ``"softmax"`` (force one
            kind everywhere), or ``"none"`` (pure convolution: each attention block becomes one more
            residual block of :data:`MIX_KERNEL` kernels, for the backbone-capacity comparison).
        num_heads: attention heads (reduced to a divisor of the channels where needed).
        groups: GroupNorm groups (reduced to a divisor of the channels where needed).

    Attributes:
        feature_channels: ``{"dec0": C0, ..., "dec{L-1}": C_{L-1}}``.
        feature_strides: cumulative per-axis (z, y, x) stride of each tap relative to the input.
        total_stride: per-axis factor every input spatial size must be divisible by.
    """

    def __init__(self, in_channels: int, guidance_channels: int, levels: list[dict], blocks_per_level: int = 2,
                 attention: str = "planned", num_heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if not levels:
            raise ValueError("the network needs at least one level")
        if blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}")
        self.in_channels = in_channels
        self.guidance_channels = guidance_channels
        self.attention = attention
        self.num_levels = len(levels)
        self.channels = [int(lv["channels"]) for lv in levels]
        self.strides = [tuple(int(s) for s in lv["stride_from_previous"]) for lv in levels]
        if any(s not in (1, 2) for st in self.strides for s in st) or self.strides[0] != (1, 1, 1):
            raise ValueError(f"strides must be 1 or 2 per axis and level 0's (1, 1, 1); got {self.strides}")
        kinds = [attention if attention != "planned" else str(lv.get("attention", "linear")) for lv in levels]
        self.level_attention = kinds

        cumulative = [1, 1, 1]
        self.feature_strides: dict[str, tuple[int, ...]] = {}
        for i, st in enumerate(self.strides):
            cumulative = [c * s for c, s in zip(cumulative, st)]
            self.feature_strides[f"dec{i}"] = tuple(cumulative)
        self.total_stride = tuple(cumulative)
        self.feature_channels: dict[str, int] = {f"dec{i}": c for i, c in enumerate(self.channels)}

        c0 = self.channels[0]
        self.embed_dim = max(c0, 32)
        emb_dim = 4 * self.embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(self.embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = Conv3d(in_channels + guidance_channels, c0, 3, padding=1)

        def stage(cin: int, i: int) -> Stage:
            return Stage(cin, self.channels[i], blocks_per_level, emb_dim, kinds[i], num_heads, groups)

        self.down = nn.ModuleList([nn.Identity()])
        self.encoder = nn.ModuleList([stage(c0, 0)])
        for i in range(1, self.num_levels):
            st = self.strides[i]
            self.down.append(nn.Conv3d(self.channels[i - 1], self.channels[i], kernel_size=st, stride=st))
            self.encoder.append(stage(self.channels[i], i))
        # decoder[i] / up[i] belong to level i; the bottleneck (last level) has no upsampling or skip.
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(self.num_levels):
            if i == self.num_levels - 1:
                self.up.append(nn.Identity())
                self.decoder.append(stage(self.channels[i], i))
            else:
                st = self.strides[i + 1]
                self.up.append(nn.ConvTranspose3d(self.channels[i + 1], self.channels[i], kernel_size=st, stride=st))
                self.decoder.append(stage(2 * self.channels[i], i))
        self.out_norm = GroupNorm(num_groups(c0, groups), c0)
        self.out_conv = Conv3d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @classmethod
    def from_plans(cls, plans: dict, attention: str = "planned", channel_scale: float = 1.0,
                   num_heads: int = 4, groups: int = 8) -> DiffusionUNet:
        """Build from a plans dict; ``channel_scale`` shrinks/grows every level (multiples of ``groups``)."""
        net = plans["network"]
        levels = [dict(lv, channels=scale_channels(int(lv["channels"]), channel_scale, groups))
                  for lv in net["levels"]]
        return cls(int(net["input_channels"]), int(net.get("guidance_channels", 0)), levels,
                   blocks_per_level=int(net.get("blocks_per_level", 2)), attention=attention,
                   num_heads=num_heads, groups=groups)

    def _check_inputs(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x_noisy must be (B, {self.in_channels}, z, y, x), got {tuple(x.shape)}")
        bad = [s for s, k in zip(x.shape[2:], self.total_stride) if s % k]
        if bad:
            raise ValueError(f"spatial shape {tuple(x.shape[2:])} must be divisible by the total stride "
                             f"{self.total_stride} (z, y, x)")
        if self.guidance_channels == 0:
            if guidance is not None:
                raise ValueError("this network was built with guidance_channels=0 but guidance was given")
            return x
        if guidance is None:
            raise ValueError(f"this network needs guidance: a (B, {self.guidance_channels}, z, y, x) tensor "
                             "(BPR coordinates) with the spatial shape of x_noisy")
        if guidance.shape[0] != x.shape[0] or guidance.shape[1] != self.guidance_channels \
                or guidance.shape[2:] != x.shape[2:]:
            raise ValueError(f"guidance must be (B, {self.guidance_channels}, z, y, x) = "
                             f"{(x.shape[0], self.guidance_channels, *x.shape[2:])}, got {tuple(guidance.shape)}")
        return torch.cat([x, guidance.to(x.dtype)], dim=1)

    def forward(self, x_noisy: Tensor, t: Tensor, guidance: Tensor | None = None,
                return_features: bool = False, max_level: int | None = None, return_output: bool = True
                ) -> Tensor | tuple[Tensor | None, dict[str, Tensor]]:
        """Predict epsilon, optionally with the decoder feature taps.

        Args:
            x_noisy: (B, in_channels, z, y, x), spatial sizes divisible by ``total_stride``.
            t: timesteps, shape (B,) or scalar (broadcast over the batch); int or float.
            guidance: (B, guidance_channels, z, y, x) when the net has guidance channels.
            return_features: also return ``{"dec{l}": tensor}`` for the decoder levels run.
            max_level: run the decoder only down to level ``max_level`` (features
                ``dec{max_level}`` .. ``dec{L-1}``); for ``max_level > 0`` epsilon is not computed and
                ``None`` is returned in its place (needs ``return_features=True``).
            return_output: with ``return_features=True``, ``False`` skips epsilon (``None`` in its
                place): the full-resolution output norm and 3x3x3 convolution that a feature reader
                (the probe) never uses.

        Returns:
            epsilon, or ``(epsilon | None, features)`` with ``return_features=True``.
        """
        stop = 0 if max_level is None else int(max_level)
        if not 0 <= stop < self.num_levels:
            raise ValueError(f"max_level must be in [0, {self.num_levels - 1}], got {max_level}")
        if (stop > 0 or not return_output) and not return_features:
            raise ValueError("max_level > 0 and return_output=False skip the output; use return_features=True")
        h = self._check_inputs(x_noisy, guidance)
        if t.dim() == 0:
            t = t.expand(x_noisy.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.embed_dim))

        h = self.stem(h)
        skips = []
        for down, enc in zip(self.down, self.encoder):
            h = enc(down(h), emb)
            skips.append(h)

        features: dict[str, Tensor] = {}
        last = self.num_levels - 1
        for i in range(last, stop - 1, -1):
            if i < last:
                h = torch.cat([self.up[i](h), skips[i]], dim=1)
            h = self.decoder[i](h, emb)
            features[f"dec{i}"] = h

        eps = self.out_conv(F.silu(self.out_norm(h))) if stop == 0 and return_output else None
        if return_features:
            return eps, features
        return eps

    def attention_modules(self) -> list[Attention3d]:
        """All attention blocks (empty for ``attention="none"``)."""
        return [m for m in self.modules() if isinstance(m, Attention3d)]


def scale_channels(channels: int, scale: float, groups: int = 8) -> int:
    """``channels * scale`` rounded to a multiple of ``groups``, at least ``groups``."""
    return max(groups, int(round(channels * scale / groups)) * groups)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def forward_flops(model: nn.Module, input_shape: tuple[int, ...] | list[int], t: int = 0) -> int:
    """Approximate FLOPs (2 x multiply-accumulates) of one forward pass at ``input_shape`` (B, C, z, y, x).

    Counts Conv3d, ConvTranspose3d, Linear and the attention head matmuls (biases, norms and
    activations are ignored -- a few percent). Runs on a ``meta``-device copy of the model, so it
    is instant and allocates nothing even for full-size patches. A :class:`DiffusionUNet` is
    called with timestep ``t`` and zero guidance; any other module with the input alone.
    """
    counted: list[int] = [0]

    def conv_hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if isinstance(mod, nn.ConvTranspose3d):
            macs = inp[0].numel() * (mod.out_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.Conv3d):
            macs = out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        else:  # Linear
            macs = out.numel() * mod.in_features
        counted[0] += 2 * macs

    def attn_hook(mod: Attention3d, inp: tuple[Tensor, ...], out: Tensor) -> None:
        x = inp[0]
        counted[0] += 2 * mod.attention_macs(x.shape[0], math.prod(x.shape[2:]))

    try:
        probe = copy.deepcopy(model).to("meta")
        device = torch.device("meta")
    except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic modules
        probe, device = model, next(model.parameters()).device
    handles = []
    for mod in probe.modules():
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, Attention3d):
            handles.append(mod.register_forward_hook(attn_hook))
    shape = tuple(int(s) for s in input_shape)
    x = torch.zeros(shape, device=device)
    try:
        with torch.no_grad():
            if isinstance(probe, DiffusionUNet):
                g = None
                if probe.guidance_channels:
                    g = torch.zeros((shape[0], probe.guidance_channels, *shape[2:]), device=device)
                probe(x, torch.full((shape[0],), t, device=device), g)
            else:
                probe(x)
    finally:
        for handle in handles:
            handle.remove()
    return counted[0]
