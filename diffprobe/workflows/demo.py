"""``diffprobe demo``: the whole pipeline on built-in phantoms, in one command.

make_phantoms -> plan_and_preprocess -> pretrain (tiny) -> train (probe, fold all) ->
predict (held-out phantoms) -> evaluate, in its own folder (``--output``, default
``./diffprobe_demo``) with its own raw/preprocessed/results roots. Every stage resumes, so
rerunning after an interruption continues where it stopped. ``compare`` adds two controls
with the same head and budget: the probe on a randomly initialised, untrained denoiser
(PyTorch's standard init, :mod:`diffprobe.pretraining.baseline`; same BPR) and the head on the
image + guidance channels alone (no denoiser). The full set of controls, with a from-scratch
UNet and fine-tuning, is ``diffprobe ablate controls``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from diffprobe import paths

DEMO_DATASET = "Dataset001_Phantoms"


@dataclass
class DemoSize:
    """Budgets of one demo run; ``quick`` is the reduced size CI runs."""

    num_labelled: int = 8
    num_unlabelled: int = 4
    num_test: int = 4
    fov_mm: float = 110.0
    size_class: str = "tiny"  # the planner's size class: a few minutes of pretraining on 2 CPU cores
    bpr_steps: int | None = None  # None: as planned for the size class
    diffusion_steps: int | None = None
    probe_steps: int = 1000
    probe_width: int = 16  # half the default head width: halves the probe's CPU time at equal Dice here
    phase: str = "portal_venous"  # contrast phase of the phantoms (BTCV's); "native" is the harder task

    @classmethod
    def quick(cls) -> DemoSize:
        return cls(num_labelled=3, num_unlabelled=1, num_test=1, fov_mm=60.0, bpr_steps=4, diffusion_steps=4,
                   probe_steps=4)


@dataclass
class DemoResult:
    folder: Path
    rows: dict[str, dict] = field(default_factory=dict)  # model -> evaluation summary
    seconds: dict[str, float] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)


def _timed(result: DemoResult, stage: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    result.seconds[stage] = result.seconds.get(stage, 0.0) + time.perf_counter() - t0
    return out


def _probe_and_score(result: DemoResult, pretrained: str, size: DemoSize, device: str, show: bool,
                     extractor: str = "denoiser", name: str | None = None) -> dict:
    from diffprobe.evaluation import evaluate_folders
    from diffprobe.predict.predictor import predict
    from diffprobe.probe.model import ProbeFolder, configuration_name
    from diffprobe.workflows.train_probe import train_probe

    name = name or pretrained
    config = configuration_name(pretrained, "fpn", False) + ("" if extractor == "denoiser" else f"__{extractor}")
    probe_folder = ProbeFolder.of(1, config, "all")
    if not probe_folder.checkpoint.is_file():
        resume = probe_folder.meta_path.is_file()
        _timed(result, f"train ({name})", train_probe, 1, "all", pretrained, device=device, resume=resume,
               overrides={"steps": size.probe_steps, "width": size.probe_width}, show_progress=show,
               final_validation=False, configuration=config, extractor=extractor)
    raw = paths.raw_dataset_dir(1)
    preds = result.folder / "predictions" / name
    _timed(result, f"predict ({name})", predict, raw / "imagesTs", preds, dataset=1, configuration=config,
           device=device, continue_prediction=True, show_progress=show)
    from diffprobe.dataset.dataset_json import load_dataset_json

    labels = load_dataset_json(raw).labels
    return _timed(result, "evaluate", evaluate_folders, raw / "labelsTs", preds, labels=labels,
                  output=preds / "summary.json", show_progress=False)


def _drop_stale_probe(result: DemoResult, pretrained: str) -> None:
    """Forget the random-init probe and predictions of an older demo whose denoiser was rebuilt
    (older versions made a degenerate one; the probe would refuse to load)."""
    import shutil

    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.model import ProbeFolder, configuration_name
    from diffprobe.utils import read_json

    probe = ProbeFolder.of(1, configuration_name(pretrained, "fpn", False), "all")
    if probe.meta_path.is_file() and read_json(probe.meta_path).get("pretrained_checksum") != \
            PretrainedModel(pretrained).checksum():
        shutil.rmtree(probe.folder)
        shutil.rmtree(result.folder / "predictions" / pretrained, ignore_errors=True)


def run_demo(folder: str | Path = "diffprobe_demo", compare: bool = False, size: DemoSize | None = None,
             device: str = "auto", show_progress: bool = True, *, compare_random: bool | None = None) -> DemoResult:
    """Run (or continue) the demo in ``folder``; returns the evaluation rows, timings and figures.

    ``compare_random`` is the deprecated name of ``compare``.
    """
    compare = compare or bool(compare_random)
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    size = size or DemoSize()
    folder = Path(folder).resolve()
    result = DemoResult(folder)
    with paths.roots_at(folder) as roots:
        raw = roots["raw"] / DEMO_DATASET
        if not (raw / "dataset.json").is_file():
            cfg = PhantomConfig(num_train_labelled=size.num_labelled, num_train_unlabelled=size.num_unlabelled,
                                num_test=size.num_test, fov_mm=size.fov_mm, phase=size.phase)
            _timed(result, "make_phantoms", make_phantom_dataset, raw, cfg)
        _timed(result, "plan_and_preprocess", plan_and_preprocess, 1, num_processes=2, show_progress=show_progress,
               plan_kwargs={"size_class": size.size_class})
        model = PretrainedModel("demo")
        if not model.finished:
            _timed(result, "pretrain", pretrain, ["1"], name="demo", device=device,
                   resume=model.exists, show_progress=show_progress,
                   overrides={"bpr_steps": size.bpr_steps, "diffusion_steps": size.diffusion_steps})
        result.rows["pretrained"] = _probe_and_score(result, "demo", size, device, show_progress)
        if compare:
            from diffprobe.pretraining.baseline import make_random_init_model

            make_random_init_model("demo", "demo_random_init")
            _drop_stale_probe(result, "demo_random_init")
            result.rows["random init"] = _probe_and_score(result, "demo_random_init", size, device, show_progress)
            result.rows["no backbone"] = _probe_and_score(result, "demo", size, device, show_progress,
                                                          extractor="input", name="demo_no_backbone")
        from diffprobe.overlays import plot_overlays

        result.figures.append(plot_overlays(raw / "imagesTs", raw / "labelsTs", result.folder / "predictions" / "demo",
                                            result.folder / "overlay.png"))
        result.figures += sorted((roots["results"]).rglob("*_curve.png"))
    return result


def format_rows(result: DemoResult) -> str:
    """Dice per class, one row per model, plus the mean over foreground classes."""
    rows = list(result.rows.items())
    classes = list(rows[0][1]["mean"])
    names = {str(v): n for n, v in rows[0][1]["labels"].items()}
    head = f"{'model':<14}" + "".join(f"{names.get(c, c)[:12]:>13}" for c in classes) + f"{'mean':>9}"
    lines = [head, "-" * len(head)]
    for name, summary in rows:
        vals = [summary["mean"][c]["Dice"] for c in classes]
        fg = summary["foreground_mean"]["Dice"]
        lines.append(f"{name:<14}" + "".join(f"{v:>13.3f}" for v in vals) + f"{fg:>9.3f}")
    return "\n".join(lines)
