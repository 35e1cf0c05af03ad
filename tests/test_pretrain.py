"""Pretraining end to end on tiny phantoms: ε-loss decreases, files, guidance, resume rules."""

import pytest
import torch

from diffprobe.cli.app import main
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.planning.view import Plans
from diffprobe.preprocessing.access import preprocessed_cases
from diffprobe.pretraining import data as pdata
from diffprobe.pretraining.pretrain import pretrain
from diffprobe.pretraining.pretrained_model import build_denoiser
from diffprobe.training.checkpoint import load_checkpoint

# run overrides of the planned (size class tiny, see conftest) training values
TINY = {"batch_size": 2, "num_workers": 0, "warmup_steps": 5, "checkpoint_every": 20}


def fixed_eval_loss(model, diffusion, batch, guidance):
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 300, (batch.shape[0],), generator=g)  # the low-noise half the probe reads
    noise = torch.randn(batch.shape, generator=g)
    with torch.no_grad():
        return diffusion.training_loss(model.eval(), batch, guidance, t, noise).item()


def test_eps_loss_decreases(use_phantom_roots):
    result = pretrain(["1"], name="eps", guidance="physical", show_progress=False,
                      overrides={**TINY, "diffusion_steps": 60, "diffusion_lr": 2e-3})
    data_dir, plans, ids = preprocessed_cases(1)
    cfg = Plans(plans)
    src = pdata.PatchBatches(pdata.volume_refs(data_dir, ids), cfg.patch_size, 4, "physical", augment=False, seed=9)
    batch = src.batch(0)
    diffusion = GaussianDiffusion.from_plans(plans)
    untrained = build_denoiser(cfg, "physical", "planned")
    trained = build_denoiser(cfg, "physical", "planned")
    ckpt = load_checkpoint(result.model_dir / "diffusion" / "checkpoint_final.pt")
    trained.load_state_dict(ckpt["model"])
    before = fixed_eval_loss(untrained, diffusion, batch["image"], batch["guidance"])
    after = fixed_eval_loss(trained, diffusion, batch["image"], batch["guidance"])
    assert after < 0.7 * before
    assert ckpt["ema"] is not None and ckpt["config"]["extra"]["guidance"] == "physical"


def test_guidance_none_builds_unguided_model(use_phantom_roots):
    _, plans, _ = preprocessed_cases(1)
    cfg = Plans(plans)
    model = build_denoiser(cfg, "none", "none")
    x = torch.zeros(1, 1, *cfg.patch_size)
    assert model(x, torch.tensor([5])).shape == x.shape
    with pytest.raises(ValueError):
        build_denoiser(cfg, "bpr", "planned")(x, torch.tensor([5]))


def test_pretrain_cli_bpr_then_diffusion(use_phantom_roots):
    args = ["pretrain", "-d", "1", "--name", "cli", "--bpr_steps", "6", "--diffusion_steps", "4",
            "--num_workers", "0", "--batch_size", "2"]
    assert main(args) == 0
    out = use_phantom_roots["results"] / "pretrained" / "cli"
    for f in ("model.json", "bpr/checkpoint_final.pt", "diffusion/checkpoint_final.pt", "bpr_coordinates.png",
              "diffusion/loss_curve.png", "bpr/loss_curve.png"):
        assert (out / f).is_file(), f
    assert len(list((out / "bpr_maps" / "Dataset001_Phantoms").glob("*.b2nd"))) == 5
    # an existing name is refused without --c; --c extends the budget
    assert main(args) == 1
    assert main([*args[:5], "--bpr_steps", "6", "--diffusion_steps", "6", "--num_workers", "0", "--batch_size", "2",
                 "--c"]) == 0
    assert load_checkpoint(out / "diffusion" / "checkpoint_final.pt")["step"] == 6
    # sampling check: DDIM and DDPM patches next to real ones
    assert main(["sample", "--name", "cli", "--steps", "3", "-n", "2"]) == 0
    assert (out / "samples_ddim.png").is_file()


def test_unknown_guidance_is_user_error(use_phantom_roots):
    with pytest.raises(DiffprobeError, match="unknown guidance"):
        pretrain(["1"], name="x", guidance="magic", show_progress=False)


def test_channels_last_gives_same_loss(use_phantom_roots):
    """channels_last_3d is a layout change only: the same step gives the same loss."""
    from diffprobe.pretraining.pretrain import DiffusionLoss

    data_dir, plans, ids = preprocessed_cases(1)
    cfg = Plans(plans)
    batch = pdata.PatchBatches(pdata.volume_refs(data_dir, ids), cfg.patch_size, 2, "physical").batch(0)
    torch.manual_seed(0)
    model = build_denoiser(cfg, "physical", "planned")
    for p in model.parameters():  # leave the zero-init state so the output depends on the input
        torch.nn.init.normal_(p, std=0.02)
    diffusion = GaussianDiffusion.from_plans(plans)
    a, _ = DiffusionLoss(diffusion, 0, 0, channels_last=False)(model, batch, 3)
    b, _ = DiffusionLoss(diffusion, 0, 0, channels_last=True)(model.to(memory_format=torch.channels_last_3d), batch, 3)
    assert torch.allclose(a, b, rtol=1e-4)
