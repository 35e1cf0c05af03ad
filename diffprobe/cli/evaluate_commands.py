"""Evaluation command: evaluate (Dice, surface Dice and HD95 of a prediction folder)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffprobe.cli.app import command, console


@command("evaluate", "diffprobe evaluate -ref $DIFFPROBE_RAW/Dataset001_Phantoms/labelsTs -pred predictions -d 1 "
                     "--tolerance 2")
def evaluate_cmd(
    ref: Path = typer.Option(..., "-ref", "--ref", help="folder of reference label maps (e.g. labelsTs)"),
    pred: Path = typer.Option(..., "-pred", "--pred", help="folder of predicted label maps (same case names)"),
    dataset: str | None = typer.Option(None, "-d", "--dataset",
                                       help="raw dataset id whose dataset.json names the labels; "
                                            "default: every label value in the references"),
    output: Path | None = typer.Option(None, "-o", "--output", help="summary file (default: PRED/summary.json)"),
    tolerance: float = typer.Option(2.0, "--tolerance", help="surface Dice tolerance in mm"),
    num_processes: int = typer.Option(1, "-np", "--num_processes", help="worker processes (one case each)"),
) -> None:
    """Score predictions against references: Dice, normalised surface Dice and HD95 per class."""
    from diffprobe import paths
    from diffprobe.dataset.dataset_json import load_dataset_json
    from diffprobe.evaluation import evaluate_folders, format_table

    labels = load_dataset_json(paths.raw_dataset_dir(dataset)).labels if dataset is not None else None
    output = output or pred / "summary.json"
    summary = evaluate_folders(ref, pred, labels=labels, tolerance_mm=tolerance, output=output,
                               num_processes=num_processes)
    console.print(format_table(summary), highlight=False, markup=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {output}", highlight=False)
