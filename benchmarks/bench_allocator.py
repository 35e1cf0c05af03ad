"""The host allocator settings (``diffprobe.host_allocator``) on and off, side by side in one run.

Usage:
    python benchmarks/bench_allocator.py --work /tmp/realct6 --name realct__fpn \
        [--scans crlm1004 pancreas001] [--precisions fp32] [--rounds 1] [--no_steps] [--threads 2]

``--work``: a ``benchmarks/real_ct.py`` folder (its trained probe and plans). mallopt settings are
process-wide, so every measurement runs in its own Python process with ``DIFFPROBE_MALLOC_TUNING``
set to 0 (glibc's defaults) or 1 (diffprobe's settings, the default), the settings alternating
first/second from round to round. Per process: wall seconds, user and system CPU seconds, minor page
faults and peak RSS (``getrusage``).

* predict: ``diffprobe.predict.predict`` of one whole real CT (``../shared/data/real-ct-unlabelled``)
  with the probe, phases from its ``timings``; the label maps of both settings are compared voxel by
  voxel (the arithmetic is the same, so they must be equal).
* steps (unless ``--no_steps``): seconds per BPR, diffusion and probe training step as the
  compute-budget planner times them (``step_timing.measure_step_seconds`` on the run's plans.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, use_work_roots  # noqa: E402
from real_ct_whole_scans import scan_inputs  # noqa: E402

SETTINGS = {"glibc defaults": "0", "diffprobe": "1"}


def _usage() -> dict:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": round(u.ru_utime, 1), "sys_s": round(u.ru_stime, 1), "minor_faults": u.ru_minflt,
            "peak_rss_gb": round(u.ru_maxrss / 1e6, 2)}


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process (the allocator settings come from the environment)."""
    import torch

    torch.set_num_threads(args.threads)
    use_work_roots(args.work)
    from diffprobe.devices import resolve_device
    from diffprobe.host_allocator import tune_host_allocator

    resolve_device("cpu")
    out: dict = {"tuned": tune_host_allocator()}
    started = time.perf_counter()
    if args.worker == "steps":
        from diffprobe.workflows.step_timing import measure_step_seconds

        plans = json.loads((args.work / "preprocessed" / DATASET / "diffprobe" / "plans.json").read_text())
        timed = measure_step_seconds(plans, "cpu")
        out["seconds_per_step"] = {k: round(float(v), 3) for k, v in timed.items() if isinstance(v, (int, float))}
    else:
        from diffprobe.predict.acceleration import InferenceSettings
        from diffprobe.predict.predictor import predict

        timings: list[dict] = []
        predict(args.input, args.output, DATASET, args.name, ["all"], "cpu", show_progress=False,
                settings=InferenceSettings(precision=args.precision), timings=timings)
        out["phases_s"] = {k: round(v, 1) for k, v in timings[0].items() if k.endswith("_s")}
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({**out, **_usage()}), flush=True)


def _run(args: argparse.Namespace, setting: str, extra: list[str]) -> dict:
    env = {**os.environ, "DIFFPROBE_MALLOC_TUNING": SETTINGS[setting]}
    cmd = [sys.executable, __file__, "--work", str(args.work), "--name", args.name,
           "--threads", str(args.threads), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--name", default="realct__fpn", help="trained probe configuration")
    ap.add_argument("--scans", nargs="*", default=["crlm1004", "pancreas001"])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_steps", action="store_true", help="skip the training-step timing")
    ap.add_argument("--worker", choices=["predict", "steps"], help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work.resolve()
    if args.worker:
        return worker(args)
    import numpy as np
    import SimpleITK as sitk

    use_work_roots(args.work)
    _, inputs = scan_inputs(args.work, "allocator", args.scans)
    bench = args.work / "allocator"
    rows = []
    for r in range(args.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
        for scan in args.scans:
            for precision in args.precisions:
                single = bench / "one" / scan
                shutil.rmtree(single, ignore_errors=True)
                single.mkdir(parents=True)
                os.symlink(inputs / f"{scan}_0000.nii.gz", single / f"{scan}_0000.nii.gz")
                segs = {}
                for setting in order:
                    out = bench / f"{setting.replace(' ', '_')}_{precision}"
                    res = _run(args, setting, ["--worker", "predict", "--input", str(single), "--output", str(out),
                                               "--precision", precision])
                    segs[setting] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{scan}.nii.gz")))
                    row = {"what": f"predict {scan} {precision}", "setting": setting, "round": r, **res,
                           "load_average": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                same = float(np.mean(segs["glibc defaults"] == segs["diffprobe"]))
                rows.append({"what": f"predict {scan} {precision}", "setting": "labels equal", "round": r,
                             "voxels_same": same})
                print(f"{scan} {precision}: voxels with the same label {same:.6f}", flush=True)
        if not args.no_steps:
            for setting in order:
                res = _run(args, setting, ["--worker", "steps"])
                rows.append({"what": "training steps", "setting": setting, "round": r, **res})
                print(json.dumps(rows[-1]), flush=True)
    with open(bench / "bench_allocator.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    head = f"{'what':30s} {'setting':15s} {'wall s':>7s} {'user':>6s} {'sys':>6s} {'faults M':>9s} {'RSS GB':>7s}"
    print(f"\n{head}  detail")
    for row in rows:
        if "wall_s" not in row:
            continue
        detail = row.get("phases_s") or row.get("seconds_per_step")
        print(f"{row['what']:30s} {row['setting']:15s} {row['wall_s']:7.1f} {row['user_s']:6.1f} {row['sys_s']:6.1f} "
              f"{row['minor_faults'] / 1e6:9.2f} {row['peak_rss_gb']:7.2f}  {detail}")


if __name__ == "__main__":
    main()
