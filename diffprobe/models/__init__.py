"""Networks: the DDPM epsilon-prediction 3D UNet and its attention blocks."""

from diffprobe.models.attention import (
    ATTENTION_KINDS,
    Attention3d,
    LinearAttention3d,
    SoftmaxAttention3d,
    make_attention,
)
from diffprobe.models.unet3d import (
    ATTENTION_MODES,
    Conv3d,
    DiffusionUNet,
    ResBlock3d,
    count_parameters,
    forward_flops,
    scale_channels,
    timestep_embedding,
)

__all__ = [
    "ATTENTION_KINDS",
    "ATTENTION_MODES",
    "Attention3d",
    "Conv3d",
    "DiffusionUNet",
    "LinearAttention3d",
    "ResBlock3d",
    "SoftmaxAttention3d",
    "count_parameters",
    "forward_flops",
    "make_attention",
    "scale_channels",
    "timestep_embedding",
]
