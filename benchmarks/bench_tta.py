"""Test-time augmentation on the demo phantoms: Dice and seconds per case, with and without, per mode.

Usage:
    PYTHONPATH=. python benchmarks/bench_tta.py [--demo DIR] [--num-test 8]
        [--modes none noise2 noise4 noise8 mirror] [--threads 2] [--workdir /tmp/diffprobe_bench_tta]
        [--timing-rounds 3] [--timing-cases 2] [--reuse-predictions] [--quick]

Model: the probe of ``diffprobe demo`` (configuration ``demo__fpn``, fold ``all``) in ``--demo``
(default ``<workdir>/demo``). A finished demo folder is reused as it is (nothing in it is written);
otherwise ``diffprobe demo`` is run there first (trains once: ~55 min on the shared 2-core VM, BPR +
diffusion pretraining ~38 min, probe ~12-18 min; ``--quick`` the CI size, for a smoke test of this
script only: its probe is untrained). Result (docs/probe.md, "Test-time augmentation"): 4 noise
draws +0.014 mean Dice at 3.7x the time, mirroring -0.40.

Inputs: ``--num-test`` held-out phantoms generated with the demo dataset's own ``phantom_config``
(test indices phantom_100..: the first four are the demo's imagesTs, voxel for voxel), written to
``<workdir>/heldout`` (nnU-Net raw layout, imagesTs + labelsTs).

Modes, one model loaded once, cases one after another (``--sequential``: clean per-case timing):

    none      ``diffprobe predict`` default: one noise draw per tile (draw 0)
    noiseN    ``--tta --tta_draws N``: the softmax averaged over N independent feature-noise draws per tile
    mirror    what ``--tta`` was before issue 15: image and guidance mirrored over all three axes
              (8 forwards per tile, logits averaged; noise seeded by tile start, reused in the
              flipped frame); no longer offered by ``predict``, run here through the predictor's
              internal ``mirror_axes``

Prints, per mode: mean Dice per class and over the six foreground classes, the paired per-case
difference to ``none`` (mean and min..max over cases), the voxels whose label changed vs ``none``,
and seconds per case: of the Dice pass (each mode once, so under whatever load the machine had
then; the 1-min load average is printed beside it) and the best of ``--timing-rounds`` interleaved
rounds on ``--timing-cases`` cases (every mode in every round, order rotated: the fair comparison on
a shared machine), with its ratio to ``none``. Writes ``<workdir>/bench_tta.json`` (also window and
CPU seconds). ``--reuse-predictions`` scores complete prediction folders of an earlier run again
instead of predicting them (Dice is deterministic), e.g. to add the timing pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from diffprobe import paths

CONFIG = "demo__fpn"


def ensure_demo(folder: Path, quick: bool) -> None:
    """Run ``diffprobe demo`` in ``folder`` unless its probe is already trained there."""
    from diffprobe.errors import DiffprobeError
    from diffprobe.probe.model import ProbeFolder

    with paths.roots_at(folder):
        try:
            if ProbeFolder.of(1, CONFIG, "all").checkpoint.is_file():
                return
        except DiffprobeError:  # no dataset there yet
            pass
    from diffprobe.workflows.demo import DemoSize, run_demo

    print(f"training the demo model in {folder} (once)", flush=True)
    run_demo(folder, size=DemoSize.quick() if quick else DemoSize(), device="cpu", show_progress=False)


def make_heldout(demo: Path, out: Path, num_test: int) -> Path:
    """``num_test`` held-out phantoms from the demo dataset's phantom_config (imagesTs + labelsTs)."""
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    dataset = out / "Dataset001_Heldout"
    if (dataset / "dataset.json").is_file() and \
            len(list((dataset / "labelsTs").glob("*.nii.gz"))) == num_test:
        return dataset
    stored = json.loads((demo / "raw" / "Dataset001_Phantoms" / "dataset.json").read_text())["phantom_config"]
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    cfg = PhantomConfig(**{**stored, "num_train_labelled": 0, "num_train_unlabelled": 0, "num_test": num_test})
    return make_phantom_dataset(dataset, cfg)


def predict_mode(predictor, mode: str, inputs: Path, output: Path) -> dict:
    """Predict every input with one TTA mode; returns seconds (wall and CPU) per case."""
    from diffprobe.predict.predictor import _ensemble_logits

    draws = int(mode[len("noise"):]) if mode.startswith("noise") else 1
    if mode == "mirror":
        def mirrored(data, step_size=0.5, tta=False, progress=None, timings=None, spacing=None):
            spacing = spacing if spacing is not None else predictor.meta["plans"]["preprocessing"]["target_spacing"]
            return _ensemble_logits(predictor.groups, data, spacing, predictor.device, step_size, False, progress,
                                    predictor.settings, timings, mirror_axes=(0, 1, 2))
        predictor.logits = mirrored  # instance attribute: window_case calls self.logits
    timings: list[dict] = []
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        predictor.predict_folder(inputs, output, tta=draws, show_progress=False, timings=timings)
    finally:
        predictor.__dict__.pop("logits", None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(timings)
    return {"cases": n, "s_per_case": wall / n, "cpu_s_per_case": cpu / n, "load": os.getloadavg()[0],
            "window_s_per_case": sum(t.get("window_s", 0.0) for t in timings) / n, "draws": draws,
            "forwards_per_tile": 8 if mode == "mirror" else draws}


def changed_fraction(a: Path, b: Path) -> float:
    """Fraction of voxels whose label differs between the label maps of two folders."""
    changed = total = 0
    for f in sorted(a.glob("*.nii.gz")):
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(b / f.name)))
        changed += int((x != y).sum())
        total += x.size
    return changed / max(total, 1)


def case_means(summary: dict) -> dict[str, float]:
    """Mean Dice over the foreground classes per case (NaN classes, absent in both, skipped)."""
    out = {}
    for case in summary["metric_per_case"]:
        vals = [m["Dice"] for m in case["metrics"].values() if not math.isnan(m["Dice"])]
        out[Path(case["reference_file"]).name] = float(np.mean(vals)) if vals else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_bench_tta"))
    ap.add_argument("--demo", type=Path, default=None, help="a diffprobe demo folder (default <workdir>/demo)")
    ap.add_argument("--num-test", type=int, default=8, help="held-out phantoms to predict")
    ap.add_argument("--modes", nargs="+", default=["none", "noise2", "noise4", "noise8", "mirror"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="CI-size demo (untrained probe): smoke test only")
    ap.add_argument("--timing-rounds", type=int, default=3,
                    help="rounds of the timing pass (every mode on --timing-cases cases, order rotated per round)")
    ap.add_argument("--timing-cases", type=int, default=2)
    ap.add_argument("--reuse-predictions", action="store_true",
                    help="score a mode's existing predictions (complete folder) instead of predicting it again; "
                         "its Dice-pass seconds come from the previous bench_tta.json")
    args = ap.parse_args()
    bad = [m for m in args.modes if m not in ("none", "mirror") and not (m.startswith("noise") and m[5:].isdigit())]
    if bad or "none" not in args.modes:
        ap.error(f"modes are none, mirror and noiseN (N >= 2), and none is needed as the baseline; got {args.modes}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    demo = (args.demo or args.workdir / "demo").resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_demo(demo, args.quick)
    heldout = make_heldout(demo, args.workdir / "heldout", args.num_test)

    from diffprobe.dataset.dataset_json import load_dataset_json
    from diffprobe.evaluation import evaluate_folders
    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import Predictor, select_model

    labels = load_dataset_json(heldout).labels
    with paths.roots_at(demo):
        predictor = Predictor.from_folders(select_model(1, CONFIG, ["all"]), "cpu", InferenceSettings(pipeline=False))
    rows: dict[str, dict] = {}
    modes = ["none"] + [m for m in args.modes if m != "none"]
    previous_file = args.workdir / "bench_tta.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    for mode in modes:
        out = args.workdir / "predictions" / mode
        done = len(list(out.glob("*.nii.gz"))) == args.num_test
        if args.reuse_predictions and done:
            old = previous.get(mode, {})
            row = {k: old.get(k, float("nan")) for k in ("cases", "s_per_case", "cpu_s_per_case", "window_s_per_case",
                                                          "load")}
            row.update(draws=int(mode[5:]) if mode.startswith("noise") else 1,
                       forwards_per_tile=8 if mode == "mirror" else int(mode[5:]) if mode.startswith("noise") else 1)
        else:
            for f in out.glob("*"):
                f.unlink()
            row = predict_mode(predictor, mode, heldout / "imagesTs", out)
        row["summary"] = evaluate_folders(heldout / "labelsTs", out, labels=labels, show_progress=False)
        row["changed_vs_none"] = changed_fraction(args.workdir / "predictions" / "none", out)
        rows[mode] = row
        print(f"{mode}: mean Dice {row['summary']['foreground_mean']['Dice']:.4f}, "
              f"{row['s_per_case']:.1f} s/case", flush=True)
        report(rows, labels, args, demo)  # after every mode: a long run's partial table survives
    timing_pass(predictor, modes, rows, heldout / "imagesTs", args)
    report(rows, labels, args, demo)


def timing_pass(predictor, modes: list[str], rows: dict[str, dict], inputs: Path, args: argparse.Namespace) -> None:
    """Seconds per case again, on a few cases, every mode in each round (order rotated): on a shared machine
    the Dice pass's modes ran under different loads; the best of the rounds is the least disturbed."""
    if args.timing_rounds < 1:
        return
    subset = args.workdir / "timing_inputs"
    subset.mkdir(exist_ok=True)
    for f in sorted(inputs.glob("*_0000.nii.gz"))[:args.timing_cases]:
        if not (subset / f.name).exists():
            (subset / f.name).symlink_to(f.resolve())
    for r in range(args.timing_rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            out = args.workdir / "timing" / mode
            for f in out.glob("*"):
                f.unlink()
            t = predict_mode(predictor, mode, subset, out)
            rows[mode].setdefault("timing_s_per_case", []).append(t["s_per_case"])
            rows[mode].setdefault("timing_cpu_s_per_case", []).append(t["cpu_s_per_case"])
            rows[mode].setdefault("timing_load", []).append(t["load"])
            print(f"timing round {r + 1}: {mode} {t['s_per_case']:.1f} s/case (load {t['load']:.1f})", flush=True)


def report(rows: dict[str, dict], labels: dict[str, int], args: argparse.Namespace, demo: Path) -> None:
    """Print the table of the modes done so far and write ``<workdir>/bench_tta.json``."""
    names = {str(v): n for n, v in labels.items() if v != 0}
    classes = list(rows["none"]["summary"]["mean"])
    base = case_means(rows["none"]["summary"])
    head = (f"{'mode':<8}{'fwd/tile':>9}" + "".join(f"{names[c][:9]:>10}" for c in classes)
            + f"{'mean':>8}{'d mean':>8}{'d min..max':>16}{'changed':>9}{'s/case':>8}{'load':>6}{'best s':>8}"
            + f"{'x none':>8}")
    lines = [f"{len(base)} held-out phantoms, demo model {demo}, torch threads {args.threads}; s/case: the Dice "
             f"pass (load: 1-min load average after it); best s: the best of {args.timing_rounds} interleaved timing "
             f"rounds on {args.timing_cases} cases", head, "-" * len(head)]
    best_none = min(rows["none"].get("timing_s_per_case", [float("nan")]))
    for mode, row in rows.items():
        s = row["summary"]
        diffs = [v - base[k] for k, v in case_means(s).items()]
        dice = "".join(f"{s['mean'][c]['Dice']:>10.3f}" for c in classes)
        best = min(row.get("timing_s_per_case", [float("nan")]))
        lines.append(f"{mode:<8}{row['forwards_per_tile']:>9}" + dice
                     + f"{s['foreground_mean']['Dice']:>8.4f}{np.mean(diffs):>+8.4f}"
                     + f"{f'{min(diffs):+.3f}..{max(diffs):+.3f}':>16}{100 * row['changed_vs_none']:>8.2f}%"
                     + f"{row['s_per_case']:>8.1f}{row.get('load', float('nan')):>6.1f}{best:>8.1f}"
                     + f"{best / best_none:>8.2f}")
    print("\n".join(lines), flush=True)
    (args.workdir / "bench_tta.json").write_text(json.dumps(
        {m: {k: v for k, v in r.items() if k != "summary"} | {"mean_dice": r["summary"]["foreground_mean"]["Dice"],
                                                             "class_dice": {names[c]: r["summary"]["mean"][c]["Dice"]
                                                                            for c in classes},
                                                             "case_mean_dice": case_means(r["summary"])}
         for m, r in rows.items()}, indent=1, default=float))


if __name__ == "__main__":
    main()
