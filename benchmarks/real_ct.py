"""The method on real CT, validated inside what we have: held-out slabs of the labelled case.

Builds an nnU-Net raw dataset from ``../shared/data/real-ct`` (one labelled 20-slice abdominal
CT) and ``../shared/data/real-ct-unlabelled`` (three unlabelled CTs), runs the README pipeline
(plan_and_preprocess with a compute budget -> pretrain -> train -f all -> predict -> evaluate)
and reports Dice per organ on:

- ``fit``: the labelled slab the probe trained on (does the probe fit its own training data?),
- ``heldout``: the slab of the same patient it never saw (internal validation; the project lead
  scores other patients on scans we never see — this is the honest proxy we have).

The labelled case is split along z (``--holdout_slices`` at the caudal end go to imagesTs /
labelsTs). Every scan, including the held-out slab's image, is in pretraining's imagesTr only
when ``--pretrain_on_heldout`` is given (unlabelled self-supervision on the test image is
legitimate transductive use, but off by default so the number is strictly "never seen").

    python benchmarks/real_ct.py --work /tmp/realct --budget_minutes 60
    python benchmarks/real_ct.py --work /tmp/rc_gpu --device cuda --budget_minutes 3.5 --threads 16  # a GPU day
    python benchmarks/real_ct.py --work /tmp/realct --size_class tiny --bpr_steps 50 --diffusion_steps 50 \
        --probe_steps 200    # a quick look

The held-out slab alone is 4 slices at 3 mm, thinner than any scan a user segments; the fairer
proxy (the labelled image cut to 14..20 slices, scored on its training and held-out slices) and
the controls on the same pretrained model are in ``benchmarks/real_ct_probe.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# DIFFPROBE_SHARED_DATA: another copy of ../shared/data (a GPU machine gets one made by
# benchmarks/pack_for_device.py: shared/ does not travel there)
SHARED = Path(os.environ.get("DIFFPROBE_SHARED_DATA")
              or Path(__file__).resolve().parents[2] / "shared" / "data").resolve()
LABELLED = SHARED / "real-ct"
UNLABELLED = SHARED / "real-ct-unlabelled"
DATASET = "Dataset010_RealCT"
ORGANS = ("spleen", "liver", "stomach", "aorta", "inferior_vena_cava", "portal_and_splenic_vein", "pancreas",
          "right_adrenal_gland")


def work_roots(work: Path) -> dict[str, str]:
    """The diffprobe data-root variables of ``<work>/raw``, ``preprocessed`` and ``results``."""
    return {f"DIFFPROBE_{kind.upper()}": str(work / kind) for kind in ("raw", "preprocessed", "results")}


def use_work_roots(work: Path) -> None:
    """Point this process's diffprobe data roots at ``work`` (:func:`work_roots`)."""
    os.environ.update(work_roots(work))


def make_dataset(raw: Path, holdout_slices: int) -> Path:
    """Write the raw dataset (labelled case split into a training and a held-out slab along z)."""
    import SimpleITK as sitk

    folder = raw / DATASET
    if (folder / "dataset.json").is_file():
        return folder
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(LABELLED / "abdomen_dicom_0000.nii.gz"))
    label = sitk.ReadImage(str(LABELLED / "abdomen_dicom_label.nii.gz"))  # y-flipped on purpose: slab by z only
    nz = image.GetSize()[2]
    cut = nz - holdout_slices
    sitk.WriteImage(image[:, :, :cut], str(folder / "imagesTr" / "abdomen_0000.nii.gz"))
    sitk.WriteImage(label[:, :, :cut], str(folder / "labelsTr" / "abdomen.nii.gz"))
    sitk.WriteImage(image[:, :, cut:], str(folder / "imagesTs" / "abdomenslab_0000.nii.gz"))
    sitk.WriteImage(label[:, :, cut:], str(folder / "labelsTs" / "abdomenslab.nii.gz"))
    for f in sorted(UNLABELLED.glob("*_0000.nii.gz")):
        (folder / "imagesTr" / f.name).symlink_to(f)
    labels = json.loads((LABELLED / "labels.json").read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz",
        "name": "RealCT", "description": "shared real CTs; labelled case split into train / held-out slabs"}))
    return folder


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str], env: dict[str, str], log: list[dict]) -> float:
    """Run one diffprobe command; log its wall seconds, CPU seconds and the load around it.

    CPU seconds (user + system of the command's processes) are the work done: on a machine shared
    with other jobs the wall time stretches, the CPU time much less, so ``cpu_seconds / threads``
    estimates the wall time of an idle machine with that many cores."""
    started, cpu0, load0 = time.perf_counter(), _children_cpu_seconds(), os.getloadavg()[0]
    print("$ diffprobe " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "diffprobe", *argv], env=env, check=True)
    seconds = time.perf_counter() - started
    log.append({"argv": argv, "seconds": round(seconds, 1), "cpu_seconds": round(_children_cpu_seconds() - cpu0, 1),
                "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)})
    return seconds


def dice_row(summary: Path) -> dict[str, float]:
    data = json.loads(summary.read_text())
    # evaluate's summary keys classes by id (with a "labels" map); train's validation summary by name
    names = {str(v): n for n, v in data["labels"].items()} if "labels" in data else {n: n for n in data["mean"]}
    row = {names[c]: round(v["Dice"], 3) for c, v in data["mean"].items()
           if names.get(c) in ORGANS and v["Dice"] is not None}
    present = [v for v in row.values() if v == v]
    row["mean"] = round(sum(present) / len(present), 3) if present else float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--holdout_slices", type=int, default=6)
    ap.add_argument("--budget_minutes", type=float, default=None)
    ap.add_argument("--size_class", default=None)
    ap.add_argument("--bpr_steps", type=int, default=None)
    ap.add_argument("--diffusion_steps", type=int, default=None)
    ap.add_argument("--probe_steps", type=int, default=None)
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--target_spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="plan this spacing (the CPU run's [3, 1.5, 1.5] for data packed at 1.5 mm in-plane, whose "
                         "z is no longer 'anisotropic' to the planner's rule)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="realct")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every stage: planning's timing, training, predict)")
    ap.add_argument("--seed", type=int, default=0,
                    help="pretraining's and the probe's seed (a second run: another seed)")
    args = ap.parse_args()
    if not (LABELLED / "abdomen_dicom_0000.nii.gz").is_file():
        sys.exit(f"{LABELLED} not found")
    work = args.work.resolve()
    env = {**os.environ, **work_roots(work), "OMP_NUM_THREADS": str(args.threads)}
    folder = make_dataset(work / "raw", args.holdout_slices)
    log: list[dict] = []
    plan = ["plan_and_preprocess", "-d", "10", "-np", str(min(args.threads, 8))]
    if args.budget_minutes:
        plan += ["--budget_minutes", str(args.budget_minutes), "-device", args.device]
    if args.size_class:
        plan += ["--size_class", args.size_class]
    for o in args.override:
        plan += ["--override", o]
    if args.target_spacing:
        plan += ["--target_spacing", *map(str, args.target_spacing)]
    run(plan, env, log)
    pre = ["pretrain", "-d", "10", "--name", args.name, "-device", args.device, "--seed", str(args.seed)]
    if args.bpr_steps is not None:
        pre += ["--bpr_steps", str(args.bpr_steps)]
    if args.diffusion_steps is not None:
        pre += ["--diffusion_steps", str(args.diffusion_steps)]
    model_done = (work / "results" / "pretrained" / args.name / "diffusion" / "checkpoint_final.pt").is_file()
    if not model_done:
        run(pre + (["--c"] if (work / "results" / "pretrained" / args.name / "model.json").is_file() else []),
            env, log)
    train = ["train", "-d", "10", "-f", "all", "--pretrained", args.name, "-device", args.device,
             "--seed", str(args.seed)]
    if args.probe_steps is not None:
        train += ["--steps", str(args.probe_steps)]
    results = work / "results" / DATASET / "diffprobe" / f"{args.name}__fpn" / "fold_all"
    if not (results / "checkpoint_final.pt").is_file():
        run(train + (["--c"] if (results / "probe.json").is_file() else []), env, log)
    preds = work / "pred"
    run(["predict", "-i", str(folder / "imagesTs"), "-o", str(preds), "-d", "10", "-f", "all", "-c",
         f"{args.name}__fpn", "-device", args.device], env, log)
    run(["evaluate", "-ref", str(folder / "labelsTs"), "-pred", str(preds), "-d", "10"], env, log)
    rows = {"fit (training slab)": dice_row(results / "validation" / "summary.json"),
            "held-out slab": dice_row(preds / "summary.json")}
    plans = json.loads((work / "preprocessed" / DATASET / "diffprobe" / "plans.json").read_text())
    report = {"rows": rows, "log": log, "size_class": plans["size_class"], "patch_size": plans["patch_size"],
              "target_spacing": plans["preprocessing"]["target_spacing"], "budget": plans["training"].get("budget"),
              "total_seconds": round(sum(e["seconds"] for e in log), 1),
              "total_cpu_seconds": round(sum(e["cpu_seconds"] for e in log), 1), "threads": args.threads,
              "device": args.device, "seed": args.seed, "steps": (plans["training"].get("budget") or {}).get("steps"),
              "data": str(SHARED)}
    (work / "real_ct_report.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'row':<22}" + "".join(f"{o[:10]:>11}" for o in ORGANS) + f"{'mean':>8}")
    for name, row in rows.items():
        print(f"{name:<22}" + "".join(f"{row.get(o, float('nan')):>11.3f}" for o in ORGANS) + f"{row['mean']:>8.3f}")
    print(f"total {report['total_seconds']} s wall, {report['total_cpu_seconds']} CPU s "
          f"(~{report['total_cpu_seconds'] / args.threads / 60:.1f} min on {args.threads} idle cores); "
          f"size class {report['size_class']}, patch {report['patch_size']}, "
          f"spacing {report['target_spacing']}")


if __name__ == "__main__":
    main()
