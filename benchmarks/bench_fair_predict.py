"""Fair predict comparison: each tool at its *own planned* configuration for the same data (issue 16).

The older headline (predict 0.30x nnU-Net's time on ct256) compared diffprobe's *tiny* demo network
with nnU-Net's full planned 3d_fullres network. Here both tools plan the same raw dataset and predict
with what their planners chose:

* diffprobe: ``plan_and_preprocess`` of the real-CT dataset (built as ``benchmarks/real_ct.py`` builds
  it from ``../shared/data/real-ct`` + ``real-ct-unlabelled``) at the CPU size class (``cpu``: what a
  60-minute CPU budget picks on 2 cores) and at the GPU size class (``paper``), each in its own data
  roots; a probe on a 1-step pretrained denoiser (random-init weights in effect: timing does not depend
  on them), ``diffprobe predict -device cpu -precision fp32`` (``--dp-precision``), no TTA.
* nnU-Net: its own fingerprint + planner (``nnUNetv2_plan_and_preprocess --no_pp -c 3d_fullres``) on the
  same four images (the unlabelled three get empty label maps: nnU-Net needs a label per training case;
  spacing and shape statistics come from the images), the 3d_fullres network built from those plans with
  random weights (``get_network_from_plans``), ``nnUNetPredictor.manual_initialization`` and
  ``predict_from_files`` with ``use_mirroring=False`` (no TTA), step 0.5, Gaussian, fp32 on the CPU.

Volumes: ``realct`` = pancreas001 (512x512x134 at 1.07x1.07x3 mm: a whole abdominal CT at 3 mm slices),
``ct512`` = a CT-like 512x512x300 volume at 0.8x0.8x1.5 mm (``gpu_suite.ct_like_volume``). Each run is its
own subprocess: seconds per case (start-up, loading, preprocessing, window, export), peak PSS summed over
the process tree (``_measure.run_measured(pss=True)``); a run longer than ``--max-seconds`` is killed and
extrapolated from its sliding-window progress (``bench_predict.estimate_seconds``). FLOPs per output voxel:
``torch.utils.flop_counter.FlopCounterMode`` on one tile's forward (diffprobe: the probe model, all feature
timesteps, head included; nnU-Net: the network) x the number of tiles the window visits / the voxels of the
raw input (the output label map). BPR guidance and nnU-Net's resampling are not in the FLOPs.

    python benchmarks/bench_fair_predict.py --workdir /tmp/fairpred --volumes realct ct512 --max-seconds 240
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DP_ID, NN_ID = 10, 11
DP_DATASET, NN_DATASET = "Dataset010_RealCT", "Dataset011_RealCTnnunet"
PRETRAINED = "fair"
VOLUMES = {"realct": None, "ct512": ((300, 512, 512), (1.5, 0.8, 0.8))}
REALCT_CASE = "pancreas001_0000.nii.gz"
NNUNET_TUNED = "nnU-Net malloc-tuned"  # nnU-Net's predictor under diffprobe's glibc allocator settings
NNUNET_TOOLS = ("nnU-Net", NNUNET_TUNED)


# ---- workers ---------------------------------------------------------------------------------
def nnunet_worker(args: argparse.Namespace) -> None:
    """Predict every image of --input with a randomly initialised 3d_fullres nnU-Net from its own plans.

    ``--malloc-tuning``: first apply diffprobe's glibc settings (``diffprobe.host_allocator``) to this
    process, the one that runs nnU-Net's sliding window, so that the allocator is not what separates the tools.
    """
    import bench_predict
    import torch

    if args.malloc_tuning:
        from diffprobe.host_allocator import tune_host_allocator

        if not tune_host_allocator():
            sys.exit("the glibc allocator settings could not be applied in this process")

    torch.set_num_threads(args.threads)
    predictor = bench_predict.nnunet_predictor_with_progress(NN_DATASET, mirroring=False)
    args.output.mkdir(parents=True, exist_ok=True)
    images = [[str(f)] for f in sorted(args.input.glob("*_0000.nii*"))]
    predictor.predict_from_files(images, str(args.output), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=args.nnunet_np,
                                 num_processes_segmentation_export=args.nnunet_np)


def nnunet_network():
    """nnU-Net's 3d_fullres network from its plans of the real-CT dataset, random weights (seed 0)."""
    import bench_predict

    return bench_predict.nnunet_random_network(NN_DATASET)


def flops_worker(args: argparse.Namespace) -> None:
    """FLOPs of one tile's forward (FlopCounterMode) and the number of tiles per volume, both tools, as JSON."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    out: dict = {}
    shapes = {}
    for vol in args.volumes:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(volume_file(args.workdir, vol)))
        reader.ReadImageInformation()
        shapes[vol] = (list(reader.GetSize())[::-1], list(reader.GetSpacing())[::-1])
    # nnU-Net: tiles on its resampled grid (CT: crop to nonzero keeps everything), one forward per tile
    os.environ.update(roots_env(args.workdir, "cpu", args.threads))
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    network, _plans, config, _ = nnunet_network()
    patch = list(config.patch_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        network(torch.zeros(1, 1, *patch))
    nn_flops = fc.get_total_flops()
    out["nnU-Net"] = {"patch_size": patch, "spacing": list(config.spacing), "tile_flops": nn_flops,
                      "features_per_stage": config.network_arch_init_kwargs.get("features_per_stage"),
                      "volumes": {}}
    for vol, (shape, spacing) in shapes.items():
        grid = [max(int(round(n * s / t)), p) for n, s, t, p in zip(shape, spacing, config.spacing, patch)]
        tiles = int(np.prod([len(s) for s in compute_steps_for_sliding_window(grid, patch, 0.5)]))
        out["nnU-Net"]["volumes"][vol] = {"grid": grid, "tiles": tiles,
                                          "flops_per_voxel": nn_flops * tiles / float(np.prod(shape))}
    del network
    # diffprobe: the probe model's forward on one tile (every feature timestep and the head)
    from diffprobe.models.tiling import window_starts
    from diffprobe.probe.model import load_trained_probe

    for cls in args.size_classes:
        os.environ.update(roots_env(args.workdir, cls, args.threads))
        probe = load_trained_probe(probe_folder(args.workdir, cls), "cpu")
        patch = list(probe.patch_size)
        g = probe.meta["plans"]["network"]["guidance_channels"] if probe.meta["guidance"] != "none" else 0
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            probe.model(torch.zeros(1, 1, *patch), torch.zeros(1, g, *patch) if g else None, [0])
        flops = fc.get_total_flops()
        spacing_t = probe.meta["plans"]["preprocessing"]["target_spacing"]
        row = {"patch_size": patch, "spacing": spacing_t, "tile_flops": flops, "timesteps": probe.meta["timesteps"],
               "volumes": {}}
        for vol, (shape, spacing) in shapes.items():
            # upper bound of the grid: diffprobe crops the body first, so the real window visits fewer tiles
            grid = [max(int(round(n * s / t)), p) for n, s, t, p in zip(shape, spacing, spacing_t, patch)]
            tiles = int(np.prod([len(window_starts(n, p, p * 0.5)) for n, p in zip(grid, patch)]))  # step in voxels
            row["volumes"][vol] = {"grid_uncropped": grid, "tiles_uncropped": tiles, "tile_flops": flops}
        out[f"diffprobe {cls}"] = row
    print("FLOPS_JSON " + json.dumps(out), flush=True)


# ---- set-up ----------------------------------------------------------------------------------
def roots_env(work: Path, size_class: str, threads: int) -> dict[str, str]:
    return {"DIFFPROBE_RAW": str(work / "raw"), "DIFFPROBE_PREPROCESSED": str(work / f"dp_{size_class}" / "pre"),
            "DIFFPROBE_RESULTS": str(work / f"dp_{size_class}" / "results"), "nnUNet_raw": str(work / "raw"),
            "nnUNet_preprocessed": str(work / "nn_pre"), "nnUNet_results": str(work / "nn_results"),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def probe_folder(work: Path, size_class: str) -> Path:
    return work / f"dp_{size_class}" / "results" / DP_DATASET / "diffprobe" / f"{PRETRAINED}__fpn" / "fold_all"


def volume_file(work: Path, vol: str) -> Path:
    return work / "inputs" / vol / (REALCT_CASE if vol == "realct" else f"{vol}_0000.nii")


def setup_worker(args: argparse.Namespace) -> None:
    """diffprobe plans + a 1-step probe for one size class (own data roots), in this process."""
    cls = args.size_classes[0]
    os.environ.update(roots_env(args.workdir, cls, args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
    from diffprobe.workflows.train_probe import train_probe

    t0 = time.perf_counter()
    plan_and_preprocess(DP_ID, num_processes=1, show_progress=False, plan_kwargs={"size_class": cls})
    t1 = time.perf_counter()
    if not PretrainedModel(PRETRAINED).finished:
        pretrain([str(DP_ID)], name=PRETRAINED, device="cpu", show_progress=False,
                 overrides={"bpr_steps": 1, "diffusion_steps": 1, "num_workers": 0})
    t2 = time.perf_counter()
    folder = probe_folder(args.workdir, cls)
    if not (folder / "checkpoint_final.pt").is_file():  # an interrupted set-up is continued, as --c would
        train_probe(DP_ID, "all", PRETRAINED, device="cpu", show_progress=False, final_validation=False,
                    overrides={"steps": 1, "validate_every": 0, "lr": 1e-3, "warmup_steps": 0}, seed=9,
                    resume=(folder / "probe.json").is_file())
    print(f"set-up {cls}: plan {t1 - t0:.0f} s, pretrain {t2 - t1:.0f} s, probe {time.perf_counter() - t2:.0f} s",
          flush=True)


def make_raw(work: Path) -> None:
    """diffprobe's raw dataset (as real_ct.py) and nnU-Net's twin (same images, empty labels for the unlabelled)."""
    import numpy as np
    import SimpleITK as sitk
    from real_ct import UNLABELLED, make_dataset

    dp = make_dataset(work / "raw", holdout_slices=6)
    nn = work / "raw" / NN_DATASET
    if not (nn / "dataset.json").is_file():
        for sub in ("imagesTr", "labelsTr"):
            (nn / sub).mkdir(parents=True, exist_ok=True)
        for img in sorted((dp / "imagesTr").glob("*_0000.nii.gz")):
            case = img.name[: -len("_0000.nii.gz")]
            (nn / "imagesTr" / img.name).symlink_to(img.resolve())
            lab = dp / "labelsTr" / f"{case}.nii.gz"
            if lab.is_file():
                (nn / "labelsTr" / lab.name).symlink_to(lab.resolve())
            else:
                ref = sitk.ReadImage(str(img))
                empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8))
                empty.CopyInformation(ref)
                sitk.WriteImage(empty, str(nn / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
        meta = json.loads((dp / "dataset.json").read_text())
        (nn / "dataset.json").write_text(json.dumps({**meta, "name": "RealCTnnunet"}))
    for vol, spec in VOLUMES.items():
        target = volume_file(work, vol)
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if spec is None:
            target.symlink_to((UNLABELLED / REALCT_CASE).resolve())
        else:
            from gpu_suite import ct_like_volume, write_volume

            write_volume(target, ct_like_volume(spec[0]), spec[1])


def setup(args: argparse.Namespace) -> dict:
    work = args.workdir
    make_raw(work)
    for cls in args.size_classes:
        if not (probe_folder(work, cls) / "checkpoint_final.pt").is_file():
            subprocess.run([sys.executable, __file__, "--setup-worker", "--workdir", str(work), "--size_classes", cls,
                            "--threads", str(args.threads)], env={**os.environ, **roots_env(work, cls, args.threads)},
                           check=True)
    if not (work / "nn_pre" / NN_DATASET / "nnUNetPlans.json").is_file():
        done = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(NN_ID), "-c", "3d_fullres", "-npfp", "2",
                               "--no_pp"], env={**os.environ, **roots_env(work, "cpu", args.threads)},
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"nnUNetv2_plan_and_preprocess failed:\n{(done.stdout + done.stderr)[-3000:]}")
    cmd = [sys.executable, __file__, "--flops-worker", "--workdir", str(work), "--threads", str(args.threads),
           "--size_classes", *args.size_classes, "--volumes", *args.volumes]
    done = subprocess.run(cmd, env={**os.environ, **roots_env(work, "cpu", args.threads)}, capture_output=True,
                          text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("FLOPS_JSON ")]
    if not line:
        sys.exit(f"FLOP count failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(line[-1][len("FLOPS_JSON "):])


# ---- timing ----------------------------------------------------------------------------------
def run_one(args: argparse.Namespace, tool: str, vol: str) -> dict:
    import bench_predict_support
    from _measure import run_measured

    work = args.workdir
    out = work / "outputs" / vol / tool.replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    inputs = volume_file(work, vol).parent
    if tool in NNUNET_TOOLS:
        env_cls = "cpu"
        cmd = [sys.executable, __file__, "--nnunet-worker", "--workdir", str(work), "--input", str(inputs),
               "--output", str(out), "--threads", str(args.threads), "--nnunet-np", str(args.nnunet_np),
               *(["--malloc-tuning"] if tool == NNUNET_TUNED else [])]
    else:
        env_cls = tool.split()[1]
        cmd = [sys.executable, str(HERE / "bench_predict.py"), "--diffprobe-cli", "predict", "-i", str(inputs),
               "-o", str(out), "-d", str(DP_ID), "-c", f"{PRETRAINED}__fpn", "-f", "all", "-device", "cpu",
               "-precision", args.dp_precision]
    env = {**os.environ, **roots_env(work, env_cls, args.threads)}
    load_before = os.getloadavg()
    m = run_measured(["timeout", "--kill-after=10", str(args.max_seconds), *cmd], env, poll_s=0.2, pss=True)
    timed_out = m.returncode in bench_predict_support.TIMEOUT_CODES
    row = {"tool": tool, "volume": vol, "seconds": round(m.seconds, 1), "timed_out": timed_out,
           "failed": m.returncode != 0 and not timed_out, "peak_pss_gb": round(m.peak_pss_gb, 2),
           "peak_rss_gb": round(m.peak_rss_gb, 2), "load_before": [round(x, 2) for x in load_before],
           "load_after": [round(x, 2) for x in os.getloadavg()]}
    tiles = bench_predict_support._TILES_RE.findall(m.output_tail)
    if tiles:
        row["tiles_total"] = int(tiles[-1][1])
    if timed_out:
        row.update(bench_predict_support.estimate_seconds(m.output_tail))
    if row["failed"]:
        row["output_tail"] = m.output_tail
    return row


def fmt_row(r: dict, flops: dict, voxels: float) -> str:
    secs = (f">{r['seconds']:.0f} (killed, ~{r['estimated_seconds']:.0f} est.)" if r["timed_out"]
            and r.get("estimated_seconds") else f">{r['seconds']:.0f} (killed)" if r["timed_out"]
            else "failed" if r["failed"] else f"{r['seconds']:.1f}")
    f = flops.get("nnU-Net" if r["tool"] in NNUNET_TOOLS else r["tool"], {})
    known = f.get("volumes", {}).get(r["volume"], {})
    # tiles the run's window reported; else the grid's count (diffprobe: before its body crop, an upper bound)
    tiles = r.get("tiles_total") or known.get("tiles") or known.get("tiles_uncropped")
    per_voxel = f["tile_flops"] * tiles / voxels if tiles and f else None
    pv = f"{per_voxel / 1e6:.2f}" if per_voxel else "-"
    ram = ("≥" if r["timed_out"] else "") + f"{r['peak_pss_gb']:.2f}"
    patch = "×".join(map(str, f.get("patch_size", [])))
    # achieved arithmetic over the whole case (start-up, reading and writing included), measured or estimated
    case_s = r.get("estimated_seconds") if r["timed_out"] else None if r["failed"] else r["seconds"]
    rate = f"{f['tile_flops'] * tiles / case_s / 1e12:.3f}" if tiles and f and case_s else "-"
    return (f"| {r['volume']} | {r['tool']} | {patch} | {tiles or '-'} | {f.get('tile_flops', 0) / 1e9:.1f} | {pv} | "
            f"{secs} | {rate} | {ram} | {r['load_before'][0]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffprobe_fair_predict"))
    ap.add_argument("--volumes", nargs="+", choices=list(VOLUMES), default=list(VOLUMES))
    ap.add_argument("--size_classes", nargs="+", default=["cpu", "paper"],
                    help="diffprobe size classes (cpu: the 60-min CPU budget's choice on 2 cores; paper: GPU's)")
    ap.add_argument("--runs", nargs="+", default=None,
                    help=f"tools to time, e.g. 'diffprobe cpu' nnU-Net '{NNUNET_TUNED}'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--nnunet-np", type=int, default=3)
    ap.add_argument("--dp-precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="diffprobe -precision (fp32: the same arithmetic as nnU-Net on the CPU)")
    ap.add_argument("--json", type=Path, default=None)
    for hidden in ("--nnunet-worker", "--setup-worker", "--flops-worker"):
        ap.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--malloc-tuning", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    if args.nnunet_worker:
        return nnunet_worker(args)
    if args.setup_worker:
        return setup_worker(args)
    if args.flops_worker:
        return flops_worker(args)
    flops = setup(args)
    tools = args.runs or [*(f"diffprobe {c}" for c in args.size_classes), "nnU-Net"]
    import SimpleITK as sitk

    voxels = {}
    for vol in args.volumes:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(volume_file(args.workdir, vol)))
        reader.ReadImageInformation()
        size = reader.GetSize()
        voxels[vol] = float(size[0] * size[1] * size[2])
    rows = []
    for vol in args.volumes:
        for tool in tools:
            print(f"{vol}: {tool} ...", end=" ", flush=True)
            rows.append(run_one(args, tool, vol))
            print(fmt_row(rows[-1], flops, voxels[vol]), flush=True)
            if rows[-1]["failed"]:
                print(rows[-1]["output_tail"], file=sys.stderr)
    report = {"cpu_count": os.cpu_count(), "threads": args.threads, "max_seconds": args.max_seconds,
              "dp_precision": args.dp_precision, "flops": flops, "voxels": voxels, "rows": rows}
    path = args.json or args.workdir / "bench_fair_predict.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\n{os.cpu_count()} cores, {args.threads} torch threads per tool, diffprobe -precision "
          f"{args.dp_precision}, killed after {args.max_seconds:.0f} s; raw numbers: {path}")
    print("| volume | tool | patch | tiles | GFLOP/tile | MFLOP/output voxel | s/case | TFLOP/s | peak PSS GB | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(fmt_row(r, flops, voxels[r["volume"]]))


if __name__ == "__main__":
    main()
