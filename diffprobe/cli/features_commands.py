"""Research command: features (voxel embeddings of a volume from a pretrained model)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffprobe.cli.app import command, console


@command("features", "diffprobe features -i case_0000.nii.gz -o case_features.npz --pretrained default --levels 1 2")
def features_cmd(
    image: Path = typer.Option(..., "-i", "--input", help="an image file (or a DICOM series folder)"),
    output: Path = typer.Option(..., "-o", "--output", help="the .npz file to write"),
    pretrained: str = typer.Option("default", "--pretrained", "-m", help="pretrained model name"),
    levels: list[int] | None = typer.Option(None, "--levels", help="decoder levels to write (default: all)"),
    timesteps: list[int] | None = typer.Option(None, "--t", "--timesteps",
                                               help="feature timesteps (default: the model's planned ones)"),
    device: str = typer.Option("auto", "-device", "--device", help="auto, cpu, cuda or cuda:N"),
) -> None:
    """Write the frozen denoiser's multi-timestep features of a volume on its preprocessed grid (.npz)."""
    from diffprobe.devices import resolve_device
    from diffprobe.predict.embeddings import extract_features
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    PretrainedModel(pretrained).check_timesteps(timesteps)  # before the image is read and preprocessed
    path = extract_features(image, output, pretrained, levels or None, timesteps or None, resolve_device(device))
    console.print(f"[green]wrote[/] {path}", highlight=False)
