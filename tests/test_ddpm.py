"""Forward process statistics and samplers of GaussianDiffusion."""

import torch

from diffprobe.diffusion import GaussianDiffusion


def test_q_sample_statistics():
    diff = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4000, 1, 4, 4, 4), 0.5)
    for step in (0, 10, 60, 500, 999):
        t = torch.full((x0.shape[0],), step, dtype=torch.long)
        xt = diff.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = diff.alphas_cumprod[step].item()
        assert abs(xt.mean().item() - abar**0.5 * 0.5) < 0.01
        assert abs(xt.var().item() - (1 - abar)) < 0.01 * max(1 - abar, 0.05) + 2e-4


def test_samplers_recover_data_with_oracle():
    """With the exact ε of a single data point, DDPM and DDIM sample exactly that point."""
    diff = GaussianDiffusion(num_timesteps=200)
    target = torch.linspace(-0.8, 0.8, 2 * 1 * 2 * 3 * 4).view(2, 1, 2, 3, 4)

    def oracle(x, t, guidance):
        a = diff.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(1)
    ddim = diff.ddim_sample(oracle, target.shape, None, steps=20, generator=g)
    assert torch.allclose(ddim, target, atol=1e-4)
    ddpm = diff.ddpm_sample(oracle, target.shape, None, generator=g)
    assert torch.allclose(ddpm, target, atol=1e-3)


def test_noise_std_matches_plans_convention():
    diff = GaussianDiffusion()
    assert round(diff.noise_std(10).item(), 3) == 0.047 and round(diff.noise_std(60).item(), 3) == 0.204
