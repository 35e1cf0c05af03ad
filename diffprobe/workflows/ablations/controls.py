"""``ablate controls``: the method against the controls that tell whether pretraining helps.

All rows share the dataset, fold (training cases, validation cases), preprocessing, patch,
head, probe settings and seed; they differ only in where the features come from:

* ``pretrained``: the method — frozen pretrained denoiser + probe;
* ``random_init``: the same probe on a denoiser that never saw CT, with PyTorch's standard
  initialisation everywhere (:mod:`diffprobe.pretraining.baseline`; not the network's own
  zero-branch init, which makes an untrained denoiser degenerate);
* ``no_backbone``: the same head on the image and the guidance channels alone, pooled to the
  denoiser's scales (:mod:`diffprobe.probe.input_features`): what intensity + position give;
* ``from_scratch``: the same UNet (fresh standard init) + head trained end to end on the
  labels, given as many steps as fit the method's whole compute (pretraining + probe,
  :mod:`~diffprobe.workflows.ablations.time_budget`);
* ``finetune``: the method's probe trained further with its denoiser (``diffprobe train --finetune``),
  its head starting from the method's trained head (:mod:`diffprobe.probe.warm_start`), for as many
  steps as fit the time the method's probe trained: pretraining as initialisation, not frozen.

Dice per class on the fold's validation cases and, when the raw dataset has them, on
imagesTs/labelsTs; CSV + PNG in ``ablations/controls/``; finished rows are reused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.workflows.ablations.control_runs import (
    Record,
    RowResult,
    RowSpec,
    measure_step_seconds,
    run_row,
)
from diffprobe.workflows.ablations.sweep import SweepConfig, ablation_dir, nanmean
from diffprobe.workflows.ablations.time_budget import pretrain_seconds, steps_within

CONTROL_ROWS = ("pretrained", "random_init", "no_backbone", "from_scratch", "finetune")
DESCRIPTIONS = {
    "pretrained": "frozen pretrained denoiser + probe (the method)",
    "random_init": "frozen randomly initialised denoiser (PyTorch default init) + probe",
    "no_backbone": "probe head on image + guidance channels only",
    "from_scratch": "same UNet + head trained end to end from random init, method's compute",
    "finetune": "the method's probe, then denoiser + head trained together (--finetune) as long again",
}
# A from-scratch UNet at the probe's frozen-head lr (2e-2) diverges and at the fine-tune lr (1e-4)
# barely moves in a CPU budget; 1e-3 is AdamW's usual rate for a small GroupNorm UNet.
SCRATCH_LR = 1e-3
# The time-budgeted rows, each with the budget dict key of the training time it was given (the table's
# budget_seconds): their steps are timed to fit, and they need the method's row first.
_TIMED_ROWS = {"from_scratch": "budget_seconds", "finetune": "finetune_budget_seconds"}
QUICK_STEPS = 4  # --quick: probe steps of every row, and the cap on from_scratch's
QUICK_PRETRAIN = {"bpr_steps": 2, "diffusion_steps": 2, "num_workers": 0}


@dataclass
class ControlsResult:
    rows: list[RowResult]
    classes: list[str]
    size_groups: dict[str, list[str]]
    columns: list[str]
    table: list[dict]
    csv: Path
    png: Path
    budget: dict
    notes: list[str] = dataclasses.field(default_factory=list)


def configuration(row: str, pretrained: str, head_suffix: str = "") -> str:
    return f"controls_{row}__{pretrained}{head_suffix}"


def prepare_model(config: SweepConfig, pretrained: str, pretrain_missing: bool) -> None:
    """The method's model: finished, or pretrained now as planned (``--pretrain``)."""
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.ablations.model_comparison import ensure_model

    if PretrainedModel(pretrained).finished:
        return
    if not pretrain_missing:
        raise DiffprobeError(f"no finished pretrained model named '{pretrained}'", PretrainedModel(pretrained).folder,
                             "pretrain it (diffprobe pretrain -d ID --name NAME) or add --pretrain")
    ensure_model(config, pretrained, "bpr", "planned")


def timed_steps_for(config: SweepConfig, spec: RowSpec, budget_seconds: float, record: dict, quick: bool,
                    timing_steps: int) -> tuple[int, dict]:
    """(steps, how they were chosen) for a time-budgeted row (from scratch, fine-tune): recorded, or
    measured on this machine to fit the budget."""
    from diffprobe.probe.model import ProbeFolder

    folder = ProbeFolder.of(config.dataset, spec.configuration, config.fold)
    if folder.meta_path.is_file():  # started before: keep its budget (a rerun must not change its steps)
        steps = int(folder.read_meta()["config"]["steps"])
        return steps, record.get(f"budget/{spec.configuration}", {"steps": steps, "source": "earlier run"})
    # from-scratch rows of one model share a timing (the label sweep's rows at every n; records kept from before
    # the fine-tune was timed); the fine-tune is timed on its own
    key = f"step_seconds/{spec.pretrained}" if spec.row == "from_scratch" else f"step_seconds/{spec.configuration}"
    if key not in record:
        record[key] = measure_step_seconds(config, spec, warm=1 if quick else 2, timed=timing_steps)
    step_s = float(record[key])
    steps = steps_within(budget_seconds, step_s)
    info = {"budget_seconds": budget_seconds, "step_seconds": step_s, "steps_fitting": steps}
    if quick:
        steps = min(steps, QUICK_STEPS)
    info["steps"] = steps
    record[f"budget/{spec.configuration}"] = info
    return steps, info


def probe_seconds(result: RowResult) -> float:
    """The seconds a row's probe trained (its wall seconds where the probe recorded none): the time
    budgets of the from-scratch and fine-tune rows are built from it."""
    return result.train_seconds if not math.isnan(result.train_seconds) else result.wall_seconds


def budgeted_row(config: SweepConfig, spec: RowSpec, seconds: float, record: dict, quick: bool,
                 fixed_steps: int | None = None) -> tuple[RowSpec, dict]:
    """``spec`` with the steps that fit ``seconds`` (or ``fixed_steps``, ``--scratch_steps``) and how they
    were chosen: the one rule of ``ablate controls`` and ``ablate labels``."""
    if fixed_steps is not None:
        steps, info = int(fixed_steps), {"steps": int(fixed_steps), "source": "--scratch_steps"}
    else:
        steps, info = timed_steps_for(config, spec, seconds, record, quick, 1 if quick else 4)
    return dataclasses.replace(spec, overrides={**spec.overrides, "steps": steps}), info


def control_specs(config: SweepConfig, pretrained: str, scratch_lr: float) -> dict[str, RowSpec]:
    sfx = config.head_suffix
    return {
        "pretrained": RowSpec("pretrained", pretrained, configuration("pretrained", pretrained, sfx)),
        "random_init": RowSpec("random_init", f"{pretrained}_random_init",
                               configuration("random_init", pretrained, sfx)),
        "no_backbone": RowSpec("no_backbone", pretrained, configuration("no_backbone", pretrained, sfx),
                               extractor="input"),
        "from_scratch": RowSpec("from_scratch", pretrained, configuration("from_scratch", pretrained, sfx),
                                init="scratch", overrides={"finetune_lr": scratch_lr}),
        "finetune": RowSpec("finetune", pretrained, configuration("finetune", pretrained, sfx), finetune=True,
                            head_init=configuration("pretrained", pretrained, sfx)),
    }


def ablate_controls(config: SweepConfig, pretrained: str = "default", pretrain_missing: bool = False,
                    quick: bool = False, scratch_steps: int | None = None, scratch_lr: float = SCRATCH_LR,
                    rows: tuple[str, ...] = CONTROL_ROWS) -> ControlsResult:
    """Train (or reuse) every control row and write the table and figure (module docstring)."""
    from diffprobe.devices import resolve_device
    from diffprobe.pretraining.baseline import make_random_init_model
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.ablations.organ_sizes import class_sizes, size_groups

    unknown = [r for r in rows if r not in CONTROL_ROWS]
    if unknown:
        raise DiffprobeError(f"unknown control row(s) {', '.join(unknown)}", fix=f"use {', '.join(CONTROL_ROWS)}")
    if quick:
        config = dataclasses.replace(config, steps=config.steps or QUICK_STEPS,
                                     pretrain_overrides={**QUICK_PRETRAIN, **{k: v for k, v in
                                                         config.pretrain_overrides.items() if v is not None}})
    prepare_model(config, pretrained, pretrain_missing)
    if "random_init" in rows:
        make_random_init_model(pretrained, f"{pretrained}_random_init")
    out = ablation_dir(config.dataset, "controls")
    stem = config.stem(pretrained)
    record = Record(out / f"{stem}.record.json")
    specs = control_specs(config, pretrained, scratch_lr)
    total, details = pretrain_seconds(PretrainedModel(pretrained), resolve_device(config.device))
    budget = {"pretrain_seconds": total, **details}
    results: dict[str, RowResult] = {}
    notes: list[str] = []
    for row in [r for r in CONTROL_ROWS if r in rows or _finished(config, specs[r])]:
        try:
            spec = specs[row]
            if row in _TIMED_ROWS:
                spec = _timed_row(config, spec, specs, results, record, budget, quick, scratch_steps,
                                  _test_dir(out, stem, "pretrained"))
            if row not in results:
                results[row] = run_row(config, spec, record, _test_dir(out, stem, row))
        except DiffprobeError as e:
            if row in rows:
                raise
            # a row not asked for joins the table only as it is: one from other settings is left out
            notes.append(f"the finished {row} row is left out of the table: {e}")
    ordered = [results[r] for r in CONTROL_ROWS if r in results]  # a timed row brings its budget's row
    sizes = class_sizes(config.dataset)
    groups, classes = size_groups(sizes), list(sizes)
    columns, table = control_table(ordered, classes, groups, budget)
    from diffprobe.workflows.ablations.report import write_csv

    csv_path = write_csv(out / f"{stem}.csv", columns, table)
    title = f"{paths.dataset_name(config.dataset)}: controls, model {pretrained}, fold {config.fold}"
    png = plot_rows(ordered, classes, title, out / f"{stem}.png")
    return ControlsResult(ordered, classes, groups, columns, table, csv_path, png, budget, notes)


def _finished(config: SweepConfig, spec: RowSpec) -> bool:
    """Whether the row's probe finished earlier: then the table shows it even when ``rows`` leaves it out.
    A time-budgeted row counts only with the method's row finished too (its budget; never trained unasked)."""
    from diffprobe.probe.model import ProbeFolder

    def done(configuration: str) -> bool:
        return ProbeFolder.of(config.dataset, configuration, config.fold).finished

    timed = spec.row in _TIMED_ROWS
    return done(spec.configuration) and (not timed or done(configuration("pretrained", spec.pretrained,
                                                                         config.head_suffix)))


def _timed_row(config: SweepConfig, spec: RowSpec, specs: dict[str, RowSpec], results: dict[str, RowResult],
               record: Record, budget: dict, quick: bool, scratch_steps: int | None, method_test_dir: Path) -> RowSpec:
    """``spec`` with the steps of its time budget; runs the method's row first, whose time both budgets use.

    From scratch gets the method's whole cost (pretraining + probe); the fine-tune, which starts
    from the method's finished probe, gets as long again as that probe trained.
    """
    if "pretrained" not in results:
        results["pretrained"] = run_row(config, specs["pretrained"], record, method_test_dir)
    probe_s = budget["probe_seconds"] = probe_seconds(results["pretrained"])
    seconds = budget["pretrain_seconds"] + probe_s if spec.row == "from_scratch" else probe_s
    budget[_TIMED_ROWS[spec.row]] = seconds
    spec, budget[spec.row] = budgeted_row(config, spec, seconds, record, quick,
                                          scratch_steps if spec.row == "from_scratch" else None)
    return spec


def _test_dir(out: Path, stem: str, row: str) -> Path:
    return out / "test_predictions" / stem / row


def control_table(results: list[RowResult], classes: list[str], groups: dict[str, list[str]],
                  budget: dict) -> tuple[list[str], list[dict]]:
    """CSV columns and rows: settings and seconds, validation Dice, test Dice, configuration."""
    columns = (["row", "description", "model", "steps", "pretrain_seconds", "train_seconds", "wall_seconds",
                "budget_seconds"] + [f"dice_{c}" for c in classes] + [f"dice_{g}" for g in groups]
               + ["dice_mean", "test_cases"] + [f"test_dice_{c}" for c in classes] + ["test_dice_mean",
                                                                                       "configuration"])
    table = []
    for r in results:
        row = r.spec.row
        costs_pretraining = row in ("pretrained", "finetune")  # the rows that need the pretraining to exist
        table.append({
            "row": row, "description": DESCRIPTIONS.get(row, row), "model": r.spec.pretrained, "steps": r.steps,
            "pretrain_seconds": budget["pretrain_seconds"] if costs_pretraining else 0.0,
            "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds,
            "budget_seconds": budget.get(_TIMED_ROWS.get(row, ""), ""),
            **{f"dice_{c}": r.dice.get(c, float("nan")) for c in classes},
            **{f"dice_{g}": nanmean(r.dice.get(c, float("nan")) for c in members) for g, members in groups.items()},
            "dice_mean": r.mean, "test_cases": r.test_cases,
            **{f"test_dice_{c}": r.test_dice.get(c, float("nan")) for c in classes},
            "test_dice_mean": r.test_mean, "configuration": r.spec.configuration})
    return columns, table


def plot_rows(results: list[RowResult], classes: list[str], title: str, path: Path) -> Path:
    """Grouped bars of Dice per class and the mean, one bar per row; a second panel for the test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from diffprobe.utils import save_figure

    panels = [("validation", lambda r: r.dice, lambda r: r.mean)]
    if any(r.test_cases for r in results):
        panels.append(("test (imagesTs)", lambda r: r.test_dice, lambda r: r.test_mean))

    def scored(dice) -> list[str]:  # classes some row has a Dice for: the dataset's others would be empty bars
        return [c for c in classes if any(math.isfinite(dice(r).get(c, float("nan"))) for r in results)]

    most = max(len(scored(dice)) for _, dice, _ in panels) + 1
    width = 0.8 / max(1, len(results))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 1.1 * most + 2), 3.8 * len(panels)), squeeze=False)
    for ax, (name, dice, mean) in zip(axes[:, 0], panels):
        shown = scored(dice)
        x = np.arange(len(shown) + 1)
        for i, r in enumerate(results):
            vals = [dice(r).get(c, float("nan")) for c in shown] + [mean(r)]
            ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(vals, nan=0.0), width, label=r.spec.row)
        ax.set_xticks(x)
        ax.set_xticklabels([*shown, "mean"], fontsize=8, rotation=20, ha="right")
        ax.set_ylabel(f"{name} Dice")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(5, len(results)))
    axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
