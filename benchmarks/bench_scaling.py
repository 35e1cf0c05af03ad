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

PREDICT_DATASET = 920
SCALING_DATASET_BASE = 930  # + index of the count
PREPROCESS_DATASET = 921
SPACING_ZYX = (1.5, 0.8, 0.8)
VOLUME_SHAPE = (24, 48, 48)
STARTUP_PATCH = [16, 32, 32]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Log-log slope (exponent of y ~ x^k) by least squares; None with fewer than 2 usable points."""
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def roots_env(work: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({f"DIFFPROBE_{k.upper()}": str(work / "roots" / k) for k in ("raw", "preprocessed", "results")})
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def tree_memory() -> dict[str, float]:
    """RSS and PSS (GB) summed over this process and its children (the loader workers)."""
    import contextlib

    import psutil

    root = psutil.Process()
    rss = pss = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
    return {"rss_gb": rss / 1024**3, "pss_gb": pss / 1024**3}


def run_worker(args_list: list[str], env: dict[str, str], timeout_s: float) -> dict:
    """This file as a worker subprocess (measured); its last stdout line is its JSON result."""
    from _measure import run_measured

    cmd = ["timeout", "--kill-after=10", str(int(timeout_s)), sys.executable, str(Path(__file__).resolve()),
           *args_list]
    m = run_measured(cmd, env, poll_s=0.1, pss=True)
    out: dict[str, Any] = {"wall_s": round(m.seconds, 2), "peak_rss_gb": round(m.peak_rss_gb, 3),
                           "peak_pss_gb": round(m.peak_pss_gb, 3), "returncode": m.returncode}
    if m.returncode != 0:
        out["error"] = m.output_tail[-1500:]
        return out
    last = [line for line in m.output_tail.splitlines() if line.startswith("{")]
    out.update(json.loads(last[-1]) if last else {"error": "no result line"})
    return out


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


# ---- (ii) pretraining start-up against the number of volumes -------------------------------------
def write_synthetic_dataset(preprocessed_root: Path, dataset_id: int, count: int, labelled_fraction: float = 0.5,
                            shape: tuple[int, int, int] = VOLUME_SHAPE, seed: int = 0) -> Path:
    """``count`` small preprocessed volumes written straight in the storage format, with tiny plans.

    Why not plan_and_preprocess: 1000 raw volumes would time the preprocessing, not the start-up.
    The labelled half carries ``class_locations`` of the size real labelled cases have (6 classes x
    1000 voxels), because the properties JSON is what an index reads per volume.
    """
    import numpy as np

    from diffprobe.planning.planner import plan
    from diffprobe.preprocessing.preprocess import preprocessing_hash
    from diffprobe.preprocessing.storage import save_case
    from diffprobe.utils import write_json

    folder = preprocessed_root / f"Dataset{dataset_id:03d}_Scaling{count}" / "diffprobe"
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()).get("count") == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    fingerprint = {"spacings": [[3.0, 1.5, 1.5]] * 2, "shapes_after_crop": [list(shape)] * 2,
                   "channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"organ{i}": i for i in range(1, 7)}},
                   "dataset": folder.parent.name, "median_spacing": [3.0, 1.5, 1.5], "num_cases": count,
                   "num_labelled": int(count * labelled_fraction)}
    plans = plan(fingerprint, size_class="tiny", patch_size=STARTUP_PATCH)
    write_json(folder / "plans.json", plans)
    phash = preprocessing_hash(plans)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    base = np.where(x**2 + y**2 < 0.8, 0.2, -1.0).astype(np.float32)
    n_lab = int(round(count * labelled_fraction))
    for i in range(count):
        data = (base + np.round(rng.normal(0, 0.05, shape) * 64) / 64).astype(np.float32)[None]
        labelled = i < n_lab
        seg = None
        props = {"identifier": f"vol_{i:05d}", "preprocessing_hash": phash, "labelled": labelled,
                 "axis_order": "z, y, x (canonical)", "shape_after_resampling": list(shape),
                 "target_spacing": [3.0, 1.5, 1.5], "spacing_before_resampling": [3.0, 1.5, 1.5],
                 "shape_after_crop": list(shape), "shape_before_crop": list(shape),
                 "bbox": [[0, s] for s in shape], "class_locations": None}
        if labelled:
            seg = ((x**2 + y**2 < 0.3) * (1 + (i % 6))).astype(np.uint8)
            props["class_locations"] = {str(c): rng.integers(0, 48, (1000, 3)).tolist() for c in range(1, 7)}
        save_case(folder / "data", props["identifier"], data, seg, props, STARTUP_PATCH)
    done.write_text(json.dumps({"count": count}))
    return folder


def startup_worker(args: argparse.Namespace) -> None:
    """``pretrain`` (diffusion stage, physical guidance) for ``--steps`` steps, instrumented from inside."""
    t_start = time.perf_counter()
    counts = {"json_opens": 0, "array_opens": 0}

    def audit(event: str, event_args: tuple) -> None:
        if event == "open" and isinstance(event_args[0], str) and event_args[0].endswith(".json") \
                and "/data/" in event_args[0]:
            counts["json_opens"] += 1

    sys.addaudithook(audit)
    import blosc2
    import torch

    torch.set_num_threads(args.threads)
    blosc_open = blosc2.open

    def counted_open(*a, **k):
        counts["array_opens"] += 1
        return blosc_open(*a, **k)

    blosc2.open = counted_open  # storage.open_array calls blosc2.open at call time (this process only)
    from diffprobe.pretraining import pretrain as pt
    from diffprobe.training.trainer import Trainer

    t_imported = time.perf_counter()
    marks: dict[str, Any] = {"steps": []}
    collect = pt.collect_volumes

    def timed_collect(datasets):
        t0 = time.perf_counter()
        out = collect(datasets)
        marks["index_s"] = time.perf_counter() - t0
        marks["index_opens"] = dict(counts)
        return out

    pt.collect_volumes = timed_collect
    apply = Trainer.apply_gradients

    def marked_apply(self, loss) -> None:
        apply(self, loss)
        marks["steps"].append(time.perf_counter())
        if len(marks["steps"]) == 1:
            marks["memory_first"] = tree_memory()
            marks["opens_first"] = dict(counts)
        if len(marks["steps"]) == args.steps:
            marks["memory_last"] = tree_memory()

    Trainer.apply_gradients = marked_apply
    t_call = time.perf_counter()
    pt.pretrain([str(args.dataset)], name=f"scaling_{args.dataset}", stage="diffusion", guidance="physical",
                device="cpu", show_progress=False,
                overrides={"diffusion_steps": args.steps, "num_workers": args.workers, "checkpoint_every": 10**6})
    first = marks["steps"][0]
    print(json.dumps({"import_s": round(t_imported - t_start, 3), "index_s": round(marks["index_s"], 3),
                      "first_step_from_start_s": round(first - t_start, 3),
                      "first_step_from_call_s": round(first - t_call, 3),
                      "steps_s": round(marks["steps"][-1] - first, 3), "steps": args.steps,
                      "index_opens": marks["index_opens"], "opens_before_first_step": marks["opens_first"],
                      "memory_first": marks["memory_first"], "memory_last": marks["memory_last"]}))


def part_startup(args: argparse.Namespace) -> dict:
    """Each count twice: without the case index (``preprocessing.access``; the first start-up after
    preprocessing builds it) and with it (every later start-up)."""
    env = roots_env(args.workdir, args.threads)
    pre_root = args.workdir / "roots" / "preprocessed"
    rows = []
    for i, count in enumerate(args.counts):
        t0 = time.perf_counter()
        folder = write_synthetic_dataset(pre_root, SCALING_DATASET_BASE + i, count)
        written_s = time.perf_counter() - t0
        for index in args.index:
            if index == "cold":
                (folder / "case_index.json").unlink(missing_ok=True)
            shutil.rmtree(args.workdir / "roots" / "results" / "pretrained" / f"scaling_{SCALING_DATASET_BASE + i}",
                          ignore_errors=True)
            print(f"start-up with {count} volumes, index {index} (dataset written in {written_s:.1f} s) ...",
                  end=" ", flush=True)
            row = {"volumes": count, "index": index,
                   **run_worker(["--startup-worker", "--dataset", str(SCALING_DATASET_BASE + i), "--steps",
                                 str(args.steps), "--workers", str(args.workers), "--threads", str(args.threads)],
                                env, args.max_seconds)}
            print(f"first step after {row.get('first_step_from_call_s', 'failed')} s, index {row.get('index_s')} s",
                  flush=True)
            if "error" in row:
                print(row["error"], file=sys.stderr)
            rows.append(row)
    out: dict[str, Any] = {"steps": args.steps, "workers": args.workers, "volume_shape": list(VOLUME_SHAPE),
                           "rows": rows}
    for index in args.index:
        ok = [r for r in rows if "error" not in r and r["index"] == index]
        n = [r["volumes"] for r in ok]
        out[index] = {"slope_index_s": slope(n, [r["index_s"] for r in ok]),
                      "slope_first_step_from_call_s": slope(n, [r["first_step_from_call_s"] for r in ok]),
                      "slope_pss_after_steps_gb": slope(n, [r["memory_last"]["pss_gb"] for r in ok])}
    return out


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


# ---- report --------------------------------------------------------------------------------------
def plot(report: dict, png: Path) -> None:
    """One log-log panel per part, the slope in each legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("predict", "startup", "preprocess") if p in report["parts"]]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = report["parts"][part]
        ok = [row for row in r["rows"] if "error" not in row]
        if part == "predict":
            x = [row["voxels"] / 1e6 for row in ok]
            series = [("predict s", [row["predict_s"] for row in ok], r["slope_predict_s"]),
                      ("peak PSS GB", [row["peak_pss_gb"] for row in ok], r["slope_peak_pss_gb"])]
            ax.set_xlabel("input voxels (millions)")
        elif part == "startup":
            x, series = [], []
            for index in ("cold", "warm"):
                mode = [row for row in ok if row["index"] == index]
                if not mode:
                    continue
                x = [row["volumes"] for row in mode]
                series += [(f"s to first step, index {index}", [row["first_step_from_call_s"] for row in mode],
                            r[index]["slope_first_step_from_call_s"]),
                           (f"s to index, {index}", [row["index_s"] for row in mode], r[index]["slope_index_s"])]
            last = "warm" if "warm" in r else "cold"
            series.append((f"PSS GB after steps ({last})",
                           [row["memory_last"]["pss_gb"] for row in ok if row["index"] == last],
                           r[last]["slope_pss_after_steps_gb"]))
            ax.set_xlabel("preprocessed volumes")
        else:
            x = [row["np"] for row in ok]
            series = [("cases/min", [row["cases_per_min"] for row in ok], r["slope_cases_per_min"]),
                      ("peak PSS GB", [row["peak_pss_gb"] for row in ok], r["slope_peak_pss_gb"])]
            ax.set_xlabel("-np (worker processes)")
        for label, y, k in series:
            ax.plot(x, y, "o-", label=f"{label} (slope {k:.2f})" if k is not None else label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(part)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"diffprobe scaling ({report['machine']['cpu_count']} cores, load {report['load_before']})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_tables(report: dict) -> None:
    parts = report["parts"]
    if "predict" in parts:
        r = parts["predict"]
        print("\n| volume (z×y×x) | voxels (M) | predict s | wall s | peak RSS GB | peak PSS GB | phases s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            phases = row.get("phases_s", row.get("error", ""))
            print(f"| {'×'.join(map(str, row['shape_zyx']))} | {row['voxels'] / 1e6:.2f} | "
                  f"{row.get('predict_s', '-')} | {row['wall_s']} | {row['peak_rss_gb']} | {row['peak_pss_gb']} | "
                  f"{phases} |")
        print(f"slopes: predict s {r['slope_predict_s']} (two largest {r['slope_predict_s_two_largest']}), "
              f"wall s {r['slope_wall_s']}, peak PSS {r['slope_peak_pss_gb']} (two largest "
              f"{r['slope_peak_pss_gb_two_largest']})")
    if "startup" in parts:
        r = parts["startup"]
        print("\n| volumes | case index | index s | first step s (from call) | first step s (from start) | "
              "JSON / array opens before first step | PSS GB after 1 / N steps | RSS GB after N steps |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            if "error" in row:
                print(f"| {row['volumes']} | {row['index']} | failed | | | | | |")
                continue
            o = row["opens_before_first_step"]
            print(f"| {row['volumes']} | {row['index']} | {row['index_s']} | {row['first_step_from_call_s']} | "
                  f"{row['first_step_from_start_s']} | {o['json_opens']} / {o['array_opens']} | "
                  f"{row['memory_first']['pss_gb']:.3f} / {row['memory_last']['pss_gb']:.3f} | "
                  f"{row['memory_last']['rss_gb']:.3f} |")
        for index in ("cold", "warm"):
            if index in r:
                k = r[index]
                print(f"slopes, index {index}: index {k['slope_index_s']}, first step "
                      f"{k['slope_first_step_from_call_s']}, PSS after steps {k['slope_pss_after_steps_gb']}")
    if "preprocess" in parts:
        r = parts["preprocess"]
        print("\n| -np | seconds | cases/min | peak PSS GB | peak RSS GB |")
        print("| --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            print(f"| {row['np']} | {row['seconds']} | {row['cases_per_min']:.1f} | {row['peak_pss_gb']} | "
                  f"{row['peak_rss_gb']} |")
        print(f"slopes: cases/min {r['slope_cases_per_min']}, peak PSS {r['slope_peak_pss_gb']}")


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
