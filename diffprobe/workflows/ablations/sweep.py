"""What every ablation shares: the sweep's settings, and training (or reusing) one scored probe.

An ablation is a sweep of quick probes that differ in one thing (the feature timesteps, the
pretrained model) and agree in everything else: dataset, fold, head, step budget, device, probe
and pretraining settings. ``SweepConfig`` names that shared part once, so the experiments take
it instead of threading the same eight arguments through every call, and the settings that
decide whether a finished probe may be reused come from one place (``run_probe``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.utils import read_json

# Settings that do not change the trained weights; a reused run may differ in them.
_IGNORED_PROBE_SETTINGS = ("checkpoint_every", "validate_every", "val_patches")


@dataclass(frozen=True)
class SweepConfig:
    """The settings shared by every probe (and every model it pretrains) in one ablation.

    ``steps`` and ``probe_overrides`` are probe settings (``PROBE_DEFAULTS`` keys of
    ``diffprobe/workflows/train_probe.py``; ``steps=None``: the probe default).
    ``pretrain_overrides`` (``diffusion_steps``, ``bpr_steps``, ``num_workers``...: single values
    over the dataset's planned training budgets) are only used when the guidance or backbone
    ablation pretrains its own missing models. The override mappings are stored as read-only
    copies, so a config cannot change under a running sweep.
    """

    dataset: str | int
    fold: str = "0"
    steps: int | None = None
    head: str = "fpn"
    device: str = "auto"
    probe_overrides: Mapping[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    pretrain_overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from diffprobe.probe.splits import parse_fold

        object.__setattr__(self, "fold", parse_fold(self.fold))  # "-1" is no fold (not "the last one")
        object.__setattr__(self, "probe_overrides", MappingProxyType(dict(self.probe_overrides or {})))
        object.__setattr__(self, "pretrain_overrides", MappingProxyType(dict(self.pretrain_overrides or {})))

    @property
    def probe_settings(self) -> dict[str, Any]:
        """The probe settings of every run of the sweep: the overrides plus ``steps``."""
        return {**self.probe_overrides, "steps": self.steps}

    @property
    def head_suffix(self) -> str:
        """Appended to configuration and file names: nothing for the default fpn head, else ``__<head>``."""
        return "" if self.head == "fpn" else f"__{self.head}"

    def stem(self, prefix: str = "") -> str:
        """File stem of a table or figure: ``[<prefix>__]fold_<f>[__<head>]``."""
        return (f"{prefix}__" if prefix else "") + f"fold_{self.fold}{self.head_suffix}"


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


def nanmean(values: Iterable[float | None]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def score_key(value: float | None) -> float:
    """Sort key of a Dice score: NaN (or None) counts as worst."""
    return -math.inf if value is None or math.isnan(value) else value


def ablation_dir(dataset: str | int, kind: str) -> Path:
    """``<results>/DatasetXXX_Name/diffprobe/ablations/<kind>``: the tables and figures of one kind."""
    return paths.results_dir(dataset) / "ablations" / kind


def model_meta(name: str) -> dict:
    """The ``model.json`` of a finished pretrained model; a clear error when there is none."""
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    model = PretrainedModel(name)
    if not model.finished:
        raise DiffprobeError(f"no finished pretrained model named '{name}'", model.folder,
                             f"pretrain it (`diffprobe pretrain -d ID --name {name} --guidance MODE`), "
                             "or let the ablation do it with --pretrain")
    return model.meta


def check_timesteps(timesteps: list[int], name: str, option: str = "feature timestep(s)") -> None:
    """Every timestep must lie in the schedule the pretrained model ``name`` was trained with
    (the same check and message as ``diffprobe train --t``: :meth:`PretrainedModel.check_timesteps`)."""
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    PretrainedModel(name).check_timesteps(timesteps, option)


def run_probe(config: SweepConfig, pretrained: str, timesteps: list[int] | None, configuration: str
              ) -> tuple[dict, Path, list[int], bool]:
    """Train one probe, or reuse it when its folder already holds ``checkpoint_final.pt``.

    Returns (validation summary, folder, timesteps, reused). A finished run trained with other
    settings (timesteps, head, probe settings, or a pretrained model that changed since) is an
    error rather than silently mixed into a table.
    """
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.model import probe_dir
    from diffprobe.workflows.train_probe import probe_config, train_probe

    settings = config.probe_settings
    folder = probe_dir(config.dataset, configuration, config.fold)
    if (folder / "checkpoint_final.pt").is_file() and (folder / "probe.json").is_file():
        meta = read_json(folder / "probe.json")
        cfg = probe_config(settings)
        wanted = {"pretrained": pretrained, "head": config.head, "finetune": False,
                  "pretrained_checksum": PretrainedModel(pretrained).checksum(),
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

            data_dir, _, _ = preprocessed_cases(config.dataset)
            summary = validate_fold(folder, data_dir, meta["val_cases"], resolve_device(config.device),
                                    config.show_progress)
        return summary, folder, [int(t) for t in meta["timesteps"]], True
    result = train_probe(config.dataset, config.fold, pretrained, head=config.head, device=config.device,
                         resume=(folder / "probe.json").is_file(), overrides=settings, timesteps=timesteps,
                         show_progress=config.show_progress, configuration=configuration)
    if result.validation is None:  # pragma: no cover - only off the main DDP rank
        raise DiffprobeError("the probe finished without a validation summary", folder)
    return result.validation, folder, [int(t) for t in read_json(folder / "probe.json")["timesteps"]], False


def score_probe(config: SweepConfig, label: str, pretrained: str, timesteps: list[int] | None, configuration: str,
                groups: dict[str, list[str]], info: dict | None = None) -> ProbeRun:
    """``run_probe``, then its validation Dice per class, per size group and over all classes."""
    summary, folder, used, reused = run_probe(config, pretrained, timesteps, configuration)
    dice = {c: float(m["Dice"]) if m.get("Dice") is not None else float("nan")
            for c, m in summary["mean"].items()}
    group_means = {g: nanmean(dice.get(c, float("nan")) for c in members) for g, members in groups.items()}
    return ProbeRun(label, configuration, folder, pretrained, used, dice, group_means, nanmean(dice.values()),
                    reused, dict(info or {}))
