"""Ablation tables and figures: one CSV row and one plotted point or bar per probe run.

Kept apart from the experiments so that every ablation writes the same columns the same way
(Dice per class, per size group, the mean, the configuration) and the figures share their
colours and y-axis rule. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.utils import atomic_path
from diffprobe.workflows.ablations.organ_sizes import SIZE_GROUPS
from diffprobe.workflows.ablations.sweep import ProbeRun

GROUP_COLOURS = {"big": "tab:blue", "medium": "tab:orange", "small": "tab:red", "mean": "black"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def table_rows(runs: list[ProbeRun], classes: list[str], lead: list[str]) -> tuple[list[str], list[dict]]:
    """One row per run: ``lead`` (from the run's ``info``), Dice per class, per size group, mean, configuration."""
    columns = lead + [f"dice_{c}" for c in classes] + [f"dice_{g}" for g in SIZE_GROUPS] + ["dice_mean",
                                                                                            "configuration"]
    rows = []
    for run in runs:
        row = {k: run.info.get(k, "") for k in lead}
        row.update({f"dice_{c}": run.dice.get(c, float("nan")) for c in classes})
        row.update({f"dice_{g}": run.groups[g] for g in SIZE_GROUPS})
        row.update({"dice_mean": run.mean, "configuration": run.configuration})
        rows.append(row)
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    """Atomically; floats with 4 decimals (NaN as ``nan``), lists space-separated."""
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ylim_top(values: list[float]) -> float:
    """1 for usual Dice; zoomed in (never below 0.05) when every value is small, e.g. very short runs."""
    finite = [v for v in values if not math.isnan(v)]
    return 1.0 if not finite or max(finite) > 0.5 else max(0.05, 1.2 * max(finite))


def plot_timesteps(runs: list[ProbeRun], planned: ProbeRun | None, title: str, path: Path) -> Path:
    """Dice vs t (log x) per size group and overall; the planned set as dashed horizontal lines."""
    from diffprobe.utils import save_figure

    plt = _pyplot()
    runs = sorted(runs, key=lambda r: r.timesteps[0])
    ts = [r.timesteps[0] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in (*SIZE_GROUPS, "mean"):
        ys = [r.mean if g == "mean" else r.groups[g] for r in runs]
        if all(math.isnan(y) for y in ys):
            continue
        ax.plot(ts, ys, "o-", color=GROUP_COLOURS[g], label=f"{g} organs" if g != "mean" else "all classes",
                lw=2 if g == "mean" else 1.5)
        if planned is not None:
            y = planned.mean if g == "mean" else planned.groups[g]
            if not math.isnan(y):
                ax.axhline(y, color=GROUP_COLOURS[g], ls="--", lw=1, alpha=0.8)
    if planned is not None:
        ax.plot([], [], "k--", lw=1, label=f"planned set t={'/'.join(map(str, planned.timesteps))}")
    if min(ts) > 0:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=1)
    ax.minorticks_off()
    ax.set_xticks(ts)
    ax.set_xticklabels([str(t) for t in ts])
    ax.set_xlabel("feature timestep t (single timestep per probe)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, _ylim_top([r.mean for r in runs] + [v for r in runs for v in r.groups.values()]
                             + ([planned.mean, *planned.groups.values()] if planned is not None else [])))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(runs: list[ProbeRun], classes: list[str], groups: dict[str, list[str]], title: str,
              path: Path) -> Path:
    """Grouped bars: Dice per class (and the mean), one bar per model."""
    from diffprobe.utils import save_figure

    plt = _pyplot()
    group_of = {c: g for g, members in groups.items() for c in members}
    cats = [*classes, "mean"]
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(cats) + 2), 4.5))
    for i, run in enumerate(runs):
        vals = [run.dice.get(c, float("nan")) for c in classes] + [run.mean]
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(vals, nan=0.0), width,
               label=run.info.get("legend", run.label))
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c}\n({group_of[c]})" if c in group_of else c for c in cats], fontsize=8)
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, _ylim_top([v for r in runs for v in [*r.dice.values(), r.mean]]))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
