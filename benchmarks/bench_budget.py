"""Compute-budget planning: how close pretrain + probe wall time comes to ``--budget_minutes``.

Usage:
    python benchmarks/bench_budget.py --budget_minutes 10 [30 60] [--device cpu]
        [--workdir DIR] [--plan_only] [--json results.json] [--wait_idle 1] [--threads 1]

For each budget, from scratch in its own roots: make_phantoms (8 labelled + 4 unlabelled, the
``make_phantoms`` defaults) -> ``plan_and_preprocess(budget_minutes=B)`` (times the candidates
on this device and plans network and steps; not part of the budget) -> ``pretrain`` (BPR,
BPR maps, diffusion) -> ``train_probe`` fold 0 (pool, patch validation, final sliding-window
validation). Reports the ratio (pretrain + probe wall seconds) / (B x 60) (goal 0.8-1.05) and,
per stage, the planned seconds against the stage's own training-loop seconds (from the trainer
logs), so a miss can be traced to a step-time estimate or to the work outside the loops.
``--plan_only`` stops after planning (shows what each budget plans, with real timing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path


class LoadSampler:
    """The 1-minute load average every few seconds while a block runs (other jobs skew a shared machine)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2)}


def running_tasks(seconds: float = 20.0) -> float:
    """Mean number of runnable tasks over ``seconds`` (Linux /proc/stat ``procs_running``, this process
    included), a current figure where the load average lags a minute behind; the load average elsewhere."""
    try:
        samples = []
        for _ in range(int(seconds)):
            with open("/proc/stat") as f:
                samples.append(next(int(line.split()[1]) for line in f if line.startswith("procs_running")))
            time.sleep(1)
        return sum(samples) / len(samples)
    except (OSError, StopIteration):
        return os.getloadavg()[0]


def wait_for_idle(max_load: float, timeout_s: float) -> float:
    """Wait until fewer than ``max_load`` tasks (besides this one) are runnable on average over 20 s, twice in
    a row (at most ``timeout_s``); returns the seconds waited."""
    t0 = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - t0 < timeout_s:
        quiet = quiet + 1 if running_tasks() - 1 < max_load else 0
    return round(time.perf_counter() - t0, 1)


def loop_seconds(history: list[dict], samples_per_step: int) -> float:
    """Seconds a trainer's loop ran, from its last log record (cumulative samples/s)."""
    last = history[-1]
    return last["step"] * samples_per_step / max(last["samples_per_s"], 1e-9)


def run_budget(minutes: float, base: Path, device: str, plan_only: bool, phantoms: dict,
               idle_load: float | None = None, max_wait_s: float = 3600.0) -> dict:
    from diffprobe.paths import roots_at
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    make_phantom_dataset(base / "raw" / "Dataset001_Phantoms", PhantomConfig(**phantoms))
    out: dict = {"budget_minutes": minutes, "device": device}
    if idle_load is not None:
        out["waited_for_idle_s"] = wait_for_idle(idle_load, max_wait_s)
    out["load_before"] = [round(v, 2) for v in os.getloadavg()]
    import torch

    out["torch_threads"] = torch.get_num_threads()
    with roots_at(base):
        from diffprobe.planning.plans import load_plans
        from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

        t0 = time.perf_counter()
        report = plan_and_preprocess(1, num_processes=2, show_progress=False, budget_minutes=minutes, device=device)
        out["plan_and_preprocess_s"] = round(time.perf_counter() - t0, 1)
        plans = load_plans(report.plans_path)
        rec = plans["training"]["budget"]
        out.update({"chosen": rec["chosen"], "steps": rec["steps"], "planned_s": rec["planned_seconds"],
                    "timing_s": rec["timing_seconds"],
                    "candidates": [{k: c.get(k) for k in ("size_class", "timed", "seconds_per_step", "fits")}
                                   for c in rec["candidates"]]})
        print(json.dumps(out), flush=True)
        if plan_only:
            return out
        from diffprobe.pretraining.pretrain import pretrain
        from diffprobe.workflows.train_probe import train_probe

        with LoadSampler() as load:
            t0 = time.perf_counter()
            result = pretrain(["1"], name="budget", device=device, show_progress=False)
            out["pretrain_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            probe = train_probe(1, "0", "budget", device=device, show_progress=False)
            out["probe_s"] = round(time.perf_counter() - t0, 1)
        out["load_during"] = load.summary()
        batch = int(plans["batch_size"])
        probe_batch = int(plans["training"]["probe"]["batch_size"])
        out["loop_s"] = {"bpr": round(loop_seconds(result.histories["bpr"], 2 * max(2, batch)), 1),
                         "diffusion": round(loop_seconds(result.histories["diffusion"], batch), 1),
                         "probe": round(loop_seconds(probe.history, probe_batch), 1)}
        out["actual_s_per_step"] = {s: round(out["loop_s"][s] / rec["steps"][s], 4) for s in out["loop_s"]}
        out["outside_loops_s"] = round(out["pretrain_s"] + out["probe_s"] - sum(out["loop_s"].values()), 1)
        if probe.validation:
            out["val_dice_mean"] = round(float(probe.validation["foreground_mean_dice"]), 3)
    out["actual_s"] = round(out["pretrain_s"] + out["probe_s"], 1)
    out["ratio"] = round(out["actual_s"] / (minutes * 60), 3)
    out["load_after"] = [round(v, 2) for v in os.getloadavg()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget_minutes", type=float, nargs="+", default=[10.0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--plan_only", action="store_true", help="plan each budget (real timing) and stop")
    ap.add_argument("--num_labelled", type=int, default=8)
    ap.add_argument("--num_unlabelled", type=int, default=4)
    ap.add_argument("--fov_mm", type=float, default=110.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--wait_idle", type=float, default=None, metavar="TASKS",
                    help="on a shared machine: before each budget, wait (up to --max_wait_s) until fewer than TASKS "
                         "other tasks are runnable (mean over 20 s, twice in a row)")
    ap.add_argument("--max_wait_s", type=float, default=3600.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for planning and training alike (default: torch's; 1 is steadier on a "
                         "shared machine: one other busy core then does not stall every parallel op)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    phantoms = {"num_train_labelled": args.num_labelled, "num_train_unlabelled": args.num_unlabelled,
                "num_test": 1, "fov_mm": args.fov_mm}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_budget_"))
    rows = []
    try:
        for minutes in args.budget_minutes:
            row = run_budget(minutes, work / f"budget_{minutes:g}", args.device, args.plan_only, phantoms,
                             args.wait_idle, args.max_wait_s)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n| budget (min) | chosen | steps bpr/diff/probe | planned s | actual s | ratio | loop s bpr/diff/probe "
          "(planned) | outside loops s | load during (mean/max) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        st, pl = r["steps"], r["planned_s"]
        loops = " / ".join(f"{r['loop_s'][s]:.0f} ({pl[s]:.0f})" for s in ("bpr", "diffusion", "probe")) \
            if "loop_s" in r else "—"
        print(f"| {r['budget_minutes']:g} | {r['chosen']} | {st['bpr']}/{st['diffusion']}/{st['probe']} | "
              f"{pl['total']:.0f} | {r.get('actual_s', '—')} | {r.get('ratio', '—')} | {loops} | "
              f"{r.get('outside_loops_s', '—')} | "
              + (f"{r['load_during']['mean']}/{r['load_during']['max']} |" if "load_during" in r else "— |"))


if __name__ == "__main__":
    main()
