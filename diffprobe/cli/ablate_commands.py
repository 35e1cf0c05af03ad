"""Ablation commands: ``ablate timesteps|guidance|backbone|controls|labels`` (a sub-app) and ``tune_timesteps``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from diffprobe.cli.app import OneValueGroup, app, command, console

if TYPE_CHECKING:  # the workflows are imported only when a command runs
    from diffprobe.workflows.ablations import SweepConfig

ablate_app = typer.Typer(
    cls=OneValueGroup,
    help="The paper's experiments (quick probes per feature timestep, guidance mode or backbone) and the "
         "controls (random init, no backbone, from scratch, fine-tune; Dice vs labelled cases); "
         "CSV + PNG in <results>/DatasetXXX/diffprobe/ablations/<kind>/.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(ablate_app, name="ablate",
              help="Paper experiments and controls: timesteps, guidance, backbone, controls, labels (CSV + PNG).")


def _sub(name: str, example: str):
    return ablate_app.command(name, epilog=f"Example:\n\n  {example}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v) for v in value)
    if isinstance(value, int) and value >= 100_000:
        return f"{value / 1e6:.2f} M"
    return str(value)


def print_ablation(result) -> None:
    """The result as a rich table, one column per probe run (rows: settings, classes, size groups, mean)."""
    groups = {c: g for g, members in result.size_groups.items() for c in members}
    table = Table(title=f"{result.kind} ablation: validation Dice", title_justify="left")
    table.add_column("")
    for row in result.rows:
        table.add_column(str(row.get("run") or row.get("model")), justify="right")
    settings = [c for c in result.columns if not c.startswith("dice_") and c not in ("configuration", "run", "model")]
    for c in settings:
        table.add_row(c.replace("_", " "), *[_cell(row.get(c, "")) for row in result.rows], style="dim")
    for name in result.classes:
        table.add_row(f"{name} ({groups.get(name, '?')})", *[_cell(row[f"dice_{name}"]) for row in result.rows])
    for g in ("big", "medium", "small"):
        table.add_row(f"{g} organs", *[_cell(row[f"dice_{g}"]) for row in result.rows], style="italic")
    table.add_row("mean", *[_cell(row["dice_mean"]) for row in result.rows], style="bold")
    console.print(table)
    reused = sum(r.reused for r in result.runs)
    console.print(f"{len(result.runs) - reused} probe(s) trained, {reused} reused from earlier runs", highlight=False)
    console.print(f"[green]wrote[/] {result.csv}\n[green]wrote[/] {result.png}", highlight=False, soft_wrap=True)


_DATASET = typer.Option(..., "-d", "--dataset", help="dataset id (1, 001 or Dataset001_Name)")
_FOLD = typer.Option("0", "-f", "--fold", help="fold whose validation cases score the probes (0-4 or all)")
_STEPS = typer.Option(None, "--steps", help="probe training steps per run (default: the probe's, the plans' "
                      "training.probe.steps: 1000 for the tiny and cpu size classes)")
_HEAD = typer.Option("fpn", "--head", help="probe head: fpn, context or linear")
_DEVICE = typer.Option("auto", "-device", "--device", help="auto, cpu, cuda or cuda:N")
_MODELS = typer.Option(None, "--models", help="pretrained model names to compare (repeat --models per name)")
_PRETRAIN = typer.Option(False, "--pretrain", help="first pretrain the ablation's own models that are missing")
_DIFF_STEPS = typer.Option(None, "--diffusion_steps", help="--pretrain: override the planned diffusion steps")
_BPR_STEPS = typer.Option(None, "--bpr_steps", help="--pretrain: override the planned BPR steps")
_WORKERS = typer.Option(None, "--num_workers", help="--pretrain: data-loading processes")


def _check_fold(dataset: str, fold: str) -> None:
    """Refuse ``-f`` when the dataset has no such fold, before an ablation pretrains or trains anything
    (a sweep would otherwise find out only at its first probe, possibly after pretraining models)."""
    from diffprobe.workflows.train_probe import fold_split

    fold_split(dataset, fold)


def _pretraining_sweep(dataset: str, fold: str, steps: int | None, head: str, device: str,
                       diffusion_steps: int | None, bpr_steps: int | None, num_workers: int | None) -> SweepConfig:
    """The SweepConfig of an ablation that may pretrain its own models (``--pretrain``); checks ``-f`` first."""
    from diffprobe.workflows.ablations import SweepConfig

    _check_fold(dataset, fold)
    overrides = {"diffusion_steps": diffusion_steps, "bpr_steps": bpr_steps, "num_workers": num_workers}
    return SweepConfig(dataset, fold=fold, steps=steps, head=head, device=device, pretrain_overrides=overrides)


@_sub("timesteps", "diffprobe ablate timesteps -d 001 --t 5 10 30 60 100 200 -m default -f 0 --steps 300")
def timesteps_cmd(
    dataset: str = _DATASET,
    timesteps: list[int] | None = typer.Option(None, "--t", "--timesteps",
                                               help="single timesteps to probe (default 5 10 30 60 100 200)"),
    pretrained: str = typer.Option("default", "-m", "--pretrained", help="pretrained model name"),
    fold: str = _FOLD,
    steps: int | None = _STEPS,
    head: str = _HEAD,
    device: str = _DEVICE,
) -> None:
    """Dice of probes on single feature timesteps vs the planned set, per organ-size group."""
    from diffprobe.workflows.ablations import SweepConfig, ablate_timesteps

    _check_fold(dataset, fold)
    config = SweepConfig(dataset, fold=fold, steps=steps, head=head, device=device)
    print_ablation(ablate_timesteps(config, timesteps or None, pretrained))


@_sub("guidance", "diffprobe ablate guidance -d 001 --pretrain   "
                  "(own models: --models m_none --models m_random --models m_physical --models m_bpr)")
def guidance_cmd(
    dataset: str = _DATASET,
    models: list[str] | None = _MODELS,
    fold: str = _FOLD,
    steps: int | None = _STEPS,
    pretrain: bool = typer.Option(False, "--pretrain", help="first pretrain the missing ablate_none, "
                                  "ablate_random, ablate_physical, ablate_bpr (or the ablate_<mode> given)"),
    diffusion_steps: int | None = _DIFF_STEPS,
    bpr_steps: int | None = _BPR_STEPS,
    num_workers: int | None = _WORKERS,
    head: str = _HEAD,
    device: str = _DEVICE,
) -> None:
    """Dice of probes on models pretrained with guidance none / random / physical / BPR (from model.json)."""
    from diffprobe.workflows.ablations import ablate_guidance

    config = _pretraining_sweep(dataset, fold, steps, head, device, diffusion_steps, bpr_steps, num_workers)
    print_ablation(ablate_guidance(config, models or None, pretrain_missing=pretrain))


@_sub("backbone", "diffprobe ablate backbone -d 001 --pretrain   (own models: --models m_attn --models m_conv)")
def backbone_cmd(
    dataset: str = _DATASET,
    models: list[str] | None = _MODELS,
    fold: str = _FOLD,
    steps: int | None = _STEPS,
    pretrain: bool = typer.Option(False, "--pretrain", help="first pretrain the missing ablate_attn_planned and "
                                  "ablate_attn_none (attention as planned vs pure convolution), or the "
                                  "ablate_attn_<attention>[__<guidance>] given"),
    guidance: str = typer.Option("bpr", "--guidance", help="--pretrain without --models: guidance of both models "
                                 "(not bpr: the names get the suffix __<guidance>)"),
    diffusion_steps: int | None = _DIFF_STEPS,
    bpr_steps: int | None = _BPR_STEPS,
    num_workers: int | None = _WORKERS,
    head: str = _HEAD,
    device: str = _DEVICE,
) -> None:
    """Dice of probes on a denoiser with the planned attention vs a pure-convolution one; parameter counts."""
    from diffprobe.workflows.ablations import ablate_backbone

    config = _pretraining_sweep(dataset, fold, steps, head, device, diffusion_steps, bpr_steps, num_workers)
    print_ablation(ablate_backbone(config, models or None, pretrain_missing=pretrain, guidance=guidance))


@command("tune_timesteps", "diffprobe tune_timesteps -d 001 --t 5 10 30 60 100 200 -m default --k 3")
def tune_timesteps_cmd(
    dataset: str = _DATASET,
    candidates: list[int] | None = typer.Option(None, "--t", "--timesteps", help="candidate timesteps "
                                                "(default 5 10 30 60 100 200 and the planned ones)"),
    pretrained: str = typer.Option("default", "-m", "--pretrained", help="pretrained model name"),
    fold: str = _FOLD,
    k: int = typer.Option(3, "--k", help="at most this many timesteps in the chosen set"),
    steps: int | None = _STEPS,
    head: str = _HEAD,
    device: str = _DEVICE,
    dry_run: bool = typer.Option(False, "--dry_run", help="measure and print, but leave plans.json unchanged"),
) -> None:
    """Choose the feature timesteps by validation Dice (greedy forward selection) and write them to plans.json."""
    from diffprobe.workflows.ablations import SweepConfig, tune_timesteps

    _check_fold(dataset, fold)
    config = SweepConfig(dataset, fold=fold, steps=steps, head=head, device=device)
    result = tune_timesteps(config, candidates or None, pretrained, k=k, write=not dry_run)
    print_ablation(result.sweep)
    table = Table(title="greedy forward selection", title_justify="left")
    for name in ("step", "timesteps", "mean Dice", "selected"):
        table.add_column(name, justify="right" if name == "mean Dice" else "left")
    for e in result.trace:
        table.add_row(str(e["step"]), _cell(e["timesteps"]), _cell(e["dice"]), "yes" if e["selected"] else "")
    table.add_row("planned", _cell(result.planned_timesteps), _cell(result.planned_dice), "")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)
    where = result.plans_path if result.plans_written else "nothing written (--dry_run)"
    console.print(f"[green]chosen[/] feature_timesteps {result.timesteps} (validation Dice {_cell(result.dice)}; "
                  f"planned {result.planned_timesteps}: {_cell(result.planned_dice)}) -> {where}",
                  highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {result.csv}", highlight=False, soft_wrap=True)


_MODEL = typer.Option("default", "-m", "--pretrained", help="the method's pretrained model")
_QUICK = typer.Option(False, "--quick", help="tiny step counts (a test-sized run, minutes on a CPU)")
_SCRATCH_STEPS = typer.Option(None, "--scratch_steps", help="from_scratch steps (default: as many as fit the "
                              "method's pretraining + probe time, measured from a few timed steps)")
_SCRATCH_LR = typer.Option(None, "--scratch_lr", help="from_scratch learning rate (default 1e-3, AdamW)")


def _seconds(value: Any) -> str:
    return "—" if value in ("", None) or (isinstance(value, float) and math.isnan(value)) else f"{value:.0f}"


def print_rows(title: str, labels: list[str], rows: list[dict], classes: list[str]) -> None:
    """One column per row; steps and seconds, validation Dice per class and mean, then the test set's."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_row("steps", *[str(r["steps"]) for r in rows], style="dim")
    for key in ("pretrain_seconds", "train_seconds", "wall_seconds", "budget_seconds"):
        if key in rows[0]:
            table.add_row(key.replace("_", " "), *[_seconds(r.get(key)) for r in rows], style="dim")
    for prefix, name in (("dice_", "validation"), ("test_dice_", "test")):
        if prefix == "test_dice_" and not any(r.get("test_cases") for r in rows):
            continue
        count = "" if prefix == "dice_" else f" ({rows[0]['test_cases']} cases)"
        for c in classes:
            table.add_row(f"{name} {c}", *[_cell(r[f"{prefix}{c}"]) for r in rows])
        table.add_row(f"{name} mean{count}", *[_cell(r[f"{prefix}mean"]) for r in rows], style="bold")
    console.print(table)


def _sweep(dataset: str, fold: str, steps: int | None, head: str, device: str, diffusion_steps: int | None,
           bpr_steps: int | None) -> SweepConfig:
    return _pretraining_sweep(dataset, fold, steps, head, device, diffusion_steps, bpr_steps, None)


@_sub("controls", "diffprobe ablate controls -d 1 -f 0 --pretrained default   (test size: --quick)")
def controls_cmd(
    dataset: str = _DATASET,
    fold: str = _FOLD,
    pretrained: str = _MODEL,
    pretrain: bool = typer.Option(False, "--pretrain", help="pretrain --pretrained as planned if it is missing"),
    quick: bool = _QUICK,
    steps: int | None = typer.Option(None, "--steps", help="probe steps of every row (default: the probe's)"),
    scratch_steps: int | None = _SCRATCH_STEPS,
    scratch_lr: float | None = _SCRATCH_LR,
    diffusion_steps: int | None = _DIFF_STEPS,
    bpr_steps: int | None = _BPR_STEPS,
    head: str = _HEAD,
    device: str = _DEVICE,
    rows: list[str] | None = typer.Option(
        None, "--rows", help="train only these rows (pretrained random_init no_backbone from_scratch finetune; "
        "default: all); the table also lists the rows finished earlier. from_scratch and finetune also train "
        "pretrained, whose time is their budget"),
) -> None:
    """The method vs honest controls: random-init denoiser, no backbone, from scratch (same compute), fine-tuned."""
    from diffprobe.workflows.ablations.controls import CONTROL_ROWS, SCRATCH_LR, ablate_controls

    config = _sweep(dataset, fold, steps, head, device, diffusion_steps, bpr_steps)
    result = ablate_controls(config, pretrained, pretrain_missing=pretrain, quick=quick, scratch_steps=scratch_steps,
                             scratch_lr=scratch_lr or SCRATCH_LR, rows=tuple(rows) if rows else CONTROL_ROWS)
    print_rows(f"controls, model {pretrained}, fold {config.fold}: Dice", [r["row"] for r in result.table],
               result.table, result.classes)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)
    reused = sum(r.reused for r in result.rows)
    console.print(f"{len(result.rows) - reused} row(s) trained, {reused} reused; from_scratch budget: "
                  f"{_seconds(result.budget.get('budget_seconds'))} s = pretraining "
                  f"{_seconds(result.budget['pretrain_seconds'])} s ({result.budget['source']}) + probe "
                  f"{_seconds(result.budget.get('probe_seconds'))} s", highlight=False, soft_wrap=True)
    if "finetune" in result.budget:
        console.print(f"finetune budget: {_seconds(result.budget.get('finetune_budget_seconds'))} s (the probe's "
                      f"time again) -> {result.budget['finetune']['steps']} steps", highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {result.csv}\n[green]wrote[/] {result.png}", highlight=False, soft_wrap=True)


@_sub("labels", "diffprobe ablate labels -d 1 --n 1 2 4 8 -f 0")
def labels_cmd(
    dataset: str = _DATASET,
    ns: list[int] = typer.Option(..., "--n", help="numbers of labelled training cases (nested subsets)"),
    fold: str = _FOLD,
    pretrained: str = _MODEL,
    pretrain: bool = typer.Option(False, "--pretrain", help="pretrain --pretrained as planned if it is missing"),
    quick: bool = _QUICK,
    steps: int | None = typer.Option(None, "--steps", help="probe steps (default: the probe's)"),
    scratch_steps: int | None = _SCRATCH_STEPS,
    scratch_lr: float | None = _SCRATCH_LR,
    diffusion_steps: int | None = _DIFF_STEPS,
    bpr_steps: int | None = _BPR_STEPS,
    head: str = _HEAD,
    device: str = _DEVICE,
) -> None:
    """Dice vs the number of labelled training cases: the method vs a UNet trained from scratch (same compute)."""
    from diffprobe.workflows.ablations.controls import SCRATCH_LR
    from diffprobe.workflows.ablations.labels import ablate_labels

    config = _sweep(dataset, fold, steps, head, device, diffusion_steps, bpr_steps)
    result = ablate_labels(config, ns, pretrained, pretrain_missing=pretrain, quick=quick,
                           scratch_steps=scratch_steps, scratch_lr=scratch_lr or SCRATCH_LR)
    print_rows(f"Dice vs labelled cases, model {pretrained}, fold {config.fold}",
               [f"n={r['n']} {r['row']}" for r in result.table], result.table, result.classes)
    console.print(f"[green]wrote[/] {result.csv}\n[green]wrote[/] {result.png}", highlight=False, soft_wrap=True)
