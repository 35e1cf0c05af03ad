"""Dataset commands: make_phantoms, plan_and_preprocess."""

from __future__ import annotations

from pathlib import Path

import typer

from diffprobe import paths
from diffprobe.cli.app import command, console

DATASET_HELP = "dataset id(s): 1, 001 or Dataset001_Name; several allowed (-d 1 2)"


@command("make_phantoms", "diffprobe make_phantoms -d 1 --num_labelled 8 --num_unlabelled 4 --num_test 4")
def make_phantoms_cmd(
    dataset: int = typer.Option(1, "-d", "--dataset", help="dataset id to create (DatasetXXX_Phantoms)"),
    name: str = typer.Option("Phantoms", "--name", help="dataset name after the id"),
    num_labelled: int = typer.Option(8, "--num_labelled", help="labelled training cases"),
    num_unlabelled: int = typer.Option(4, "--num_unlabelled", help="unlabelled training cases (pretraining only)"),
    num_test: int = typer.Option(4, "--num_test", help="held-out test cases (imagesTs + labelsTs)"),
    fov_mm: float = typer.Option(110.0, "--fov_mm", help="in-plane field of view in mm (smaller = faster)"),
    seed: int = typer.Option(0, "--seed", help="random seed; the same seed gives identical files"),
    output: Path | None = typer.Option(None, "-o", "--output", help="write here instead of the raw root"),
) -> None:
    """Write a synthetic CT phantom dataset in nnU-Net raw format (deterministic from --seed)."""
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    folder = output or paths.raw_root() / paths.dataset_folder_name(dataset, name)
    cfg = PhantomConfig(num_train_labelled=num_labelled, num_train_unlabelled=num_unlabelled,
                        num_test=num_test, seed=seed, fov_mm=fov_mm)
    make_phantom_dataset(folder, cfg)
    console.print(f"wrote {num_labelled + num_unlabelled} training ({num_labelled} labelled) and {num_test} test "
                  f"phantoms to [bold]{folder}[/]")


@command("plan_and_preprocess", "diffprobe plan_and_preprocess -d 1 -np 4 --size_class small --patch_size 32 128 128")
def plan_and_preprocess_cmd(
    dataset: list[str] = typer.Option(..., "-d", "--dataset", help=DATASET_HELP),
    num_processes: int = typer.Option(2, "-np", "--num_processes", help="worker processes (one case each)"),
    clean: bool = typer.Option(False, "--clean", help="redo fingerprint, plans and every case"),
    replan: bool = typer.Option(False, "--replan", help="re-plan from the recorded planner inputs (flags and "
                                "--override kept, tuned timesteps kept; direct edits of plans.json are lost)"),
    size_class: str | None = typer.Option(None, "--size_class", "--preset",
                                          help="tiny, cpu, small or paper (default: cpu on CPU, paper on GPU)"),
    patch_size: tuple[int, int, int] | None = typer.Option(None, "--patch_size", help="patch size z y x (voxels)"),
    target_spacing: tuple[float, float, float] | None = typer.Option(
        None, "--target_spacing", help="target spacing z y x (mm)"),
    batch_size: int | None = typer.Option(None, "--batch_size", help="training batch size"),
    memory_target_gb: float | None = typer.Option(None, "--gpu_memory_target", help="GPU memory target (GB)"),
    schedule: str | None = typer.Option(None, "--schedule", help="diffusion noise schedule: linear or cosine"),
    timesteps: list[int] | None = typer.Option(None, "--t", "--timesteps",
                                               help="feature timesteps (default: planned from noise levels)"),
    override: list[str] | None = typer.Option(None, "--override",
                                              help="edit any plans key, e.g. --override network.blocks_per_level=1"),
    budget_minutes: float | None = typer.Option(
        None, "--budget_minutes", help="plan network and step counts so that pretraining + probe training take about "
        "this many minutes on -device (times real training steps first; recorded in training.budget)"),
    device: str = typer.Option("auto", "-device", "--device", help="auto, cpu, cuda or cuda:N (for --budget_minutes "
                               "and the default size class)"),
) -> None:
    """Fingerprint (with integrity check), plan (plans.json) and preprocess datasets."""
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    kwargs = {k: v for k, v in {
        "size_class": size_class,
        "patch_size": list(patch_size) if patch_size else None,
        "target_spacing_override": list(target_spacing) if target_spacing else None,
        "batch_size": batch_size,
        "memory_target_gb": memory_target_gb,
        "schedule": schedule,
        "timesteps": list(timesteps) if timesteps else None,
    }.items() if v is not None}
    for spec in dataset:
        report = plan_and_preprocess(spec, num_processes=num_processes, clean=clean, replan=replan,
                                     plan_kwargs=kwargs or None, overrides=override or None,
                                     budget_minutes=budget_minutes, device=device)
        for note in report.notes:
            console.print(f"[cyan]note:[/] {note}", highlight=False)
        console.print(
            f"[green]done[/] {report.folder.parent.name}: {len(report.processed)} case(s) preprocessed, "
            f"{len(report.skipped)} already done; plans: {report.plans_path}"
            + (" (kept existing, use --replan to rewrite)" if report.plans_reused else ""), highlight=False)
