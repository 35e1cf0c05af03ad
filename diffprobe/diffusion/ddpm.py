"""Gaussian diffusion (Ho et al. 2020) with the schedule from plans.json.

Conventions match :mod:`diffprobe.diffusion.schedule`: timesteps are 0-indexed and
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. The denoiser predicts ε. Sampling:
ancestral DDPM (T steps) and deterministic DDIM (Song et al. 2021) with fewer steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffprobe.diffusion import schedule as sch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class GaussianDiffusion:
    """Schedule tensors and the forward/reverse processes (no learnable state)."""

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        betas = torch.as_tensor(sch.betas(schedule, num_timesteps, beta_start, beta_end), dtype=torch.float64)
        self.num_timesteps = num_timesteps
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @classmethod
    def from_plans(cls, plans: dict) -> GaussianDiffusion:
        d = plans["diffusion"]
        return cls(d["schedule"], d["num_timesteps"], d["beta_start"], d["beta_end"])

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = self._on(values, like.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def _on(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``values`` (a schedule tensor) on ``device``, copied once per device: on a GPU every copy from
        host memory made the host wait for the queued kernels (twice per predict tile batch)."""
        if values.device == device:
            return values
        cache = self.__dict__.setdefault("_device_copies", {})
        key = (id(values), str(device))
        if key not in cache:
            cache[key] = values.to(device)
        return cache[key]

    def noise_std(self, t: torch.Tensor | int) -> torch.Tensor:
        return torch.sqrt(1.0 - self.alphas_cumprod[t])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) with the given noise."""
        a = self._gather(self.alphas_cumprod, t, x0)
        return torch.sqrt(a) * x0 + torch.sqrt(1.0 - a) * noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)

    def training_loss(self, model: Denoiser, x0: torch.Tensor, guidance: torch.Tensor | None,
                      t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Simple ε-MSE loss of Ho et al.; t and noise are passed in so runs are reproducible."""
        xt = self.q_sample(x0, t, noise)
        eps = model(xt, t, guidance)
        return torch.mean((eps.float() - noise.float()) ** 2)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self._gather(self.alphas_cumprod, t, xt)
        return (xt - torch.sqrt(1.0 - a) * eps) / torch.sqrt(a)

    @torch.no_grad()
    def ddpm_sample(self, model: Denoiser, shape: tuple[int, ...], guidance: torch.Tensor | None,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                    clip: float = 1.0) -> torch.Tensor:
        """Ancestral sampling over all T steps (posterior variance beta_tilde)."""
        x = torch.randn(shape, generator=generator).to(device)
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), step, dtype=torch.long, device=device)
            eps = model(x, t, guidance).float()
            x0 = self.predict_x0(x, t, eps).clamp(-clip, clip)
            a_t = self._gather(self.alphas_cumprod, t, x)
            a_prev = self._gather(self.alphas_cumprod_prev, t, x)
            beta = self._gather(self.betas, t, x)
            mean = (torch.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (torch.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
            if step > 0:
                var = beta * (1 - a_prev) / (1 - a_t)
                x = mean + torch.sqrt(var) * torch.randn(shape, generator=generator).to(device)
            else:
                x = mean
        return x

    @torch.no_grad()
    def ddim_sample(self, model: Denoiser, shape: tuple[int, ...], guidance: torch.Tensor | None,
                    steps: int = 50, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                    eta: float = 0.0, clip: float = 1.0) -> torch.Tensor:
        """DDIM sampling on an evenly spaced subset of ``steps`` timesteps (eta = 0: deterministic)."""
        x = torch.randn(shape, generator=generator).to(device)
        seq = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()
        for i, step in enumerate(seq):
            t = torch.full((shape[0],), step, dtype=torch.long, device=device)
            eps = model(x, t, guidance).float()
            x0 = self.predict_x0(x, t, eps).clamp(-clip, clip)
            a_t = self._gather(self.alphas_cumprod, t, x)
            if i + 1 < len(seq):
                a_prev = self._gather(self.alphas_cumprod, torch.full_like(t, seq[i + 1]), x)
            else:
                a_prev = torch.ones_like(a_t)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            eps = (x - torch.sqrt(a_t) * x0) / torch.sqrt(1 - a_t)
            x = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1 - a_prev - sigma**2, min=0)) * eps
            if eta > 0 and i + 1 < len(seq):
                x = x + sigma * torch.randn(shape, generator=generator).to(device)
        return x
