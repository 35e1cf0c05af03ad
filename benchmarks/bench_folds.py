"""A five-fold ensemble vs one fold: fold heads on one frozen denoiser share one feature extraction.

Usage:
    python benchmarks/bench_folds.py [--cases 3] [--threads 2] [--repeats 1]
        [--workdir /tmp/diffprobe_bench_folds] [--size-class tiny] [--setup-cases 5]

Set-up (reused when already in the work dir): a labelled phantom dataset (Dataset903, ``--setup-cases``
cases, the default phantom size), ``plan_and_preprocess`` (planner size class ``--size-class``), a
pretrained model (a few steps) and five fold probes (folds 0-4, fpn head, a few steps each: timing
does not depend on quality). Inputs: the first ``--cases`` raw images.

Timed, side by side, each in its own subprocess (wall time including start-up and model loading;
peak RSS of the process; per-case phases from ``predict(timings=...)``), every round in the order:

    1 fold          ``-f 0``
    5 folds         ``-f 0 1 2 3 4``: one denoiser forward per tile feeds the five heads (default)
    5 folds, per-fold extraction   the same with ``InferenceSettings(share_features=False)``, i.e. one
                    extraction per fold and tile (what predict did before)

Prints seconds per case (wall / cases), window seconds per case, the CPU seconds of the ``predict``
call (all threads; less sensitive than wall time to other load on the machine), peak RSS, the ratio to one fold
(goal: five folds <= 1.3x one fold) and the fraction of voxels where the shared and per-fold
five-fold label maps agree (must be 100 %).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured  # noqa: E402
from bench_predict_support import first_images  # noqa: E402

DATASET_ID = 903
DATASET_NAME = f"Dataset{DATASET_ID}_BenchFolds"
PRETRAINED = "bench_folds"
FOLDS = ["0", "1", "2", "3", "4"]
RUNS = {"1 fold": (FOLDS[:1], True), "5 folds": (FOLDS, True), "5 folds, per-fold extraction": (FOLDS, False)}


def roots_env(work: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DIFFPROBE_RAW": str(work / "raw"), "DIFFPROBE_PREPROCESSED": str(work / "preprocessed"),
                "DIFFPROBE_RESULTS": str(work / "results"), "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads)})
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(var, None)
    return env


def ensure_folds(args: argparse.Namespace) -> str:
    """Phantoms, pretrained model and five fold probes (each step skipped when its output exists)."""
    import torch

    torch.set_num_threads(args.threads)
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset
    from diffprobe.predict.inputs import trained_configurations
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.probe.model import configuration_name
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
    from diffprobe.workflows.train_probe import train_probe

    name = f"{PRETRAINED}_{args.size_class}"
    config = configuration_name(name, "fpn", False)
    raw = args.workdir / "raw" / DATASET_NAME
    done = trained_configurations(DATASET_ID).get((DATASET_NAME, config), []) if raw.is_dir() else []
    if all(f in done for f in FOLDS):
        return config
    if not (raw / "dataset.json").is_file():
        print(f"making phantoms in {raw}", flush=True)
        make_phantom_dataset(raw, PhantomConfig(num_train_labelled=args.cases_setup, num_train_unlabelled=0,
                                                num_test=1))
    plan_and_preprocess(DATASET_ID, num_processes=2, show_progress=False, plan_kwargs={"size_class": args.size_class})
    if not (args.workdir / "results" / "pretrained" / name / "diffusion" / "checkpoint_final.pt").is_file():
        print(f"pretraining '{name}' ({args.pretrain_steps} steps per stage)", flush=True)
        pretrain([str(DATASET_ID)], name=name, device="cpu", show_progress=False,
                 overrides={"bpr_steps": args.pretrain_steps, "diffusion_steps": args.pretrain_steps,
                            "num_workers": 0})
    for fold in FOLDS:
        if fold not in done:
            print(f"training fold {fold} of {config} ({args.probe_steps} steps)", flush=True)
            train_probe(DATASET_ID, fold, name, device="cpu", overrides={"steps": args.probe_steps,
                                                                         "validate_every": 0},
                        show_progress=False, final_validation=False, seed=int(fold))
    return config


def inputs_folder(work: Path, cases: int) -> Path:
    return first_images(work / "raw" / DATASET_NAME, work / "inputs" / f"cases{cases}", cases)


def worker(args: argparse.Namespace) -> None:
    """One timed prediction (run as a subprocess): prints its per-case timings as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import predict

    timings: list[dict] = []
    cpu = time.process_time()
    predict(args.inputs, args.output, DATASET_ID, args.configuration, folds=args.folds, device="cpu",
            show_progress=False, settings=InferenceSettings(share_features=not args.no_share), timings=timings)
    print("TIMINGS " + json.dumps({"cases": timings, "cpu_s": time.process_time() - cpu}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_bench_folds"))
    ap.add_argument("--cases", type=int, default=3, help="input cases predicted per run")
    ap.add_argument("--setup-cases", dest="cases_setup", type=int, default=5, help="labelled set-up phantoms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--size-class", dest="size_class", default="tiny", help="planner size class of the set-up")
    ap.add_argument("--pretrain-steps", type=int, default=5)
    ap.add_argument("--probe-steps", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--configuration", help=argparse.SUPPRESS)
    ap.add_argument("--folds", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--no_share", action="store_true", help="(worker) one feature extraction per fold")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.workdir = args.workdir.resolve()
    env = roots_env(args.workdir, args.threads)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("DIFFPROBE_", "OMP_", "MKL_"))})
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.pop(var, None)
    config = ensure_folds(args)
    inputs = inputs_folder(args.workdir, args.cases)
    n_cases = len(list(inputs.iterdir()))
    walls: dict[str, list[float]] = {r: [] for r in RUNS}
    windows: dict[str, list[float]] = {r: [] for r in RUNS}
    peaks: dict[str, list[float]] = {r: [] for r in RUNS}
    cpus: dict[str, list[float]] = {r: [] for r in RUNS}
    outputs: dict[str, Path] = {}
    for r in range(args.repeats):
        for run, (folds, share) in RUNS.items():
            out = args.workdir / "outputs" / run.replace(" ", "_").replace(",", "")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--inputs", str(inputs), "--output",
                   str(out), "--configuration", config, "--threads", str(args.threads), "--folds", *folds,
                   *([] if share else ["--no_share"])]
            m = run_measured(cmd, env=env)
            if m.returncode != 0:
                sys.exit(f"{run} failed:\n{m.output_tail}")
            report = json.loads(next(line for line in m.output_tail.splitlines()
                                     if line.startswith("TIMINGS "))[len("TIMINGS "):])
            walls[run].append(m.seconds)
            windows[run].append(sum(t.get("window_s", 0.0) for t in report["cases"]))
            cpus[run].append(report["cpu_s"])
            peaks[run].append(m.peak_rss_gb)
            outputs[run] = out
            print(f"round {r + 1} {run}: {m.seconds:.1f} s wall, window {windows[run][-1]:.1f} s, "
                  f"predict CPU {cpus[run][-1]:.1f} s, peak {m.peak_rss_gb:.2f} GB", flush=True)

    import numpy as np
    import SimpleITK as sitk
    import torch

    def labels(folder: Path) -> dict[str, np.ndarray]:
        return {f.name: sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in sorted(folder.glob("*.nii.gz"))}

    shared, per_fold = labels(outputs["5 folds"]), labels(outputs["5 folds, per-fold extraction"])
    same = min(float(np.mean(shared[k] == per_fold[k])) for k in shared)
    base_wall, base_window = statistics.median(walls["1 fold"]), statistics.median(windows["1 fold"])
    print(f"\n{os.cpu_count()} CPU cores, {args.threads} torch threads, torch {torch.__version__}; {config}, "
          f"{n_cases} phantom cases, median of {args.repeats} round(s)")
    base_cpu = statistics.median(cpus["1 fold"])
    print("| run | s/case (wall) | window s/case | predict CPU s/case | peak RSS GB | wall ÷ 1 fold "
          "| window ÷ 1 fold | CPU ÷ 1 fold |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in RUNS:
        wall, window, cpu = (statistics.median(v[run]) for v in (walls, windows, cpus))
        print(f"| {run} | {wall / n_cases:.1f} | {window / n_cases:.1f} | {cpu / n_cases:.1f} | "
              f"{max(peaks[run]):.2f} | {wall / base_wall:.2f} | {window / base_window:.2f} | {cpu / base_cpu:.2f} |")
    print(f"5 folds shared vs per-fold extraction: {same:.2%} equal voxels (minimum over cases)")


if __name__ == "__main__":
    main()
