"""Where predict's time goes, and what each speed setting changes, side by side in one run.

Usage:
    python benchmarks/bench_predict_phases.py [--cases 5] [--volumes phantoms] [--threads 2] [--repeats 2]
        [--workdir /tmp/diffprobe_bench_predict] [--size_class tiny]

Uses bench_predict.py's set-up (Dataset902 phantoms and a probe trained on them; made when missing).
Inputs: ``phantoms`` = the first ``--cases`` raw images of Dataset902 (imagesTr + imagesTs) as one
folder; any bench_predict volume name (``ct256``, ``ct512``...) = that single volume.

For each setting, in this one process (a warm-up prediction first, so imports and kernel selection
are not charged to the first setting), ``diffprobe.predict.predict`` is timed end to end (wall)
and per phase (``timings``: preprocess = read + integrity check + crop/resample/normalise;
guidance = BPR coordinates of the whole volume; window = sliding window; argmax; export = label
map back to the raw grid + write). With the pipeline, preprocess and export of other cases run in
threads during the window, so phases add up to more than the wall time. Settings run in turn,
``--repeats`` rounds (order rotated each round); the table gives the median wall time, the phase
sums of the last round, and the wall time relative to ``before``:

    before          contiguous memory format, cases one after another (predict as of issue 4)
    channels_last   channels_last_3d weights and tiles, cases one after another
    default         channels_last_3d + pipeline (next case read, last case written, in threads)
    tile_batch 4    default with 4 tiles per forward

All settings must write the same label maps; the script checks the fraction of equal voxels
(float rounding may flip exact near-ties, nothing more) and prints it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import (  # noqa: E402
    CT_VOLUMES,
    DATASET_ID,
    DATASET_NAME,
    add_setup_arguments,
    ensure_models,
    ensure_volume,
    roots_env,
)
from bench_predict_support import first_images  # noqa: E402

PHASES = ("preprocess_s", "guidance_s", "window_s", "argmax_s", "export_s")


def settings_table():
    from diffprobe.predict.acceleration import InferenceSettings

    return {
        "before": InferenceSettings(channels_last=False, pipeline=False),
        "channels_last": InferenceSettings(channels_last=True, pipeline=False),
        "default": InferenceSettings(),
        "tile_batch 4": InferenceSettings(tile_batch=4),
    }


def phantom_inputs(work: Path, cases: int) -> Path:
    return first_images(work / "raw" / DATASET_NAME, work / "inputs" / f"phantoms{cases}", cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", nargs="+", default=["phantoms"], choices=["phantoms", *CT_VOLUMES])
    ap.add_argument("--cases", dest="input_cases", type=int, default=5, help="phantom cases in the 'phantoms' folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=None, help="subset of the settings (default: all)")
    add_setup_arguments(ap, cases_flag="--setup-cases")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    env = roots_env(args.workdir, args.threads)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("DIFFPROBE_", "nnUNet_", "OMP_", "MKL_"))})
    models = ensure_models(args, env)
    import numpy as np
    import SimpleITK as sitk
    import torch

    from diffprobe.predict.predictor import predict

    torch.set_num_threads(args.threads)
    config = models["diffprobe"]["configuration"]
    table = settings_table()
    chosen = args.settings or list(table)
    rows = []
    for vol in args.volumes:
        inputs = (phantom_inputs(args.workdir, args.input_cases) if vol == "phantoms"
                  else ensure_volume(vol, args.workdir)[0])
        n_cases = len(list(inputs.glob("*_0000.nii.gz")))
        out_root = args.workdir / "outputs" / f"phases_{vol}"
        warm = out_root / "warmup"
        shutil.rmtree(warm, ignore_errors=True)
        if vol == "phantoms":  # warm-up on the first case (imports, oneDNN kernel choice); CT volumes are long enough
            one = out_root / "warm_input"
            shutil.rmtree(one, ignore_errors=True)
            one.mkdir(parents=True)
            first = sorted(inputs.iterdir())[0]
            shutil.copyfile(first, one / first.name)
            predict(one, warm, DATASET_ID, config, device="cpu", show_progress=False)
        walls: dict[str, list[float]] = {s: [] for s in chosen}
        phases: dict[str, dict[str, float]] = {}
        for r in range(args.repeats):
            order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
            for name in order:
                out = out_root / name.replace(" ", "_")
                shutil.rmtree(out, ignore_errors=True)
                timings: list[dict] = []
                t0 = time.perf_counter()
                predict(inputs, out, DATASET_ID, config, device="cpu", show_progress=False,
                        settings=table[name], timings=timings)
                walls[name].append(time.perf_counter() - t0)
                phases[name] = {p: sum(t.get(p, 0.0) for t in timings) for p in PHASES}
                print(f"{vol} {name} round {r + 1}: {walls[name][-1]:.1f} s", flush=True)
        ref = {f.name: sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
               for f in (out_root / chosen[0].replace(" ", "_")).iterdir()}
        base = statistics.median(walls[chosen[0]])
        for name in chosen:
            out = out_root / name.replace(" ", "_")
            same = [np.mean(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f))) == a) for f, a in ref.items()]
            wall = statistics.median(walls[name])
            rows.append((vol, n_cases, name, wall, phases[name], wall / base, float(np.min(same))))

    print(f"\n{os.cpu_count()} CPU cores, {args.threads} torch threads, torch {torch.__version__}; probe {config} "
          f"(patch {models['diffprobe']['patch_size']}, timesteps {models['diffprobe']['timesteps']}); "
          f"median wall of {args.repeats} rounds; phases = sums over cases (last round)")
    print("| input | cases | setting | wall s | preprocess s | guidance s | window s | argmax s | export s "
          "| wall ÷ before | same labels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for vol, n, name, wall, ph, ratio, same in rows:
        cells = " | ".join(f"{ph[p]:.1f}" for p in PHASES)
        print(f"| {vol} | {n} | {name} | {wall:.1f} | {cells} | {ratio:.2f} | {same:.2%} |")


if __name__ == "__main__":
    main()
