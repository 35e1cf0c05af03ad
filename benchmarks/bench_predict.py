"""diffprobe predict vs nnU-Net's predictor, side by side on the same volumes: seconds per case, peak RAM.

Usage:
    python benchmarks/bench_predict.py [--volumes phantom ct512] [--threads 2] [--max-seconds 300]
        [--workdir /tmp/diffprobe_bench_predict] [--size_class tiny] [--nnunet-np 3] [--json out.json]
        [--runs diffprobe diffprobe-tta nnunet nnunet-tta]   # a subset of the four runs per volume

Volumes (one case each, written as .nii.gz, cached in the work dir):
    phantom  the test case of the benchmark's phantom dataset (default phantom size)
    ct256    256x256x128 voxels at 1.5x1.5x3 mm     (a scaled-up synthetic phantom, body in air)
    ct512    512x512x300 voxels at 0.8x0.8x1.5 mm   (CT-sized; generating it once takes ~1-2 min, ~7 GB RAM)
    ct600    512x512x600 voxels at 0.8x0.8x1.5 mm   (bench_memory.py's RAM-bound volume; ~3 min, ~13 GB to generate)

Set-up (reused when already in the work dir; delete it after changing --cases or --fov_mm): a
small labelled phantom dataset (Dataset902) in one raw root shared by both tools; diffprobe:
plan_and_preprocess with planner size class ``--size_class`` (it sets patch and network), pretrain
(a few steps: timing does not depend on quality) and a probe (fold all, a few steps); nnU-Net:
``nnUNetv2_plan_and_preprocess --no_pp`` (fingerprint + nnUNetPlans.json, no training) and a
3d_fullres network built from those plans with random weights.

Timed, per volume, each in its own subprocess (wall time including start-up, model loading,
preprocessing, prediction and writing the label map; peak RSS summed over the process tree):
    diffprobe  ``diffprobe predict -device cpu``, and with ``--tta`` (mirroring over 3 axes until issue 15;
               now the noise ensemble, 4 draws per tile: docs/probe.md, benchmarks/bench_tta.py); the
               console script's entry point (diffprobe.cli.main) called through this script, which
               only adds a progress line every 5 s
    nnU-Net    ``nnUNetPredictor`` (step 0.5, Gaussian, CPU) through ``predict_from_files`` with
               nnUNetv2_predict's default 3 preprocessing / 3 export processes (``--nnunet-np``;
               0 = ``predict_from_files_sequential``), with mirroring over (0, 1, 2) (nnU-Net's
               default) and without (``--disable_tta``)
Both use ``--threads`` torch threads (diffprobe through OMP_NUM_THREADS, nnU-Net through
torch.set_num_threads). A run longer than ``--max-seconds`` is killed and reported as ">N s",
with an estimate extrapolated from the sliding-window tiles it had done ("~M est.": time to
the window + window time x total / done tiles; the resampling and writing after it are left
out). When a run without TTA was killed, the same tool's TTA run is not started: ">N s", with
the estimate time to the window + 8x the window (mirroring = 8 forwards per tile). Ratios are
diffprobe / nnU-Net with mirroring (its default): below 1 means faster or less RAM; "~" marks
ratios of estimates, "<"/">" ratios against a bound. Each tool predicts with its own patch
size (diffprobe: its plans' for the size class; nnU-Net: its plans'), printed above the table.
"""

from __future__ import annotations

# Top-level imports stay minimal: nnU-Net's "spawn" worker processes re-import this file.
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()  # a worker's start (this file is the first thing a worker imports)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict_support import (  # noqa: E402  (re-exported: bench_fair_predict, bench_memory, bench_predict_phases)
    CT_VOLUMES,
    DATASET_ID,
    DATASET_NAME,
    TIMEOUT_CODES,
    ensure_volume,
    estimate_seconds,
    fmt_ram,
    fmt_ratio,
    fmt_seconds,
)

PRETRAINED = "bench_predict"
FOLD = "all"
VOLUME_CHOICES = ["phantom", *CT_VOLUMES]
# (tool, setting, tta) in run order; the TTA run of a tool follows its run without TTA.
RUNS = [("diffprobe", "default (no TTA)", False), ("nnU-Net", "--disable_tta", False),
        ("diffprobe", "--tta", True), ("nnU-Net", "default (mirroring TTA)", True)]
BASELINE = ("nnU-Net", True)


# ---- workers (run as subprocesses of the benchmark) --------------------------------------------
class TileProgress:
    """Prints sliding-window progress lines (seconds since the worker started), at most every 5 s,
    so that the benchmark can extrapolate a run it had to kill. Every line carries the time the
    window started: only the tail of a killed run's output is kept."""

    def __init__(self) -> None:
        self.last = -1e9
        self.started = 0.0

    def start(self) -> None:
        self.started = time.perf_counter() - _T0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter() - _T0
        if done >= total or now - self.last >= 5:
            self.last = now
            print(f"[bench] tiles {done}/{total} at {now:.2f} s, window from {self.started:.2f} s", flush=True)


def diffprobe_cli(argv: list[str]) -> None:
    """``diffprobe <argv>`` (the console script's entry point), reporting sliding-window progress."""
    from diffprobe.predict import predictor as dp_predictor

    original = getattr(dp_predictor, "sliding_window_logits", None)
    if original is not None:  # no estimates for killed runs if diffprobe renames it; timing is unaffected
        report = TileProgress()

        def with_progress(*a, **k):
            inner = k.get("progress")

            def both(done: int, total: int) -> None:
                if inner is not None:
                    inner(done, total)
                report(done, total)

            report.start()
            return original(*a, **{**k, "progress": both})

        dp_predictor.sliding_window_logits = with_progress
    from diffprobe.cli import main

    sys.exit(main(argv))


def nnunet_random_network(dataset_name: str):
    """nnU-Net's 3d_fullres network from its own plans of ``dataset_name``, random weights (seed 0);
    returns (network in eval mode, plans manager, configuration, dataset.json)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name  # noqa: SIM112 (nnU-Net's name)
    plans = PlansManager(str(pre / "nnUNetPlans.json"))
    dataset_json = json.loads((pre / "dataset.json").read_text())
    config = plans.get_configuration("3d_fullres")
    torch.manual_seed(0)
    network = get_network_from_plans(
        config.network_arch_class_name, config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import, determine_num_input_channels(plans, config, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads, allow_init=True, deep_supervision=False)
    return network.eval(), plans, config, dataset_json


def nnunet_predictor_with_progress(dataset_name: str, mirroring: bool):
    """nnU-Net's own predictor around :func:`nnunet_random_network`, reporting tiles as it goes
    (tiles from the slicer list, one tile = 1 forward, 8 with mirroring over 3 axes)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    network, plans, config, dataset_json = nnunet_random_network(dataset_name)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans, config, [network.state_dict()], dataset_json,
                                    "nnUNetTrainer", inference_allowed_mirroring_axes=(0, 1, 2))
    report, state = TileProgress(), {"forwards": 0, "tiles": 0}
    forwards_per_tile = 8 if mirroring else 1
    get_slicers = predictor._internal_get_sliding_window_slicers

    def slicers_with_progress(image_size):
        slicers = get_slicers(image_size)
        state.update(forwards=0, tiles=len(slicers))
        report.start()
        return slicers

    def count_forward(_module, _inputs, _output) -> None:
        state["forwards"] += 1
        if state["forwards"] % forwards_per_tile == 0:
            report(state["forwards"] // forwards_per_tile, state["tiles"])

    predictor._internal_get_sliding_window_slicers = slicers_with_progress
    network.register_forward_hook(count_forward)
    return predictor


def nnunet_worker(args: argparse.Namespace) -> None:
    """Predict every image of --input into --output with a randomly initialised 3d_fullres nnU-Net."""
    import torch

    torch.set_num_threads(args.threads)
    predictor = nnunet_predictor_with_progress(DATASET_NAME, args.tta)
    args.output.mkdir(parents=True, exist_ok=True)
    # Explicit file lists: given a folder, nnU-Net forks a 12-process pool just to list it, and summing
    # the RSS of those short-lived copy-on-write forks would count the parent's memory 12 more times.
    images = [[str(f)] for f in sorted(args.input.glob("*_0000.nii.gz"))]
    if args.nnunet_np == 0:
        predictor.predict_from_files_sequential(images, str(args.output), save_probabilities=False, overwrite=True)
    else:
        predictor.predict_from_files(images, str(args.output), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=args.nnunet_np,
                                     num_processes_segmentation_export=args.nnunet_np)


# ---- set-up ------------------------------------------------------------------------------------
def roots_env(work: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DIFFPROBE_RAW": str(work / "raw"), "nnUNet_raw": str(work / "raw"),
                "DIFFPROBE_PREPROCESSED": str(work / "dp_pre"), "nnUNet_preprocessed": str(work / "nnunet_pre"),
                "DIFFPROBE_RESULTS": str(work / "dp_results"), "nnUNet_results": str(work / "nnunet_results"),
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def add_setup_arguments(ap: argparse.ArgumentParser, cases_flag: str = "--cases") -> None:
    """The set-up options ``ensure_models`` reads, shared by every benchmark on Dataset902.

    ``cases_flag`` renames the number of set-up phantoms where a script uses ``--cases`` for its inputs.
    """
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_bench_predict"))
    ap.add_argument("--size_class", "--size-class", "--preset", dest="size_class", default="tiny",
                    help="diffprobe planner size class of the set-up (sets patch and network; default tiny)")
    ap.add_argument(cases_flag, dest="cases", type=int, default=4, help="labelled phantoms for the set-up dataset")
    ap.add_argument("--fov_mm", type=float, default=110.0, help="phantom field of view (sets both tools' plans)")
    ap.add_argument("--pretrain-steps", type=int, default=5, help="BPR and diffusion steps of the set-up")
    ap.add_argument("--probe-steps", type=int, default=5)


def ensure_models(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Phantom dataset, trained diffprobe probe and nnU-Net plans (each reused when present)."""
    os.environ.update({k: v for k, v in env.items() if k.startswith(("DIFFPROBE_", "nnUNet_"))})
    import torch

    torch.set_num_threads(args.threads)
    from diffprobe.phantoms import PhantomConfig, make_phantom_dataset
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.model import configuration_name, probe_dir
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
    from diffprobe.workflows.train_probe import train_probe

    raw = args.workdir / "raw" / DATASET_NAME
    if not (raw / "dataset.json").is_file():
        print(f"making phantoms in {raw}", flush=True)
        make_phantom_dataset(raw, PhantomConfig(num_train_labelled=args.cases, num_train_unlabelled=0, num_test=1,
                                                fov_mm=args.fov_mm))
    plan_and_preprocess(DATASET_ID, num_processes=2, show_progress=False, plan_kwargs={"size_class": args.size_class})
    name = f"{PRETRAINED}_{args.size_class}"
    model = PretrainedModel(name)
    if not model.finished:
        print(f"pretraining '{name}' ({args.size_class}, {args.pretrain_steps} steps per stage)", flush=True)
        pretrain([str(DATASET_ID)], name=name, device="cpu", resume=model.exists, show_progress=False,
                 overrides={"bpr_steps": args.pretrain_steps, "diffusion_steps": args.pretrain_steps,
                            "num_workers": 0})
    config = configuration_name(name, "fpn", False)
    folder = probe_dir(DATASET_ID, config, FOLD)
    if not (folder / "checkpoint_final.pt").is_file():
        print(f"training probe {config} ({args.probe_steps} steps)", flush=True)
        train_probe(DATASET_ID, FOLD, name, device="cpu", resume=(folder / "probe.json").is_file(),
                    overrides={"steps": args.probe_steps}, show_progress=False, final_validation=False)
    nn_plans = args.workdir / "nnunet_pre" / DATASET_NAME / "nnUNetPlans.json"
    if not nn_plans.is_file():
        print("nnU-Net fingerprint + planning (no preprocessing)", flush=True)
        done = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres",
                               "-npfp", "2", "--no_pp"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"nnUNetv2_plan_and_preprocess failed:\n{(done.stdout + done.stderr)[-3000:]}")
    probe_meta = json.loads((folder / "probe.json").read_text())
    nn_cfg = json.loads(nn_plans.read_text())["configurations"]["3d_fullres"]
    arch = nn_cfg["architecture"]["arch_kwargs"]
    return {
        "diffprobe": {"configuration": config, "size_class": args.size_class, "patch_size": probe_meta["patch_size"],
                      "timesteps": probe_meta["timesteps"], "guidance": probe_meta["guidance"],
                      "target_spacing": probe_meta["plans"]["preprocessing"]["target_spacing"]},
        "nnU-Net": {"configuration": "3d_fullres", "patch_size": nn_cfg["patch_size"],
                    "target_spacing": nn_cfg["spacing"], "features_per_stage": arch.get("features_per_stage"),
                    "weights": "random (untrained)"},
    }


# ---- timing ------------------------------------------------------------------------------------
def command(tool: str, tta: bool, inputs: Path, output: Path, args: argparse.Namespace, dp_config: str) -> list[str]:
    this = str(Path(__file__).resolve())
    if tool == "diffprobe":
        return [sys.executable, this, "--diffprobe-cli", "predict", "-i", str(inputs), "-o", str(output),
                "-d", str(DATASET_ID), "-c", dp_config, "-device", "cpu", *(["--tta"] if tta else [])]
    return [sys.executable, this, "--nnunet-worker", "--input", str(inputs),
            "--output", str(output), "--threads", str(args.threads), "--nnunet-np", str(args.nnunet_np),
            *(["--tta"] if tta else [])]


def timed_run(cmd: list[str], env: dict[str, str], max_seconds: float) -> dict:
    from _measure import run_measured

    m = run_measured(["timeout", "--kill-after=10", str(max_seconds), *cmd], env)
    timed_out = m.returncode in TIMEOUT_CODES
    return {"seconds": max_seconds if timed_out else round(m.seconds, 2), "wall_seconds": round(m.seconds, 2),
            **(estimate_seconds(m.output_tail) if timed_out else {}),
            "peak_rss_gb": round(m.peak_rss_gb, 3), "returncode": m.returncode, "timed_out": timed_out,
            "failed": m.returncode != 0 and not timed_out, "output_tail": m.output_tail if m.returncode != 0 else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", nargs="+", choices=VOLUME_CHOICES, default=["phantom", "ct512"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each tool (default 2)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="kill a run after this long (default 300)")
    ap.add_argument("--json", type=Path, default=None, help="raw numbers (default: WORKDIR/bench_predict.json)")
    add_setup_arguments(ap)
    ap.add_argument("--nnunet-np", type=int, default=3,
                    help="nnU-Net preprocessing and export processes (nnUNetv2_predict default 3; 0: sequential)")
    ap.add_argument("--runs", nargs="+", choices=["diffprobe", "diffprobe-tta", "nnunet", "nnunet-tta"],
                    default=None, help="only these runs (default: all four per volume)")
    ap.add_argument("--nnunet-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--diffprobe-cli"]:
        diffprobe_cli(sys.argv[2:])
        return
    args = ap.parse_args()
    if args.nnunet_worker:
        nnunet_worker(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    args.workdir = args.workdir.resolve()
    env = roots_env(args.workdir, args.threads)
    models = ensure_models(args, env)
    volumes = {v: ensure_volume(v, args.workdir) for v in dict.fromkeys(args.volumes)}

    results: list[dict] = []
    for vol, (inputs, _) in volumes.items():
        done: dict[tuple[str, bool], dict] = {}
        for tool, setting, tta in RUNS:
            if args.runs and f"{tool.lower().replace('-', '')}{'-tta' if tta else ''}" not in args.runs:
                continue
            row = {"volume": vol, "tool": tool, "setting": setting, "tta": tta}
            before = done.get((tool, False))
            if tta and before is not None and (before["timed_out"] or before["failed"]):
                # mirroring runs 8 forwards per tile: it cannot be faster than the killed run without it;
                # estimate: the same time to the sliding window, then 8x that run's estimated window time
                est = before.get("estimated_seconds")
                row.update({"skipped": True, "timed_out": before["timed_out"], "failed": False,
                            "seconds": args.max_seconds if before["timed_out"] else None, "peak_rss_gb": None,
                            "estimated_seconds": round(before["window_start_s"] + 8 * (
                                est - before["window_start_s"]), 1) if est else None,
                            "note": "not run: the run without TTA was already killed or failed; estimate = "
                                    "its time to the sliding window + 8x its estimated window time"})
            else:
                out = args.workdir / "outputs" / vol / f"{tool}_{'tta' if tta else 'notta'}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"{vol}: {tool} {setting} ...", end=" ", flush=True)
                row.update(timed_run(command(tool, tta, inputs, out, args, models["diffprobe"]["configuration"]),
                                     env, args.max_seconds))
                print("failed" if row["failed"] else f"{fmt_seconds(row)} s, "
                      f"{fmt_ram(row)} GB", flush=True)
                if row["failed"]:
                    print(row["output_tail"], file=sys.stderr)
            done[(tool, tta)] = row
            results.append(row)

    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "threads": args.threads, "max_seconds": args.max_seconds, "nnunet_np": args.nnunet_np,
              "models": models, "volumes": {v: info for v, (_, info) in volumes.items()}, "runs": results}
    try:
        import nnunetv2
        import torch

        from diffprobe import __version__
        report["versions"] = {"torch": torch.__version__, "nnunetv2": getattr(nnunetv2, "__version__", None),
                              "diffprobe": __version__}
    except ImportError:
        pass
    json_path = args.json or args.workdir / "bench_predict.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))

    dp, nn = models["diffprobe"], models["nnU-Net"]
    print(f"\n{os.cpu_count()} CPU cores, {args.threads} torch threads per tool, runs killed after "
          f"{args.max_seconds:.0f} s; nnU-Net with {args.nnunet_np} preprocessing/export processes")
    print(f"diffprobe: size class {dp['size_class']}, patch {dp['patch_size']}, timesteps {dp['timesteps']}, guidance "
          f"{dp['guidance']}, target spacing {[round(v, 3) for v in dp['target_spacing']]}")
    print(f"nnU-Net:   3d_fullres, patch {nn['patch_size']}, features {nn['features_per_stage']}, "
          f"target spacing {[round(v, 3) for v in nn['target_spacing']]}, random weights")
    for v, (_, info) in volumes.items():
        print(f"{v}: {'x'.join(map(str, info['shape_zyx']))} voxels (z, y, x) at "
              f"{'x'.join(map(str, info['spacing_zyx_mm']))} mm")
    print(f"raw numbers: {json_path}\n")
    print("| volume | tool | setting | s/case | peak RAM (GB) | time ÷ nnU-Net TTA | RAM ÷ nnU-Net TTA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in results:
        base = next((r for r in results if r["volume"] == row["volume"] and (r["tool"], r["tta"]) == BASELINE),
                    None)
        print(f"| {row['volume']} | {row['tool']} | {row['setting']} | {fmt_seconds(row)} | "
              f"{fmt_ram(row)} | {fmt_ratio(row, base, 'seconds')} | {fmt_ratio(row, base, 'peak_rss_gb')} |")


if __name__ == "__main__":
    main()
