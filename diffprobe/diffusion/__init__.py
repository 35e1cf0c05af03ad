"""DDPM: forward process, ε-prediction loss, DDPM and DDIM samplers."""

from diffprobe.diffusion.ddpm import GaussianDiffusion

__all__ = ["GaussianDiffusion"]
