"""Comparing pretrained models by their probes: the shared machinery of the guidance and backbone ablations.

Both ablations ask "which pretrained denoiser gives the better features?": they pretrain the
missing models of the comparison (``ensure_model``), train one probe per model on the plans'
feature timesteps, and report each model's settings and parameter count next to its Dice.
Only the model names, the legend and the leading columns differ (``guidance.py``,
``backbone.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.workflows.ablations.organ_sizes import class_sizes, size_groups
from diffprobe.workflows.ablations.report import plot_bars, table_rows, write_csv
from diffprobe.workflows.ablations.sweep import (
    AblationResult,
    SweepConfig,
    ablation_dir,
    check_timesteps,
    model_meta,
    score_probe,
)


def ensure_model(config: SweepConfig, name: str, guidance: str, attention: str) -> None:
    """Pretrain ``name`` unless it is finished (resumes an interrupted one).

    Uses the config's dataset, ``pretrain_overrides``, device and progress setting (the budgets
    are the dataset's planned ones). A finished model with another guidance or attention is an
    error, never silently compared.
    """
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    model = PretrainedModel(name)
    if model.finished:
        meta = model.meta
        if meta.get("guidance") != guidance or meta.get("attention", "planned") != attention:
            raise DiffprobeError(f"the existing model '{name}' has guidance {meta.get('guidance')} and attention "
                                 f"{meta.get('attention')}, not {guidance} / {attention}", model.folder,
                                 "delete it (or pass the models to compare with --models)")
        return
    pretrain([str(config.dataset)], name=name, guidance=guidance, attention=attention, device=config.device,
             resume=model.exists, overrides=dict(config.pretrain_overrides), show_progress=config.show_progress)


def model_info(name: str) -> dict[str, Any]:
    """What describes a pretrained model in the tables: name, guidance, attention, parameters."""
    from diffprobe.models import count_parameters
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    meta = model_meta(name)
    denoiser = PretrainedModel(name).load_denoiser("cpu")
    return {"model": name, "guidance": meta["guidance"], "attention": meta.get("attention", "planned"),
            "parameters": count_parameters(denoiser)}


def compare_models(kind: str, config: SweepConfig, models: list[str], legend: Callable[[dict], str],
                   lead: list[str]) -> AblationResult:
    """One probe per model (configuration ``ablate_<kind>_<model>``) on the plans' feature timesteps.

    Writes ``ablations/<kind>/fold_<f>[__<head>].csv`` (columns ``lead``, ``timesteps``, the Dice
    columns) and a bar chart ``.png`` whose bars are labelled by ``legend(model info)``.
    """
    from diffprobe.preprocessing.access import preprocessed_cases

    models = list(dict.fromkeys(models))
    if not models:
        raise DiffprobeError(f"no models to compare in the {kind} ablation",
                             fix="name them with --models A --models B, or use --pretrain")
    _, plans, _ = preprocessed_cases(config.dataset)
    infos = {m: model_info(m) for m in models}
    for m in models:
        check_timesteps([int(t) for t in plans["diffusion"]["feature_timesteps"]], m)
    sizes = class_sizes(config.dataset)
    groups = size_groups(sizes)
    classes = list(sizes)
    runs = []
    planned = [int(t) for t in plans["diffusion"]["feature_timesteps"]]
    for m in models:
        info = {**infos[m], "legend": legend(infos[m])}
        runs.append(score_probe(config, m, m, planned, f"ablate_{kind}_{m}{config.head_suffix}", groups, info))
        runs[-1].info["timesteps"] = runs[-1].timesteps
    columns, rows = table_rows(runs, classes, [*lead, "timesteps"])
    out = ablation_dir(config.dataset, kind)
    stem = config.stem()
    csv_path = write_csv(out / f"{stem}.csv", columns, rows)
    title = f"{paths.dataset_name(config.dataset)}: {kind} ablation, fold {config.fold}"
    png = plot_bars(runs, classes, groups, title, out / f"{stem}.png")
    return AblationResult(kind, runs, classes, groups, columns, rows, csv_path, png)
