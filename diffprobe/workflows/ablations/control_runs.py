"""One row of the controls (or of the label sweep): train or reuse its probe, score it on validation and test.

Why apart from ``sweep.run_probe``: the controls' rows are not all frozen probes on a
pretrained model — the no-backbone row has no denoiser, the from-scratch and fine-tune rows
train the network — so the "may this finished run be reused?" check compares those settings
too (``extractor``, ``init``, ``finetune``, the training cases), and the pretrained model's
checksum only where its weights are used. Each row is also scored on the raw dataset's
``imagesTs``/``labelsTs`` when it has them (cases no model trained or was selected on), and
its wall time is kept in the sweep's record file so a reused row still reports it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.utils import read_json, write_json
from diffprobe.workflows.ablations.sweep import SweepConfig, nanmean

_IGNORED_PROBE_SETTINGS = ("checkpoint_every", "validate_every", "val_patches")


@dataclass(frozen=True)
class RowSpec:
    """What one row trains: the probe settings beyond the sweep's shared ones."""

    row: str  # pretrained, random_init, no_backbone, from_scratch, finetune
    pretrained: str  # the pretrained model the probe is built on (architecture, guidance, BPR; weights if used)
    configuration: str
    finetune: bool = False
    extractor: str = "denoiser"
    init: str = "pretrained"
    overrides: dict[str, Any] = field(default_factory=dict)  # probe settings (steps, finetune_lr...)
    train_cases: tuple[str, ...] | None = None
    head_init: str | None = None  # configuration of the frozen probe (same fold) a fine-tune starts from

    @property
    def uses_pretrained_weights(self) -> bool:
        return self.extractor == "denoiser" and self.init == "pretrained"


@dataclass
class RowResult:
    spec: RowSpec
    folder: Path
    dice: dict[str, float]  # validation, class name -> Dice
    test_dice: dict[str, float]  # test set (empty without one)
    test_cases: int
    steps: int
    train_seconds: float  # the training loop, from the probe's log
    wall_seconds: float  # training + final validation, as measured when it was trained (NaN if unknown)
    reused: bool

    @property
    def mean(self) -> float:
        return nanmean(self.dice.values())

    @property
    def test_mean(self) -> float:
        return nanmean(self.test_dice.values()) if self.test_dice else float("nan")


def row_settings(config: SweepConfig, spec: RowSpec) -> dict[str, Any]:
    return {**config.probe_settings, **spec.overrides}


def _check_reusable(config: SweepConfig, spec: RowSpec, meta: dict, folder: Path) -> None:
    """A finished run with other settings stops the sweep rather than enter its table."""
    from diffprobe.preprocessing.access import preprocessed_cases
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.train_probe import probe_config

    _, plans, _ = preprocessed_cases(config.dataset)
    cfg = probe_config(row_settings(config, spec), plans)
    wanted: dict[str, Any] = {
        "pretrained": spec.pretrained, "head": config.head, "finetune": spec.finetune or spec.init == "scratch",
        "extractor": spec.extractor, "init": spec.init,
        "config": {k: v for k, v in cfg.items() if k not in _IGNORED_PROBE_SETTINGS}}
    if spec.uses_pretrained_weights:
        wanted["pretrained_checksum"] = PretrainedModel(spec.pretrained).checksum()
    found = {k: meta.get(k) for k in wanted}
    found.update(extractor=meta.get("extractor", "denoiser"), init=meta.get("init", "pretrained"),
                 config={k: v for k, v in meta.get("config", {}).items() if k not in _IGNORED_PROBE_SETTINGS})
    wanted["head_init"], found["head_init"] = spec.head_init, meta.get("head_init")
    if spec.train_cases is not None:
        wanted["train_cases"] = sorted(spec.train_cases)
        found["train_cases"] = sorted(meta.get("train_cases", []))
    changed = [k for k in wanted if found[k] != wanted[k]]
    if changed:
        raise DiffprobeError(f"an earlier {spec.row} run in this folder used different {', '.join(changed)}",
                             folder, "delete the folder to retrain it, or rerun with the original settings "
                             f"(it used --steps {meta.get('config', {}).get('steps')})")


def train_or_reuse(config: SweepConfig, spec: RowSpec) -> tuple[dict, Path, bool, float | None]:
    """(validation summary, folder, reused, wall seconds of the training now or None if reused)."""
    from diffprobe.probe.model import ProbeFolder, probe_dir
    from diffprobe.workflows.train_probe import train_probe

    probe = ProbeFolder.of(config.dataset, spec.configuration, config.fold)
    if probe.finished:
        meta = probe.read_meta()
        _check_reusable(config, spec, meta, probe.folder)
        summary_path = probe.validation_dir / "summary.json"
        if summary_path.is_file():
            return read_json(summary_path), probe.folder, True, None
        from diffprobe.devices import resolve_device
        from diffprobe.predict.validation import validate_fold
        from diffprobe.preprocessing.access import preprocessed_cases

        data_dir, _, _ = preprocessed_cases(config.dataset)
        summary = validate_fold(probe.folder, data_dir, meta["val_cases"], resolve_device(config.device),
                                config.show_progress)
        return summary, probe.folder, True, None
    t0 = time.perf_counter()
    result = train_probe(config.dataset, config.fold, spec.pretrained, head=config.head, finetune=spec.finetune,
                         device=config.device, resume=probe.meta_path.is_file(), overrides=row_settings(config, spec),
                         show_progress=config.show_progress, configuration=spec.configuration,
                         extractor=spec.extractor, init=spec.init,
                         train_cases=list(spec.train_cases) if spec.train_cases is not None else None,
                         head_init=probe_dir(config.dataset, spec.head_init, config.fold) if spec.head_init else None)
    if result.validation is None:  # pragma: no cover - only off the main DDP rank
        raise DiffprobeError("the probe finished without a validation summary", probe.folder)
    return result.validation, probe.folder, False, time.perf_counter() - t0


def test_set(dataset: str | int) -> tuple[Path, Path] | None:
    """(imagesTs, labelsTs) of the raw dataset when it has labelled test cases, else None."""
    raw = paths.raw_dataset_dir(dataset)
    images, labels = raw / "imagesTs", raw / "labelsTs"
    if images.is_dir() and labels.is_dir() and any(labels.iterdir()):
        return images, labels
    return None


def score_test(config: SweepConfig, spec: RowSpec, folder: Path, out: Path) -> tuple[dict[str, float], int]:
    """Dice per class of the row's probe on the raw test cases (predicted into ``out``); ({}, 0) without any.

    Predictions are kept (and resumed) while the probe's checkpoint is the same; a retrained
    probe's old predictions are discarded first.
    """
    from diffprobe.dataset.dataset_json import load_dataset_json
    from diffprobe.evaluation import evaluate_folders
    from diffprobe.predict.predictor import predict
    from diffprobe.pretraining.pretrained_model import file_checksum

    found = test_set(config.dataset)
    if found is None:
        return {}, 0
    images, labels_dir = found
    stamp = file_checksum(folder / "checkpoint_final.pt")
    stamp_file = out / "probe_checksum.txt"
    if out.is_dir() and (not stamp_file.is_file() or stamp_file.read_text().strip() != stamp):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp + "\n")
    predict(images, out, dataset=config.dataset, configuration=spec.configuration, folds=[config.fold],
            device=config.device, continue_prediction=True, show_progress=config.show_progress)
    labels = load_dataset_json(paths.raw_dataset_dir(config.dataset)).labels
    summary = evaluate_folders(labels_dir, out, labels=labels, output=out / "summary.json", show_progress=False)
    names = {str(v): n for n, v in summary["labels"].items()}
    dice = {names.get(k, k): float(m["Dice"]) if m.get("Dice") is not None else float("nan")
            for k, m in summary["mean"].items()}
    return dice, int(summary["num_cases"])


def run_row(config: SweepConfig, spec: RowSpec, record: dict, test_out: Path) -> RowResult:
    """Train (or reuse) the row's probe, score it on validation and test; ``record`` keeps wall times."""
    from diffprobe.workflows.ablations.time_budget import logged_seconds

    summary, folder, reused, wall = train_or_reuse(config, spec)
    meta = read_json(folder / "probe.json")
    key = f"{spec.configuration}/fold_{config.fold}"
    if wall is not None:
        record[key] = {"wall_seconds": wall}
    wall_seconds = float(record.get(key, {}).get("wall_seconds", float("nan")))
    dice = {c: float(m["Dice"]) if m.get("Dice") is not None else float("nan") for c, m in summary["mean"].items()}
    test_dice, n_test = score_test(config, spec, folder, test_out)
    train_seconds = logged_seconds(folder, int(meta["config"]["batch_size"]))
    return RowResult(spec, folder, dice, test_dice, n_test, int(meta["config"]["steps"]),
                     float("nan") if train_seconds is None else train_seconds, wall_seconds, reused)


def measure_step_seconds(config: SweepConfig, spec: RowSpec, warm: int = 2, timed: int = 4) -> float:
    """Seconds per training step of ``spec``'s probe on this machine, measured in a throwaway folder.

    ``warm`` steps are trained first; the run is then resumed to ``warm + timed`` steps, whose
    log reports the throughput of the resumed segment only, so start-up costs (loading, the
    first allocations) do not count.
    """
    import json

    from diffprobe.probe.model import probe_dir
    from diffprobe.training.trainer import LOG_FILENAME
    from diffprobe.workflows.train_probe import train_probe

    name = f"{spec.configuration}__timing"
    folder = probe_dir(config.dataset, name, config.fold)
    shutil.rmtree(folder, ignore_errors=True)
    settings = {**row_settings(config, spec), "validate_every": 0, "checkpoint_every": 10**9}
    common = {"head": config.head, "finetune": spec.finetune, "device": config.device, "show_progress": False,
              "final_validation": False, "configuration": name, "extractor": spec.extractor, "init": spec.init,
              "train_cases": list(spec.train_cases) if spec.train_cases is not None else None}
    try:
        train_probe(config.dataset, config.fold, spec.pretrained, overrides={**settings, "steps": warm}, **common)
        train_probe(config.dataset, config.fold, spec.pretrained, resume=True,
                    overrides={**settings, "steps": warm + timed}, **common)
        last = json.loads((folder / LOG_FILENAME).read_text().splitlines()[-1])
        batch = int(read_json(folder / "probe.json")["config"]["batch_size"])
        return batch / float(last["samples_per_s"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()  # no empty configuration left for predict's model lookup


class Record(dict):
    """A sweep's record file (wall times, from-scratch budgets), written through on every change,
    so a sweep killed half-way keeps what its finished rows measured."""

    def __init__(self, path: Path) -> None:
        super().__init__(read_json(path) if path.is_file() else {})
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        write_json(self.path, dict(self))
