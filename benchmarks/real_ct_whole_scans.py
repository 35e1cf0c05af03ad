"""Probes of ``benchmarks/real_ct.py``'s work folder on whole real CTs whose labels nobody has.

The project lead scores other patients' whole abdominal CTs; our only labelled case is a 20-slice
slab. This script predicts the three unlabelled real CTs of ``../shared/data/real-ct-unlabelled``
(chest-to-pelvis and upper-abdomen scans, other scanners, other patients; their images were in
pretraining, their labels exist nowhere) and reports what can be checked without labels, per
organ: volume (mL), number of connected components (26-connectivity), the share of the organ's
volume in its largest component, its cranio-caudal extent (mm) and its volume outside the body (air,
table: ``diffprobe.preprocessing.cropping.filled_body``). A liver in five pieces, or
"spleen" in the pelvis, is wrong whatever the Dice. One PNG per probe shows a coronal and an
axial slice of every scan with the prediction over it.

    python benchmarks/real_ct_whole_scans.py --work /tmp/realct --names zjit zaug02
    python benchmarks/real_ct_whole_scans.py --work /tmp/realct --names zjit --scans crlm1004
    python benchmarks/real_ct_whole_scans.py --work /tmp/realct --names zjit --postprocessing both

Appends one JSON line per (probe, scan) to ``<work>/real_ct_whole_scans.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, ORGANS, UNLABELLED, use_work_roots  # noqa: E402

from diffprobe.preprocessing.cropping import filled_body  # noqa: E402

SCANS = ("crlm1004", "crlm1006", "pancreas001")


def selected_inputs(inputs: Path, scans) -> Path:
    """A fresh folder next to ``inputs`` holding links to exactly ``scans``: ``predict`` reads every image
    of the folder it is given, and the copy cache keeps every scan an earlier run asked for."""
    selected = inputs.parent / "selected"
    shutil.rmtree(selected, ignore_errors=True)
    selected.mkdir(parents=True)
    for scan in scans:
        os.symlink(inputs / f"{scan}_0000.nii.gz", selected / f"{scan}_0000.nii.gz")
    return selected


def scan_inputs(work: Path, folder: str, scans) -> tuple[dict[str, int], Path]:
    """The dataset's labels and ``<work>/<folder>/img`` holding the scans' images (copied once)."""
    labels = json.loads((work / "raw" / DATASET / "dataset.json").read_text())["labels"]
    inputs = work / folder / "img"
    inputs.mkdir(parents=True, exist_ok=True)
    for scan in scans:
        if not (inputs / f"{scan}_0000.nii.gz").exists():
            shutil.copy(UNLABELLED / f"{scan}_0000.nii.gz", inputs / f"{scan}_0000.nii.gz")
    return labels, inputs


def organ_stats(seg: np.ndarray, spacing_zyx: tuple[float, ...], label: int, body: np.ndarray | None = None) -> dict:
    """Volume, components, largest-component share, z extent and (with ``body``) the volume outside the
    body of one label in a (z, y, x) map."""
    from scipy import ndimage

    mask = seg == label
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    n = int(mask.sum())
    if n == 0:
        return {"ml": 0.0, "components": 0, "largest_share": 0.0, "z_extent_mm": 0.0, "outside_body_ml": 0.0}
    comps, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel())[1:]
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    outside = float((mask & ~body).sum()) * voxel_ml if body is not None else float("nan")
    return {"ml": round(n * voxel_ml, 1), "components": int(count), "largest_share": round(float(sizes.max()) / n, 3),
            "z_extent_mm": round(float(zs[-1] - zs[0] + 1) * spacing_zyx[0], 1), "outside_body_ml": round(outside, 2)}


def overlay(images: dict[str, np.ndarray], preds: dict[str, np.ndarray], spacings: dict, liver: int, title: str,
            out: Path) -> None:
    """Coronal (through the body's middle) and axial (through the liver's centre) slices per scan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(images), figsize=(5 * len(images), 9), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for col, name in enumerate(images):
        img, seg, sp = images[name], preds[name], spacings[name]
        where = np.argwhere(seg == liver)
        zc, yc = (where.mean(axis=0)[:2].astype(int) if len(where) else (img.shape[0] // 2, img.shape[1] // 2))
        views = ((img[:, yc, :], seg[:, yc, :], sp[0] / sp[2], "coronal"), (img[zc], seg[zc], sp[1] / sp[2], "axial"))
        for row, (im, sg, aspect, view) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(np.clip(im, -200, 300), cmap="gray", aspect=aspect, origin="lower" if view == "coronal" else None)
            masked = np.ma.masked_where(sg == 0, sg)
            ax.imshow(masked, cmap=cmap, vmin=0, vmax=20, alpha=0.5, aspect=aspect, interpolation="nearest",
                      origin="lower" if view == "coronal" else None)
            ax.set_title(f"{name} {view}")
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--names", nargs="+", required=True, help="trained probe configurations to predict with")
    ap.add_argument("--scans", nargs="*", default=list(SCANS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--postprocessing", choices=("on", "off", "both"), default="on",
                    help="predict with the model's postprocessing (default), without it (-npp), or both side by side")
    args = ap.parse_args()
    work = args.work.resolve()
    use_work_roots(work)
    import SimpleITK as sitk

    from diffprobe.predict.predictor import predict

    labels, inputs = scan_inputs(work, "whole_scans", args.scans)
    images, spacings, bodies = {}, {}, {}
    for scan in args.scans:  # each file read once: its voxels and its (z, y, x) spacing
        image = sitk.ReadImage(str(inputs / f"{scan}_0000.nii.gz"))
        images[scan], spacings[scan] = sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]
        bodies[scan] = filled_body(images[scan])
    selected = selected_inputs(inputs, args.scans)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.postprocessing]
    for name, postprocess in [(n, p) for n in args.names for p in modes]:
        out = work / "whole_scans" / (name if postprocess else f"{name}__npp")
        started, cpu0 = time.perf_counter(), os.times()
        predict(selected, out, DATASET, name, ["all"], args.device, show_progress=False, postprocess=postprocess)
        seconds, cpu1 = round(time.perf_counter() - started, 1), os.times()
        # the CPU seconds and the load say whether the wall seconds were this predict's alone (2 cores:
        # ~2x the wall seconds and a load of ~2 when nothing else ran)
        timing = {"predict_seconds_all_scans": seconds, "scans_predicted": len(args.scans),
                  "cpu_seconds": round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1),
                  "load_average": round(os.getloadavg()[0], 2)}
        preds = {s: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{s}.nii.gz"))) for s in args.scans}
        for scan in args.scans:
            stats = {organ: organ_stats(preds[scan], spacings[scan], labels[organ], bodies[scan]) for organ in ORGANS}
            line = {"name": name, "scan": scan, "postprocessing": postprocess, **timing, "organs": stats}
            with open(work / "real_ct_whole_scans.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"\n{name} on {scan}" + ("" if postprocess else " (no postprocessing)"))
            print(f"{'organ':28s} {'mL':>8s} {'comps':>6s} {'largest':>8s} {'z mm':>6s} {'out mL':>7s}")
            for organ, st in stats.items():
                print(f"{organ:28s} {st['ml']:8.1f} {st['components']:6d} {st['largest_share']:8.3f} "
                      f"{st['z_extent_mm']:6.1f} {st['outside_body_ml']:7.2f}")
        figure = work / "whole_scans" / f"{out.name}.png"
        overlay(images, preds, spacings, labels["liver"], f"probe {out.name}: whole unlabelled real CTs", figure)
        print(f"\n{out.name}: {seconds} s for {len(args.scans)} scans ({timing['cpu_seconds']} CPU s, load "
              f"{timing['load_average']}); overlay {figure}")


if __name__ == "__main__":
    main()
