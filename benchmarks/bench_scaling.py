"""Cost that grows as the work grows (issue 16): log-log slopes of predict, pretraining start-up and preprocessing.

Usage:
    python benchmarks/bench_scaling.py [--parts predict startup preprocess] [--threads 1]
        [--max-volume 600 512 512] [--sizes 4]       # (i) predict: 4 volumes, each axis halved from the largest
        [--counts 10 100 1000] [--steps 20] [--index cold warm]   # (ii) pretraining start-up per volume count
        [--np 1 2] [--cases 8] [--fov_mm 300]        # (iii) preprocessing throughput per -np
        [--workdir /tmp/diffprobe_bench_scaling] [--json out.json] [--png scaling.png]

(i) **predict time and peak RAM against volume size.** A ``cpu`` size-class probe (phantoms at CT
    spacing planned with ``--size_class cpu``: patch 24x64x64 at 3x1.5x1.5 mm; pretrained and trained
    for one step each: time does not depend on the weights) predicts CT-like volumes at 0.8x0.8x1.5 mm
    (``gpu_suite.ct_like_volume``, uncompressed NIfTI) of ``--sizes`` sizes, the largest
    ``--max-volume`` (z y x), each smaller one half of it per axis (1/8 of the voxels). Each run is its
    own process (``_measure.run_measured``): wall time, peak RSS and peak PSS summed over the process
    tree; the worker also reports predict's own seconds (model loaded) and phases.
(ii) **pretraining start-up against the number of preprocessed volumes.** For each count, a dataset of
    that many small volumes (24x48x48; half of them labelled, with the class_locations a real labelled
    case carries) written directly in the storage format (``preprocessing.storage.save_case``), then
    ``pretrain(stage="diffusion", guidance="physical")`` of the tiny class (patch 16x32x32, one loader
    worker) for ``--steps`` steps in its own process. Measured inside: seconds to index the
    volumes (``collect_volumes``), to the first optimiser step (from the process's start and from the
    ``pretrain`` call), RSS and PSS of the process tree (loader workers included) after the first and
    the last step, and how many properties JSONs and arrays were opened before the first step; each
    count without the case index (``cold``: removed first, as after preprocessing) and with it (``warm``).
(iii) **preprocessing throughput against -np.** ``diffprobe plan_and_preprocess --clean -np K`` on the
    same ``--cases`` phantoms (``--fov_mm`` 300: ~300-500 voxels in-plane), each K in its own process,
    ``--repeats`` rounds alternating K; cases/min and peak PSS of the fastest run of each K.

Every series gets its log-log slope (least squares of log y on log x): 1 = proportional, 0 = flat. The
figure has one panel per part. On a shared 2-core machine use ``--threads 1`` (2 threads on 2 busy
cores were up to 10x slower per step, docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_scaling_common import (  # noqa: E402  (parts (ii) and the report live in their own files, each < 400 lines)
    PREDICT_DATASET,
    PREPROCESS_DATASET,
    SPACING_ZYX,
    roots_env,
    run_worker,
    slope,
)
from bench_scaling_report import plot, print_tables  # noqa: E402
from bench_scaling_startup import part_startup, startup_worker  # noqa: E402


# ---- (i) predict against volume size -------------------------------------------------------------
def predict_sizes(max_volume: list[int], n: int) -> list[tuple[int, int, int]]:
    """``n`` sizes, the largest ``max_volume``, each smaller one half of the next per axis."""
    sizes = []
    for k in range(n - 1, -1, -1):
        sizes.append(tuple(max(8, v >> k) for v in max_volume))
    return sizes


def ensure_predict_model(work: Path, threads: int) -> dict:
    """A ``cpu`` size-class probe on CT-spaced phantoms (reused when present)."""
    import gpu_suite
    import torch

    from diffprobe.phantoms import PhantomConfig

    marker = work / "predict_setup.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    torch.set_num_threads(threads)
    ns = argparse.Namespace(workdir=work, dry_run=False, size_class="cpu", device="cpu", setup_steps=1)
    # 90 mm along z: 30 slices at the cpu class's 3 mm, more than its 24-slice patch (not capped)
    config = PhantomConfig(num_train_labelled=2, num_train_unlabelled=1, num_test=1, fov_mm=200,
                           spacing_inplane=(0.8, 0.8), spacing_slice=(1.5, 1.5), scan_length_mm=(90, 90))
    setup = gpu_suite.setup_model(ns, config, PREDICT_DATASET)
    marker.write_text(json.dumps(setup))
    return setup


def predict_worker(args: argparse.Namespace) -> None:
    """Predict one input folder with the probe, report predict's own seconds and phases."""
    import torch

    torch.set_num_threads(args.threads)
    from diffprobe.predict.predictor import Predictor

    t0 = time.perf_counter()
    predictor = Predictor.from_folders([Path(args.probe)], "cpu")
    load_s = time.perf_counter() - t0
    timings: list[dict] = []
    t0 = time.perf_counter()
    predictor.predict_folder(args.input, args.output, show_progress=False, timings=timings)
    print(json.dumps({"load_s": round(load_s, 2), "predict_s": round(time.perf_counter() - t0, 2),
                      "phases_s": {k: round(v, 2) for k, v in timings[0].items() if k.endswith("_s")}}))


def part_predict(args: argparse.Namespace) -> dict:
    import gpu_suite

    env = roots_env(args.workdir, args.threads)
    os.environ.update({k: v for k, v in env.items() if k.startswith("DIFFPROBE_")})
    setup = ensure_predict_model(args.workdir, args.threads)
    rows = []
    for shape in predict_sizes(args.max_volume, args.sizes):
        name = "x".join(map(str, shape))
        inputs = args.workdir / "predict_in" / name
        if not (inputs / "ct_0000.nii").is_file():
            shutil.rmtree(inputs, ignore_errors=True)
            gpu_suite.write_volume(inputs / "ct_0000.nii", gpu_suite.ct_like_volume(shape), SPACING_ZYX)
        out = args.workdir / "predict_out" / name
        shutil.rmtree(out, ignore_errors=True)
        print(f"predict {name} ...", end=" ", flush=True)
        row = {"shape_zyx": list(shape), "voxels": shape[0] * shape[1] * shape[2],
               **run_worker(["--predict-worker", "--probe", setup["probe_folder"], "--input", str(inputs),
                             "--output", str(out), "--threads", str(args.threads)], env, args.max_seconds)}
        print(f"{row.get('predict_s', 'failed')} s, peak PSS {row['peak_pss_gb']} GB", flush=True)
        rows.append(row)
        if "error" in row:
            print(row["error"], file=sys.stderr)
            break
    ok = [r for r in rows if "error" not in r]
    vox = [r["voxels"] for r in ok]
    big = ok[-2:]  # the two largest: where fixed costs (start-up, one-tile volumes) no longer dominate
    return {"model": setup, "threads": args.threads, "rows": rows,
            "slope_predict_s_two_largest": slope([r["voxels"] for r in big], [r["predict_s"] for r in big]),
            "slope_peak_pss_gb_two_largest": slope([r["voxels"] for r in big], [r["peak_pss_gb"] for r in big]),
            "slope_predict_s": slope(vox, [r["predict_s"] for r in ok]),
            "slope_wall_s": slope(vox, [r["wall_s"] for r in ok]),
            "slope_peak_pss_gb": slope(vox, [r["peak_pss_gb"] for r in ok]),
            "slope_peak_rss_gb": slope(vox, [r["peak_rss_gb"] for r in ok])}


# ---- (iii) preprocessing throughput against -np ----------------------------------------------------
def part_preprocess(args: argparse.Namespace) -> dict:
    """``--repeats`` rounds alternating the -np values (the machine's load drifts); the fastest run of each."""
    from _measure import run_measured

    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    env = roots_env(args.workdir / "pre", args.threads)
    raw = args.workdir / "pre" / "roots" / "raw" / f"Dataset{PREPROCESS_DATASET}_ScalingPre"
    if not (raw / "dataset.json").is_file():
        make_phantom_dataset(raw, PhantomConfig(num_train_labelled=args.cases, num_train_unlabelled=0, num_test=0,
                                                fov_mm=args.fov_mm))
    runs: dict[int, list[dict]] = {k: [] for k in args.np}
    for r in range(args.repeats):
        for k in args.np:
            cmd = [sys.executable, "-m", "diffprobe", "plan_and_preprocess", "-d", str(PREPROCESS_DATASET), "-np",
                   str(k), "--clean", "--size_class", "paper"]
            print(f"plan_and_preprocess -np {k} (round {r + 1}) ...", end=" ", flush=True)
            m = run_measured(cmd, env, poll_s=0.1, pss=True)
            run = {"seconds": round(m.seconds, 2), "peak_pss_gb": round(m.peak_pss_gb, 3),
                   "peak_rss_gb": round(m.peak_rss_gb, 3), "load": [round(v, 2) for v in os.getloadavg()]}
            if m.returncode != 0:
                run["error"] = m.output_tail[-1500:]
            print(f"{run['seconds']} s", flush=True)
            runs[k].append(run)
    rows = []
    for k, rs in runs.items():
        good = [x for x in rs if "error" not in x]
        best = min(good, key=lambda x: x["seconds"]) if good else rs[0]
        rows.append({"np": k, **best, "cases_per_min": args.cases / best["seconds"] * 60, "all_runs": rs})
    ok = [r for r in rows if "error" not in r]
    return {"cases": args.cases, "fov_mm": args.fov_mm, "rows": rows,
            "slope_cases_per_min": slope([r["np"] for r in ok], [r["cases_per_min"] for r in ok]),
            "slope_peak_pss_gb": slope([r["np"] for r in ok], [r["peak_pss_gb"] for r in ok])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["predict", "startup", "preprocess"],
                    default=["predict", "startup", "preprocess"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-volume", type=int, nargs=3, default=[600, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--sizes", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=3600, help="kill a worker after this long")
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--index", nargs="+", choices=["cold", "warm"], default=["cold", "warm"],
                    help="start-up without the case index (first run after preprocessing) and with it")
    ap.add_argument("--workers", type=int, default=1, help="loader processes of the start-up runs (tiny: 1)")
    ap.add_argument("--np", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", type=int, default=8, help="phantoms for the preprocessing runs")
    ap.add_argument("--fov_mm", type=float, default=300.0, help="their field of view (300: ~300-500 voxels "
                    "in-plane, so that the work, not process start-up, dominates)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the preprocessing runs (fastest kept)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_bench_scaling"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    # workers
    ap.add_argument("--predict-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--startup-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.predict_worker:
        predict_worker(args)
        return
    if args.startup_worker:
        startup_worker(args)
        return
    import platform

    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                              "threads": args.threads, "load_before": [round(v, 2) for v in os.getloadavg()],
                              "command": " ".join(sys.argv), "parts": {}}
    json_path = args.json or args.workdir / "bench_scaling.json"
    for part in args.parts:
        t0 = time.perf_counter()
        report["parts"][part] = {"predict": part_predict, "startup": part_startup,
                                 "preprocess": part_preprocess}[part](args)
        report["parts"][part]["seconds"] = round(time.perf_counter() - t0, 1)
        report["load_after_" + part] = [round(v, 2) for v in os.getloadavg()]
        json_path.write_text(json.dumps(report, indent=2))
    png = args.png or args.workdir / "scaling.png"
    plot(report, png)
    print_tables(report)
    print(f"\nload before {report['load_before']}; raw numbers {json_path}; figure {png}")


if __name__ == "__main__":
    main()
