"""The one-command demo."""

from __future__ import annotations

from pathlib import Path

import typer

from diffprobe.cli.app import command, console


@command("demo", "diffprobe demo --compare   (reduced size, about a minute: diffprobe demo --quick)")
def demo_cmd(
    output: Path = typer.Option(Path("diffprobe_demo"), "-o", "--output", help="demo folder (data, models, figures)"),
    compare: bool = typer.Option(False, "--compare", help="also the controls: the probe on a randomly initialised "
                                 "denoiser and the head on image + guidance alone (all: diffprobe ablate controls)"),
    compare_random: bool = typer.Option(False, "--compare-random", "--compare_random", hidden=True,
                                        help="deprecated spelling of --compare"),
    quick: bool = typer.Option(False, "--quick", help="reduced size (CI): tiny dataset, a few steps per stage"),
    device: str = typer.Option("auto", "-device", "--device", help="auto, cpu or cuda"),
) -> None:
    """Run the whole pipeline on generated phantoms: pretrain, probe, predict, evaluate."""
    from diffprobe.workflows.demo import DemoSize, format_rows, run_demo

    result = run_demo(output, compare or compare_random, DemoSize.quick() if quick else DemoSize(), device)
    console.print("\nDice on the held-out phantoms (imagesTs):", highlight=False)
    console.print(format_rows(result), highlight=False, markup=False, soft_wrap=True)
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"\ntime: {timings} (total {sum(result.seconds.values()):.0f}s)", highlight=False)
    for fig in result.figures:
        console.print(f"figure: {fig}", highlight=False, soft_wrap=True)
