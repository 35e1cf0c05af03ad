"""bench_scaling part (ii): pretraining start-up and RSS against the number of preprocessed volumes."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench_scaling_common import (
    SCALING_DATASET_BASE,
    STARTUP_PATCH,
    VOLUME_SHAPE,
    roots_env,
    run_worker,
    slope,
    tree_memory,
)


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

