"""Probe commands: train (probing head on frozen features) and predict (sliding window)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffprobe.cli.app import command, console


@command("train", "diffprobe train -d 1 -f 0 --pretrained default   (all folds: -f all; linear probe: --head linear)")
def train_cmd(
    dataset: str = typer.Option(..., "-d", "--dataset", help="dataset id (1, 001 or Dataset001_Name)"),
    fold: str = typer.Option("0", "-f", "--fold", help="fold 0-4 (5-fold split like nnU-Net) or all"),
    pretrained: str = typer.Option("default", "--pretrained", "-m", help="pretrained model name"),
    head: str = typer.Option("fpn", "--head", help="fpn (non-linear, vox2vec style), context (fpn with "
                             "3x3x3 blocks below the finest level) or linear"),
    finetune: bool = typer.Option(False, "--finetune", help="train the denoiser as well (not frozen)"),
    warm_start: bool = typer.Option(False, "--warm_start", help="with --finetune: start the head from this fold's "
                                    "finished frozen probe (same --pretrained and --head) instead of a fresh head"),
    with_input: bool = typer.Option(False, "--with_input", help="the head also reads the image and the guidance "
                                    "channels (BPR coordinates), pooled to each scale; configuration "
                                    "<pretrained>__<head>__withinput"),
    device: str = typer.Option("auto", "-device", "--device", help="auto, cpu, cuda or cuda:N"),
    resume: bool = typer.Option(False, "--c", "--continue", help="resume from checkpoint_latest (may extend steps)"),
    steps: int | None = typer.Option(None, "--steps", help="training steps (default 1000)"),
    batch_size: int | None = typer.Option(None, "--batch_size", help="patches per step (default 2)"),
    lr: float | None = typer.Option(None, "--lr", help="head learning rate"),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint_every",
                                                help="save checkpoint_latest every N steps (default 100)"),
    timesteps: list[int] | None = typer.Option(None, "--t", "--timesteps",
                                               help="feature timesteps (default: the plans' feature_timesteps)"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    validation_only: bool = typer.Option(False, "--val", help="only run the final validation of the finished "
                                         "probe (summary.json, postprocessing.json), as nnU-Net's --val"),
) -> None:
    """Train a probing head on the frozen pretrained denoiser's multi-timestep features."""
    from diffprobe.predict.validation import format_validation
    from diffprobe.workflows.train_probe import frozen_probe_folder, train_probe, validate_probe

    if validation_only:
        summary = validate_probe(dataset, fold, pretrained, head, finetune, device, with_input=with_input)
        console.print(format_validation(summary), highlight=False, markup=False)
        return

    overrides = {"steps": steps, "batch_size": batch_size, "lr": lr, "checkpoint_every": checkpoint_every,
                 "with_input": with_input or None}
    head_init = frozen_probe_folder(dataset, fold, pretrained, head, finetune, with_input) if warm_start else None
    result = train_probe(dataset, fold, pretrained, head, finetune, device, resume, overrides, timesteps or None,
                         seed, head_init=head_init)
    if result.validation:
        console.print(format_validation(result.validation), highlight=False, markup=False)
    console.print(f"[green]done[/] {result.folder}", highlight=False)


@command("predict", "diffprobe predict -i imagesTs -o segs -d 1 -f 0   (short form: diffprobe predict -i imgs -o segs)")
def predict_cmd(
    inputs: Path = typer.Option(..., "-i", "--input",
                                help="folder of <case>_0000 images, one image, or a DICOM folder"),
    output: Path = typer.Option(..., "-o", "--output", help="output folder for the label maps"),
    dataset: str | None = typer.Option(None, "-d", "--dataset", help="dataset id; default: the only trained one"),
    configuration: str | None = typer.Option(None, "-c", "--configuration",
                                             help="trained configuration (PRETRAINED__HEAD); default: the only one"),
    folds: list[str] | None = typer.Option(None, "-f", "--fold", help="folds to ensemble; default: all trained"),
    device: str = typer.Option("auto", "-device", "--device", help="auto, cpu, cuda, cuda:N or mps"),
    step_size: float = typer.Option(0.5, "-step_size", "--step_size", help="tile step as a fraction of the patch"),
    tta: bool = typer.Option(False, "--tta",
                             help="test-time noise ensemble: average the softmax over --tta_draws independent "
                                  "feature-noise draws per tile (the randomness the models are trained with; "
                                  "N times the denoiser work; output deterministic). No mirroring: the models "
                                  "never saw a mirrored body. Effect measured in docs/probe.md"),
    tta_draws: int | None = typer.Option(None, "--tta_draws", "-tta_draws",
                                         help="noise draws per tile with --tta (default 4; implies --tta)"),
    save_probabilities: bool = typer.Option(False, "--save_probabilities", help="also write <case>.npz"),
    output_type: str = typer.Option("nifti", "--output_type",
                                    help="nifti (label map, default), dicom_seg (DICOM SEG <case>.dcm referencing "
                                         "the input DICOM series) or both"),
    continue_prediction: bool = typer.Option(False, "--continue_prediction", help="skip cases already written"),
    num_parts: int = typer.Option(1, "-num_parts", "--num_parts", help="split the cases into this many parts"),
    part_id: int = typer.Option(0, "-part_id", "--part_id", help="which part this process predicts"),
    precision: str = typer.Option("auto", "-precision", "--precision",
                                  help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16"),
    tile_batch: int = typer.Option(2, "-tile_batch", "--tile_batch", help="tiles per forward of the network"),
    channels_last: bool = typer.Option(True, "--channels_last/--no_channels_last",
                                       help="channels_last_3d memory format (faster convolutions)"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the network (long GPU runs)"),
    sequential: bool = typer.Option(False, "--sequential",
                                    help="no overlap of reading/writing cases with the sliding window"),
    no_postprocessing: bool = typer.Option(False, "--no_postprocessing", "-npp",
                                           help="write the plain argmax: no background outside the body (CT "
                                                "plans), no largest-component removal (postprocessing.json)"),
) -> None:
    """Segment CT images with a trained probe; outputs keep each input's exact geometry."""
    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import predict

    settings = InferenceSettings(channels_last=channels_last, precision=precision, compile=compile_model,
                                 tile_batch=tile_batch, pipeline=not sequential)
    from diffprobe.predict.ensemble import DEFAULT_TTA_DRAWS

    draws = tta_draws if tta_draws is not None else (DEFAULT_TTA_DRAWS if tta else 1)
    if draws < 1:
        from diffprobe.errors import DiffprobeError

        raise DiffprobeError(f"--tta_draws {draws} must be at least 1", fix="use e.g. --tta --tta_draws 4")
    written = predict(inputs, output, dataset, configuration, folds, device, step_size, draws, save_probabilities,
                      continue_prediction, num_parts, part_id, settings=settings, output_type=output_type,
                      postprocess=not no_postprocessing)
    console.print(f"[green]wrote[/] {len(written)} segmentation(s) to {output}", highlight=False)
