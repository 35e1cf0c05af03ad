"""``ablate labels``: Dice against the number of labelled training cases, method vs from scratch.

The claim a pretraining method has to earn is label efficiency: with few labelled scans, the
frozen pretrained features should beat a network trained from scratch on the same labels.
For each ``n`` the probe (``pretrained``) and the supervised-from-scratch UNet
(``from_scratch``, given the method's compute: pretraining + that probe's training time, as in
``ablate controls``) train on the first ``n`` of the fold's training cases and are scored on
the fold's full validation cases (and the raw test cases, when there are any).

Subsets are nested and deterministic: the fold's training cases ordered by the CRC-32 of
their identifier (no RNG, and adding a case elsewhere does not reorder the others); the first
``n`` of that order, so the 2-case set contains the 1-case set.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from pathlib import Path

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.workflows.ablations.control_runs import Record, RowResult, RowSpec, run_row
from diffprobe.workflows.ablations.controls import (
    QUICK_PRETRAIN,
    QUICK_STEPS,
    SCRATCH_LR,
    budgeted_row,
    prepare_model,
    probe_seconds,
)
from diffprobe.workflows.ablations.sweep import SweepConfig, ablation_dir
from diffprobe.workflows.ablations.time_budget import pretrain_seconds

LABEL_ROWS = ("pretrained", "from_scratch")


@dataclass
class LabelsResult:
    runs: list[tuple[int, RowResult]]
    classes: list[str]
    columns: list[str]
    table: list[dict]
    csv: Path
    png: Path
    budget: dict


def nested_subsets(train_ids: list[str], ns: list[int]) -> dict[int, list[str]]:
    """``{n: the first n training cases in CRC-32 order}`` (nested; see module docstring)."""
    order = sorted(train_ids, key=lambda i: (zlib.crc32(i.encode()), i))
    bad = [n for n in ns if not 1 <= n <= len(order)]
    if bad:
        raise DiffprobeError(f"--n {' '.join(map(str, bad))}: the fold has {len(order)} training case(s)",
                             fix=f"use numbers between 1 and {len(order)}")
    return {n: order[:n] for n in sorted(set(ns))}


def fold_training_cases(dataset: str | int, fold: str) -> list[str]:
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.probe.splits import fold_cases
    from diffprobe.workflows.train_probe import labelled_ids

    data_dir, _, ids = preprocessed_cases(dataset)
    return fold_cases(data_dir.parent, labelled_ids(data_dir, ids), fold)[0]


def ablate_labels(config: SweepConfig, ns: list[int], pretrained: str = "default", pretrain_missing: bool = False,
                  quick: bool = False, scratch_steps: int | None = None,
                  scratch_lr: float = SCRATCH_LR) -> LabelsResult:
    """For each n: probe and from-scratch UNet on n labelled cases; CSV + PNG in ``ablations/labels/``."""
    from diffprobe.devices import resolve_device
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.ablations.organ_sizes import class_sizes

    if quick:
        config = dataclasses.replace(config, steps=config.steps or QUICK_STEPS,
                                     pretrain_overrides={**QUICK_PRETRAIN, **{k: v for k, v in
                                                         config.pretrain_overrides.items() if v is not None}})
    prepare_model(config, pretrained, pretrain_missing)
    subsets = nested_subsets(fold_training_cases(config.dataset, config.fold), list(ns))
    out = ablation_dir(config.dataset, "labels")
    stem = config.stem(pretrained)
    record = Record(out / f"{stem}.record.json")
    total, details = pretrain_seconds(PretrainedModel(pretrained), resolve_device(config.device))
    budget: dict = {"pretrain_seconds": total, **details}
    runs: list[tuple[int, RowResult]] = []
    sfx = config.head_suffix
    for n, cases in subsets.items():
        test_dir = out / "test_predictions" / stem
        method = run_row(config, RowSpec("pretrained", pretrained, f"labels_n{n}_pretrained__{pretrained}{sfx}",
                                         train_cases=tuple(cases)), record, test_dir / f"n{n}_pretrained")
        runs.append((n, method))
        spec = RowSpec("from_scratch", pretrained, f"labels_n{n}_from_scratch__{pretrained}{sfx}",
                       init="scratch", overrides={"finetune_lr": scratch_lr}, train_cases=tuple(cases))
        spec, budget[f"from_scratch_n{n}"] = budgeted_row(config, spec, total + probe_seconds(method), record,
                                                          quick, scratch_steps)
        runs.append((n, run_row(config, spec, record, test_dir / f"n{n}_from_scratch")))
    classes = list(class_sizes(config.dataset))
    columns, table = labels_table(runs, classes, budget)
    from diffprobe.workflows.ablations.report import write_csv

    csv_path = write_csv(out / f"{stem}.csv", columns, table)
    title = f"{paths.dataset_name(config.dataset)}: Dice vs labelled cases, model {pretrained}, fold {config.fold}"
    png = plot_label_curve(runs, title, out / f"{stem}.png")
    return LabelsResult(runs, classes, columns, table, csv_path, png, budget)


def labels_table(runs: list[tuple[int, RowResult]], classes: list[str], budget: dict) -> tuple[list[str], list[dict]]:
    columns = (["n", "row", "train_cases", "steps", "train_seconds", "wall_seconds", "budget_seconds"]
               + [f"dice_{c}" for c in classes] + ["dice_mean", "test_cases"]
               + [f"test_dice_{c}" for c in classes] + ["test_dice_mean", "configuration"])
    table = []
    for n, r in runs:
        scratch = budget.get(f"from_scratch_n{n}", {}) if r.spec.row == "from_scratch" else {}
        table.append({"n": n, "row": r.spec.row, "train_cases": list(r.spec.train_cases or ()), "steps": r.steps,
                      "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds,
                      "budget_seconds": scratch.get("budget_seconds", ""),
                      **{f"dice_{c}": r.dice.get(c, float("nan")) for c in classes}, "dice_mean": r.mean,
                      "test_cases": r.test_cases, **{f"test_dice_{c}": r.test_dice.get(c, float("nan"))
                                                     for c in classes},
                      "test_dice_mean": r.test_mean, "configuration": r.spec.configuration})
    return columns, table


def plot_label_curve(runs: list[tuple[int, RowResult]], title: str, path: Path) -> Path:
    """Mean Dice vs n (log x): one colour per row, solid = validation, dashed = test cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffprobe.utils import save_figure

    colours = {"pretrained": "tab:blue", "from_scratch": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    ns = sorted({n for n, _ in runs})
    for row in LABEL_ROWS:
        pts = sorted(((n, r) for n, r in runs if r.spec.row == row), key=lambda p: p[0])
        if not pts:
            continue
        ax.plot([n for n, _ in pts], [r.mean for _, r in pts], "o-", color=colours[row], label=f"{row} (validation)")
        if any(r.test_cases for _, r in pts):
            ax.plot([n for n, _ in pts], [r.test_mean for _, r in pts], "s--", color=colours[row],
                    label=f"{row} (test)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
