"""Pretraining command: pretrain (BPR, then BPR-guided diffusion)."""

from __future__ import annotations

import typer

from diffprobe.cli.app import command, console


@command("pretrain", "diffprobe pretrain -d 1 2 --name abdomen -device cuda   "
                     "(multi-GPU: torchrun --nproc_per_node 4 $(which diffprobe) pretrain -d 1 -device cuda)")
def pretrain_cmd(
    dataset: list[str] | None = typer.Option(None, "-d", "--dataset",
                                             help="preprocessed dataset id(s); default: every preprocessed dataset"),
    name: str = typer.Option("default", "--name", "-m", help="name of the pretrained model (results/pretrained/NAME)"),
    stage: str = typer.Option("all", "--stage", help="bpr, diffusion or all"),
    guidance: str = typer.Option("bpr", "--guidance", help="bpr, none, random or physical (mm from the centre of "
                                 "the body crop, not scanner coordinates)"),
    attention: str = typer.Option("planned", "--attention", help="planned (per plans) or none (pure convolution)"),
    device: str = typer.Option("auto", "-device", "--device", help="auto, cpu, cuda or cuda:N"),
    resume: bool = typer.Option(False, "--c", "--continue", help="resume from checkpoint_latest (may extend steps)"),
    diffusion_steps: int | None = typer.Option(None, "--diffusion_steps", help="override the planned diffusion steps"),
    bpr_steps: int | None = typer.Option(None, "--bpr_steps", help="override the planned BPR steps"),
    batch_size: int | None = typer.Option(None, "--batch_size", help="override the planned batch size"),
    lr: float | None = typer.Option(None, "--lr", help="override the diffusion learning rate"),
    num_workers: int | None = typer.Option(
        None, "--num_workers", help="data-loading processes (default: the plans' on a CPU, at least 12 on a GPU)"),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint_every",
                                                help="save checkpoint_latest every N steps (default: planned)"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the denoiser (GPU)"),
    channels_last: bool | None = typer.Option(None, "--channels_last/--no_channels_last",
                                              help="channels_last_3d memory format (default: planned, on)"),
    cuda_graphs: bool = typer.Option(False, "--cuda_graphs", help="CUDA, one process: replay each diffusion step "
                                     "from one captured CUDA graph (no effect on a CPU)"),
) -> None:
    """Train the Body Part Regressor, then the BPR-guided 3D diffusion model, on unlabelled CT.

    Networks, patch, batch and step budgets come from the dataset's plans.json (choose the size
    with `plan_and_preprocess --size_class` or `--budget_minutes`); the flags below override
    single training values for this run and are recorded in the model's model.json."""
    from diffprobe.pretraining.pretrain import pretrain

    overrides = {"diffusion_steps": diffusion_steps, "bpr_steps": bpr_steps, "batch_size": batch_size,
                 "diffusion_lr": lr, "num_workers": num_workers, "checkpoint_every": checkpoint_every,
                 "compile": compile_model or None, "cuda_graphs": cuda_graphs or None,
                 "channels_last": channels_last}
    result = pretrain(dataset, name=name, stage=stage, guidance=guidance, attention=attention,
                      device=device, resume=resume, overrides=overrides, seed=seed)
    console.print(f"[green]done[/] stages {', '.join(result.stages_run) or '(none)'}: {result.model_dir}",
                  highlight=False)


@command("sample", "diffprobe sample --name default --method ddim --steps 50 -n 4")
def sample_cmd(
    name: str = typer.Option("default", "--name", "-m", help="pretrained model name"),
    num: int = typer.Option(4, "-n", "--num", help="number of patches"),
    method: str = typer.Option("ddim", "--method", help="ddim (fast) or ddpm (all T steps)"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    device: str = typer.Option("cpu", "-device", "--device", help="cpu or cuda"),
) -> None:
    """Draw patches with the pretrained denoiser and save them next to real patches (PNG)."""
    from diffprobe.pretraining.sample import sample_patches

    path = sample_patches(name, num, method, steps, seed, device)
    console.print(f"[green]wrote[/] {path}", highlight=False)


@command("export_model", "diffprobe export_model default default_model.zip")
def export_model_cmd(
    name: str = typer.Argument(..., help="pretrained model name"),
    output: str = typer.Argument(..., help="zip file to write"),
) -> None:
    """Pack a pretrained model (BPR + denoiser + plans) into a zip to share it."""
    from diffprobe.pretraining.export import export_model

    console.print(f"[green]wrote[/] {export_model(name, output)}", highlight=False)


@command("install_model", "diffprobe install_model default_model.zip --name abdomen")
def install_model_cmd(
    archive: str = typer.Argument(..., help="zip written by export_model"),
    name: str | None = typer.Option(None, "--name", help="install under this name (default: the archive's)"),
    force: bool = typer.Option(False, "--force", help="replace an installed model of the same name"),
) -> None:
    """Install a shared pretrained model into results/pretrained (refuses unsafe archives)."""
    from diffprobe.pretraining.export import install_model

    console.print(f"[green]installed[/] {install_model(archive, name, force)}", highlight=False)
