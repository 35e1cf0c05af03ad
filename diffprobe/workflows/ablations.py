"""The paper's experiments as commands: feature timesteps, guidance, backbone; timestep tuning.

Every experiment trains quick probes (``diffprobe.workflows.train_probe.train_probe``) into their own
configurations under ``<results>/DatasetXXX_Name/diffprobe/`` and reads each one's
end-of-training validation (``validation/summary.json``: Dice of full sliding-window
predictions of the fold's validation cases). A run whose folder already holds
``checkpoint_final.pt`` is reused, not retrained, so an interrupted sweep continues where it
stopped and ``tune_timesteps`` reuses the timestep sweep. Tables and figures go to
``<results>/DatasetXXX_Name/diffprobe/ablations/<kind>/`` (written atomically).

Classes are grouped into big / medium / small organs by their mean voxel count in the
labelled preprocessed cases (terciles of the size-sorted class list), so that the effect of
the noise level on small structures is visible (``docs/ablations.md``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.utils import atomic_path, read_json, write_json

DEFAULT_TIMESTEPS = (5, 10, 30, 60, 100, 200)
GUIDANCE_ORDER = ("none", "random", "physical", "bpr")  # the paper's progression
ATTENTION_ORDER = ("planned", "none")
SIZE_GROUPS = ("big", "medium", "small")
# Settings that do not change the trained weights; a reused run may differ in them.
_IGNORED_PROBE_SETTINGS = ("checkpoint_every", "validate_every", "val_patches")


# ---- results ---------------------------------------------------------------------------------
@dataclass
class ProbeRun:
    """One quick probe of an ablation and its validation Dice."""

    label: str  # row name: "t=10", "planned", a model name
    configuration: str
    folder: Path
    pretrained: str
    timesteps: list[int]
    dice: dict[str, float]  # class name -> mean validation Dice
    groups: dict[str, float]  # big / medium / small -> mean Dice of the group's classes
    mean: float  # mean Dice over the classes (NaN-skipping)
    reused: bool  # True: read from an earlier run, not trained now
    info: dict[str, Any] = field(default_factory=dict)  # guidance, attention, parameters, noise std...


@dataclass
class AblationResult:
    kind: str  # timesteps, guidance, backbone
    runs: list[ProbeRun]
    classes: list[str]
    size_groups: dict[str, list[str]]
    columns: list[str]
    rows: list[dict[str, Any]]
    csv: Path
    png: Path


@dataclass
class TuneResult:
    timesteps: list[int]  # the set written to the plans
    dice: float
    greedy_timesteps: list[int]
    greedy_dice: float
    planned_timesteps: list[int]  # the plans' set before tuning
    planned_dice: float
    single_dice: dict[int, float]
    trace: list[dict[str, Any]]  # every evaluated set: step, timesteps, dice, selected
    plans_path: Path
    plans_written: bool
    csv: Path
    sweep: AblationResult
    notes: list[str] = field(default_factory=list)


# ---- helpers -----------------------------------------------------------------------------------
def _nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _score_key(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def ablation_dir(dataset: str | int, kind: str) -> Path:
    return paths.results_dir(dataset) / "ablations" / kind


def timesteps_configuration(timesteps: list[int], pretrained: str, head: str = "fpn") -> str:
    """``ablate_t10__NAME`` for one timestep, ``ablate_t10-30-60__NAME`` for a set (sorted)."""
    ts = "-".join(str(t) for t in sorted(set(timesteps)))
    return f"ablate_t{ts}__{pretrained}" + ("" if head == "fpn" else f"__{head}")


def _model_meta(name: str) -> dict:
    from diffprobe.pretraining.pretrain import model_dir

    path = model_dir(name) / "model.json"
    if not path.is_file() or not (model_dir(name) / "diffusion" / "checkpoint_final.pt").is_file():
        raise DiffprobeError(f"no finished pretrained model named '{name}'", model_dir(name),
                             f"pretrain it (`diffprobe pretrain -d ID --name {name} --guidance MODE`), "
                             "or let the ablation do it with --pretrain")
    return read_json(path)


def _schedule(diffusion: dict) -> dict:
    return {k: diffusion[k] for k in ("schedule", "num_timesteps", "beta_start", "beta_end")}


def noise_stds(diffusion: dict, timesteps: list[int]) -> list[float]:
    """sqrt(1 - abar_t) of each timestep under the given plans' schedule (normalised units)."""
    from diffprobe.diffusion import schedule as sch

    abar = sch.alphas_cumprod(**_schedule(diffusion))
    return [float(sch.noise_std(abar, int(t))) for t in timesteps]


def _check_timesteps(timesteps: list[int], meta: dict, name: str) -> None:
    T = int(meta["plans"]["diffusion"]["num_timesteps"])
    bad = [t for t in timesteps if not 0 <= int(t) < T]
    if bad:
        raise DiffprobeError(f"timestep(s) {', '.join(map(str, bad))} outside [0, {T}) of the schedule of the "
                             f"pretrained model '{name}'", fix=f"use timesteps between 0 and {T - 1}")


# ---- organ size groups -----------------------------------------------------------------------
def class_sizes(dataset: str | int) -> dict[str, float]:
    """Mean voxel count of every foreground class over the labelled preprocessed cases.

    Cases where a class is absent count as 0. The preprocessed grid has the same spacing for
    every case, so voxel counts compare volumes. Cached in ``ablations/class_sizes.json``
    (keyed by the preprocessing hash and the case list).
    """
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.preprocessing.preprocess import preprocessing_hash
    from diffprobe.preprocessing.storage import case_paths, load_array
    from diffprobe.workflows.train_probe import labelled_ids

    data_dir, plans, ids = preprocessed_cases(dataset)
    labelled = labelled_ids(data_dir, ids)
    if not labelled:
        raise DiffprobeError("no labelled preprocessed case", data_dir, "add labelsTr and rerun plan_and_preprocess")
    key = {"preprocessing_hash": preprocessing_hash(plans), "cases": labelled}
    cache = ablation_dir(dataset, "class_sizes.json")
    if cache.is_file():
        try:
            old = read_json(cache)
            if {k: old.get(k) for k in key} == key:
                return {k: float(v) for k, v in old["mean_voxels"].items()}
        except (ValueError, KeyError, OSError):
            pass
    names = {v: k for k, v in plans["labels"].items() if v != 0}
    n = max(plans["labels"].values()) + 1
    totals = np.zeros(n, dtype=np.float64)
    for ident in labelled:
        seg = load_array(case_paths(data_dir, ident)["seg"])  # only the label map, not the image
        totals += np.bincount(seg.reshape(-1).astype(np.int64), minlength=n)[:n]
    sizes = {names[v]: float(totals[v] / len(labelled)) for v in sorted(names)}
    groups = size_groups(sizes)
    write_json(cache, {**key, "mean_voxels": sizes, "groups": groups})
    return sizes


def size_groups(sizes: dict[str, float]) -> dict[str, list[str]]:
    """Terciles of the classes sorted by size (largest first): big / medium / small.

    ``np.array_split`` rule: group sizes differ by at most one, the larger groups first
    (7 classes -> 3 / 2 / 2; 2 classes -> big 1, medium 1, small empty). Ties keep label order.
    """
    order = sorted(sizes, key=lambda c: -sizes[c])  # stable: equal sizes keep the label order
    parts = np.array_split(np.arange(len(order)), 3)
    return {g: [order[i] for i in part] for g, part in zip(SIZE_GROUPS, parts)}


def _group_means(dice: dict[str, float], groups: dict[str, list[str]]) -> dict[str, float]:
    return {g: _nanmean(dice.get(c, float("nan")) for c in members) for g, members in groups.items()}


# ---- running (or reusing) one probe ---------------------------------------------------------------
def run_probe(dataset: str | int, fold: str, pretrained: str, timesteps: list[int] | None, configuration: str,
              steps: int | None = None, head: str = "fpn", device: str = "auto",
              overrides: dict[str, Any] | None = None, show_progress: bool = True
              ) -> tuple[dict, Path, list[int], bool]:
    """Train one probe, or reuse it when its folder already holds ``checkpoint_final.pt``.

    Returns (validation summary, folder, timesteps, reused). A finished run trained with other
    settings (timesteps, head, probe settings, or a pretrained model that changed since) is an
    error rather than silently mixed into a table.
    """
    from diffprobe.pretraining.pretrain import model_dir
    from diffprobe.probe.model import file_checksum, probe_dir
    from diffprobe.workflows.train_probe import probe_config, train_probe

    settings = {**(overrides or {}), "steps": steps}
    folder = probe_dir(dataset, configuration, str(fold))
    if (folder / "checkpoint_final.pt").is_file() and (folder / "probe.json").is_file():
        meta = read_json(folder / "probe.json")
        cfg = probe_config(settings)
        wanted = {"pretrained": pretrained, "head": head, "finetune": False,
                  "pretrained_checksum": file_checksum(model_dir(pretrained) / "diffusion" / "checkpoint_final.pt"),
                  "config": {k: v for k, v in cfg.items() if k not in _IGNORED_PROBE_SETTINGS}}
        if timesteps:  # a set: the configuration name does not depend on the order
            wanted["timesteps"] = sorted(int(t) for t in timesteps)
        found = {**{k: meta.get(k) for k in wanted}, "timesteps": sorted(meta.get("timesteps", [])),
                 "config": {k: v for k, v in meta.get("config", {}).items() if k not in _IGNORED_PROBE_SETTINGS}}
        changed = [k for k in wanted if found[k] != wanted[k]]
        if changed:
            raise DiffprobeError(f"an earlier ablation run in this folder used different {', '.join(changed)}",
                                 folder, "delete the folder to retrain it, or rerun with the original settings "
                                 f"(it used --steps {meta.get('config', {}).get('steps')})")
        summary_path = folder / "validation" / "summary.json"
        if summary_path.is_file():
            summary = read_json(summary_path)
        else:  # interrupted during the final validation: validate the finished probe
            from diffprobe.devices import resolve_device
            from diffprobe.predict.validation import validate_fold
            from diffprobe.preprocessing.access import preprocessed_cases

            data_dir, _, _ = preprocessed_cases(dataset)
            summary = validate_fold(folder, data_dir, meta["val_cases"], resolve_device(device), show_progress)
        return summary, folder, [int(t) for t in meta["timesteps"]], True
    result = train_probe(dataset, str(fold), pretrained, head=head, device=device,
                         resume=(folder / "probe.json").is_file(), overrides=settings, timesteps=timesteps,
                         show_progress=show_progress, configuration=configuration)
    if result.validation is None:  # pragma: no cover - only off the main DDP rank
        raise DiffprobeError("the probe finished without a validation summary", folder)
    return result.validation, folder, [int(t) for t in read_json(folder / "probe.json")["timesteps"]], False


def _probe_run(label: str, dataset, fold, pretrained, timesteps, configuration, groups, steps, head, device,
               overrides, show_progress, info: dict | None = None) -> ProbeRun:
    summary, folder, used, reused = run_probe(dataset, fold, pretrained, timesteps, configuration, steps, head,
                                              device, overrides, show_progress)
    dice = {c: float(m["Dice"]) if m.get("Dice") is not None else float("nan")
            for c, m in summary["mean"].items()}
    return ProbeRun(label, configuration, folder, pretrained, used, dice, _group_means(dice, groups),
                    _nanmean(dice.values()), reused, dict(info or {}))


# ---- tables ------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def _rows(runs: list[ProbeRun], classes: list[str], lead: list[str]) -> tuple[list[str], list[dict]]:
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


GROUP_COLOURS = {"big": "tab:blue", "medium": "tab:orange", "small": "tab:red", "mean": "black"}


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


# ---- 1. timesteps --------------------------------------------------------------------------------
def ablate_timesteps(dataset: str | int, timesteps: list[int] | None = None, pretrained: str = "default",
                     fold: str = "0", steps: int | None = None, head: str = "fpn", device: str = "auto",
                     overrides: dict[str, Any] | None = None, show_progress: bool = True) -> AblationResult:
    """One probe per single timestep, plus one on the plans' feature_timesteps (the planned set)."""
    from diffprobe.preprocessing.access import preprocessed_cases

    _, plans, _ = preprocessed_cases(dataset)
    meta = _model_meta(pretrained)
    singles = list(dict.fromkeys(int(t) for t in (timesteps or DEFAULT_TIMESTEPS)))
    planned = [int(t) for t in plans["diffusion"]["feature_timesteps"]]
    _check_timesteps(singles + planned, meta, pretrained)
    sizes = class_sizes(dataset)
    groups = size_groups(sizes)
    classes = list(sizes)
    diffusion = meta["plans"]["diffusion"]  # the schedule the pretrained denoiser was trained with
    runs = []
    for t in singles:
        runs.append(_probe_run(f"t={t}", dataset, fold, pretrained, [t], timesteps_configuration([t], pretrained, head),
                               groups, steps, head, device, overrides, show_progress,
                               {"run": f"t={t}", "timesteps": [t], "noise_std": noise_stds(diffusion, [t])}))
    planned_run = _probe_run("planned", dataset, fold, pretrained, planned,
                             timesteps_configuration(planned, pretrained, head), groups, steps, head, device,
                             overrides, show_progress,
                             {"run": "planned", "timesteps": planned, "noise_std": noise_stds(diffusion, planned)})
    runs.append(planned_run)
    columns, rows = _rows(runs, classes, ["run", "timesteps", "noise_std"])
    out = ablation_dir(dataset, "timesteps")
    stem = f"{pretrained}__fold_{fold}" + ("" if head == "fpn" else f"__{head}")
    csv_path = write_csv(out / f"{stem}.csv", columns, rows)
    steps_used = read_json(planned_run.folder / "probe.json")["config"]["steps"]
    title = (f"{paths.dataset_name(dataset)}: single-timestep probes, model '{pretrained}', fold {fold}, "
             f"{steps_used} steps")
    png = plot_timesteps(runs[:-1], planned_run, title, out / f"{stem}.png")
    return AblationResult("timesteps", runs, classes, groups, columns, rows, csv_path, png)


# ---- 2./3. guidance and backbone ----------------------------------------------------------------------
def _ensure_model(dataset: str | int, name: str, guidance: str, attention: str, preset: str,
                  overrides: dict[str, Any] | None, device: str, show_progress: bool) -> None:
    """Pretrain ``name`` unless it is finished (resumes an interrupted one)."""
    from diffprobe.pretraining.pretrain import model_dir, pretrain

    out = model_dir(name)
    if (out / "diffusion" / "checkpoint_final.pt").is_file() and (out / "model.json").is_file():
        meta = read_json(out / "model.json")
        if meta.get("guidance") != guidance or meta.get("attention", "planned") != attention:
            raise DiffprobeError(f"the existing model '{name}' has guidance {meta.get('guidance')} and attention "
                                 f"{meta.get('attention')}, not {guidance} / {attention}", out,
                                 "delete it (or pass the models to compare with --models)")
        return
    pretrain([str(dataset)], name=name, guidance=guidance, attention=attention, preset=preset, device=device,
             resume=(out / "model.json").is_file(), overrides=overrides, show_progress=show_progress)


def _model_info(name: str) -> dict[str, Any]:
    from diffprobe.models import count_parameters
    from diffprobe.pretraining.sample import load_denoiser

    meta = _model_meta(name)
    denoiser, _ = load_denoiser(name, "cpu")
    return {"model": name, "guidance": meta["guidance"], "attention": meta.get("attention", "planned"),
            "preset": meta.get("preset", {}).get("preset", ""), "parameters": count_parameters(denoiser)}


def _compare_models(kind: str, dataset: str | int, models: list[str], fold: str, steps: int | None, head: str,
                    device: str, overrides: dict[str, Any] | None, show_progress: bool,
                    legend: Callable[[dict], str], lead: list[str]) -> AblationResult:
    from diffprobe.preprocessing.access import preprocessed_cases

    models = list(dict.fromkeys(models))
    if not models:
        raise DiffprobeError(f"no models to compare in the {kind} ablation",
                             fix="name them with --models A --models B, or use --pretrain")
    _, plans, _ = preprocessed_cases(dataset)
    infos = {m: _model_info(m) for m in models}
    for m in models:
        _check_timesteps([int(t) for t in plans["diffusion"]["feature_timesteps"]], _model_meta(m), m)
    sizes = class_sizes(dataset)
    groups = size_groups(sizes)
    classes = list(sizes)
    runs = []
    planned = [int(t) for t in plans["diffusion"]["feature_timesteps"]]
    for m in models:
        info = {**infos[m], "legend": legend(infos[m])}
        config = f"ablate_{kind}_{m}" + ("" if head == "fpn" else f"__{head}")
        runs.append(_probe_run(m, dataset, fold, m, planned, config, groups, steps, head, device, overrides,
                               show_progress, info))
        runs[-1].info["timesteps"] = runs[-1].timesteps
    columns, rows = _rows(runs, classes, [*lead, "timesteps"])
    out = ablation_dir(dataset, kind)
    stem = f"fold_{fold}" + ("" if head == "fpn" else f"__{head}")
    csv_path = write_csv(out / f"{stem}.csv", columns, rows)
    title = f"{paths.dataset_name(dataset)}: {kind} ablation, fold {fold}"
    png = plot_bars(runs, classes, groups, title, out / f"{stem}.png")
    return AblationResult(kind, runs, classes, groups, columns, rows, csv_path, png)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def ablate_guidance(dataset: str | int, models: list[str] | None = None, fold: str = "0", steps: int | None = None,
                    pretrain_missing: bool = False, modes: list[str] | None = None, preset: str = "tiny",
                    pretrain_overrides: dict[str, Any] | None = None, head: str = "fpn", device: str = "auto",
                    overrides: dict[str, Any] | None = None, show_progress: bool = True) -> AblationResult:
    """Probe pretrained models that differ in guidance (read from each model.json).

    ``pretrain_missing``: every model named ``ablate_<mode>`` is pretrained with that guidance
    when missing (resumed when interrupted). Without ``models`` (or with ``modes``) the models
    ``ablate_<mode>`` for ``modes`` (default: none, random, physical, bpr) are compared, plus
    any ``models`` given.
    """
    from diffprobe.pretraining.data import GUIDANCE_MODES

    models = list(models or [])
    if pretrain_missing:
        if modes is not None or not models:
            own = [f"ablate_{m}" for m in (modes or GUIDANCE_ORDER)]
            models = own + [m for m in models if m not in own]
        for name in models:
            mode = name[len("ablate_"):] if name.startswith("ablate_") else None
            if mode in GUIDANCE_MODES:
                _ensure_model(dataset, name, mode, "planned", preset, pretrain_overrides, device, show_progress)
    return _compare_models("guidance", dataset, models, fold, steps, head, device, overrides, show_progress,
                           lambda i: f"{i['model']} (guidance {i['guidance']})",
                           ["model", "guidance", "attention", "parameters"])


def backbone_model_name(attention: str, guidance: str = "bpr") -> str:
    return f"ablate_attn_{attention}" + ("" if guidance == "bpr" else f"__{guidance}")


def ablate_backbone(dataset: str | int, models: list[str] | None = None, fold: str = "0", steps: int | None = None,
                    pretrain_missing: bool = False, guidance: str = "bpr", preset: str = "tiny",
                    pretrain_overrides: dict[str, Any] | None = None, head: str = "fpn", device: str = "auto",
                    overrides: dict[str, Any] | None = None, show_progress: bool = True) -> AblationResult:
    """Probe denoisers with the planned attention vs pure convolution; reports parameter counts.

    ``pretrain_missing``: every model named ``ablate_attn_<attention>[__<guidance>]`` is
    pretrained when missing (no suffix: bpr guidance). Without ``models``, the pair
    ``ablate_attn_planned`` / ``ablate_attn_none`` (suffixed ``__<guidance>`` when ``guidance``
    is not bpr) is compared.
    """
    from diffprobe.pretraining.data import GUIDANCE_MODES

    models = list(models or [])
    if pretrain_missing:
        if not models:
            models = [backbone_model_name(a, guidance) for a in ATTENTION_ORDER]
        own = {backbone_model_name(a, g): (a, g) for a in ATTENTION_ORDER for g in GUIDANCE_MODES}
        for name in models:
            if name in own:
                attention, mode = own[name]
                _ensure_model(dataset, name, mode, attention, preset, pretrain_overrides, device, show_progress)
    return _compare_models("backbone", dataset, models, fold, steps, head, device, overrides, show_progress,
                           lambda i: f"{i['model']} (attention {i['attention']}, {_millions(i['parameters'])})",
                           ["model", "attention", "guidance", "parameters"])


# ---- 4. tune_timesteps ------------------------------------------------------------------------------
def greedy_forward_selection(candidates: list[int], score: Callable[[list[int]], float], k: int,
                             single_scores: dict[int, float] | None = None
                             ) -> tuple[list[int], float, list[dict[str, Any]]]:
    """Start from the best single timestep; add the candidate that most improves the score.

    Stops at ``k`` timesteps or when no candidate improves the score strictly. Ties go to the
    earlier candidate. NaN scores count as worst. Returns (sorted set, its score, trace).
    """
    if k < 1:
        raise DiffprobeError(f"--k must be at least 1 (got {k})")
    if not candidates:
        raise DiffprobeError("no candidate timesteps", fix="give them with --t 5 10 30 60")
    candidates = list(dict.fromkeys(int(t) for t in candidates))
    singles = {t: (single_scores or {}).get(t) for t in candidates}
    singles = {t: s if s is not None else score([t]) for t, s in singles.items()}
    trace = [{"step": 1, "timesteps": [t], "dice": s, "selected": False} for t, s in singles.items()]
    first = max(candidates, key=lambda t: (_score_key(singles[t]), -candidates.index(t)))
    chosen, best = [first], singles[first]
    trace[candidates.index(first)]["selected"] = True
    step = 1
    while len(chosen) < min(k, len(candidates)):
        step += 1
        trial = {}
        for c in candidates:
            if c in chosen:
                continue
            trial[c] = score(sorted([*chosen, c]))
            trace.append({"step": step, "timesteps": sorted([*chosen, c]), "dice": trial[c], "selected": False})
        pick = max(trial, key=lambda c: (_score_key(trial[c]), -candidates.index(c)))
        if not _score_key(trial[pick]) > _score_key(best):
            break
        chosen, best = sorted([*chosen, pick]), trial[pick]
        next(e for e in trace if e["step"] == step and e["timesteps"] == chosen)["selected"] = True
    return sorted(chosen), best, trace


def _tuned_diffusion(plans: dict, chosen: list[int], record: dict) -> dict:
    """The plans' diffusion block with the chosen timesteps and their noise levels recorded.

    The reference levels become the chosen timesteps' noise levels (in reference units), so a
    later schedule change that keeps noise levels keeps the tuned ones.
    """
    from diffprobe.planning import planner

    diff = dict(plans["diffusion"])
    scale = planner.intensity_scale(plans["preprocessing"]["normalization"])
    levels = [s * scale for s in noise_stds(diff, chosen)]
    new = planner.plan_diffusion(plans["preprocessing"]["normalization"], noise_levels=levels, timesteps=chosen,
                                 **_schedule(diff))
    noise = dict(new["feature_noise"])
    noise["definition"] = (noise["definition"].split("; targets are")[0] + "; reference levels: the noise stds of "
                           "the timesteps chosen by tune_timesteps (validation Dice), in reference units")
    noise["chosen_by"] = "tune_timesteps (greedy forward selection on validation Dice)"
    diff.update({"feature_timesteps": new["feature_timesteps"], "feature_noise": noise,
                 "feature_timesteps_source": "tune_timesteps", "feature_timesteps_tuning": record})
    return diff


def tune_timesteps(dataset: str | int, candidates: list[int] | None = None, pretrained: str = "default",
                   fold: str = "0", k: int = 3, steps: int | None = None, head: str = "fpn", device: str = "auto",
                   overrides: dict[str, Any] | None = None, write: bool = True,
                   show_progress: bool = True) -> TuneResult:
    """Pick the feature timesteps by validation Dice and write them into the dataset's plans.json.

    1. the single-timestep sweep over ``candidates`` (+ the planned set), reusing finished runs;
    2. greedy forward selection from the best single timestep, up to ``k`` timesteps;
    3. the greedy set replaces the plans' feature_timesteps unless the planned set scored
       strictly higher (then the plans keep it); either way the measurement is recorded in
       ``diffusion.feature_timesteps_source`` / ``feature_timesteps_tuning``.
    """
    from diffprobe.planning.plans import PLANS_FILENAME, load_plans, save_plans, validate_plans

    if k < 1:
        raise DiffprobeError(f"--k must be at least 1 (got {k})")
    plans_path = paths.preprocessed_dir(dataset) / PLANS_FILENAME
    plans = load_plans(plans_path)
    candidates = list(dict.fromkeys(int(t) for t in (candidates or sorted(
        {*DEFAULT_TIMESTEPS, *plans["diffusion"]["feature_timesteps"]}))))
    sweep = ablate_timesteps(dataset, candidates, pretrained, fold, steps, head, device, overrides, show_progress)
    single = {r.timesteps[0]: r.mean for r in sweep.runs[:-1]}
    planned_run = sweep.runs[-1]
    groups = sweep.size_groups

    def score(ts: list[int]) -> float:
        return _probe_run("+".join(map(str, ts)), dataset, fold, pretrained, ts,
                          timesteps_configuration(ts, pretrained, head), groups, steps, head, device, overrides,
                          show_progress).mean

    greedy, greedy_dice, trace = greedy_forward_selection(candidates, score, k, single)
    planned = list(planned_run.timesteps)
    keep_planned = _score_key(planned_run.mean) > _score_key(greedy_dice) and sorted(planned) != greedy
    chosen, dice = (planned, planned_run.mean) if keep_planned else (greedy, greedy_dice)
    notes = []
    if keep_planned:
        notes.append(f"the planned set {planned} scored higher ({planned_run.mean:.4f}) than the greedy set "
                     f"{greedy} ({greedy_dice:.4f}); the plans keep it")
    model_sched = _schedule(_model_meta(pretrained)["plans"]["diffusion"])
    if model_sched != _schedule(plans["diffusion"]):
        notes.append(f"the pretrained model's schedule {model_sched} differs from the dataset plans' "
                     f"{_schedule(plans['diffusion'])}: the timesteps were measured under the model's")
    steps_used = read_json(planned_run.folder / "probe.json")["config"]["steps"]
    record = {"pretrained": pretrained, "fold": str(fold), "probe_steps": steps_used, "head": head, "k": k,
              "candidates": candidates, "validation_dice": dice, "greedy_timesteps": greedy,
              "greedy_dice": greedy_dice, "planned_timesteps": planned, "planned_dice": planned_run.mean,
              "single_timestep_dice": {str(t): v for t, v in single.items()}}
    record = _json_safe(record)
    if write:
        plans = load_plans(plans_path)  # fresh read: keep edits made while the probes trained
        if keep_planned:
            plans["diffusion"] = {**plans["diffusion"], "feature_timesteps_source": "tune_timesteps",
                                  "feature_timesteps_tuning": record}
        else:
            plans["diffusion"] = _tuned_diffusion(plans, chosen, record)
        validate_plans(plans, plans_path)
        save_plans(plans, plans_path)  # atomic
    out = ablation_dir(dataset, "tune_timesteps")
    stem = f"{pretrained}__fold_{fold}" + ("" if head == "fpn" else f"__{head}")
    rows = [{"step": e["step"], "timesteps": e["timesteps"], "dice_mean": e["dice"], "selected": e["selected"]}
            for e in trace]
    rows.append({"step": "planned", "timesteps": planned, "dice_mean": planned_run.mean,
                 "selected": keep_planned})
    csv_path = write_csv(out / f"{stem}.csv", ["step", "timesteps", "dice_mean", "selected"], rows)
    return TuneResult(chosen, dice, greedy, greedy_dice, planned, planned_run.mean, single, trace, plans_path,
                      write, csv_path, sweep, notes)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
