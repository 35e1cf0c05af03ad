"""Where each predicted organ lies in the body, on other patients' whole scans: a label-free check.

``real_ct_whole_scans.py`` says whether an organ has a plausible volume and shape. It cannot see an
aorta predicted on the vertebral body: right size, one piece, wrong place. The BPR gives every voxel
of every scan body coordinates (channels LR, AP, CC; 1 unit = 100 mm, ``docs/bpr.md``) that line up
across patients. So an organ predicted on another patient should sit near the same LR/AP
coordinates as that organ's label in the labelled training case, compared within the same
cranio-caudal band (the labelled slab covers only ~3 cm of CC).

Per probe, scan and organ, on the preprocessed grid (the prediction mapped there with
``seg_onto_preprocessed``; the BPR maps of ``--frame``, the pretrained model whose BPR is the frame of
reference, the same for every probe):

- ``offset_mm``: distance in the LR/AP plane between the predicted organ's centroid inside the band
  and the labelled organ's centroid (``ap_mm``: its AP part, positive = posterior of the label);
- ``band_ml``: the predicted organ's volume inside the band (the centroid's support);
- ``median_hu``: the predicted organ's median HU (all of it), next to the labelled organ's.

    python benchmarks/real_ct_placement.py --work /tmp/realct8 --names controls_from_scratch__realct zint05

Reads ``<work>/whole_scans/<name>/<scan>.nii.gz`` (``real_ct_whole_scans.py`` writes them); appends one
JSON line per (probe, scan) to ``<work>/real_ct_placement.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, ORGANS, use_work_roots  # noqa: E402
from real_ct_whole_scans import SCANS  # noqa: E402

from diffprobe.preprocessing.storage import load_array  # noqa: E402

MM_PER_UNIT = 100.0  # BPR_SCALE_PER_MM = 0.01
BAND_MARGIN = 0.05  # CC units (5 mm) added to each side of the labelled organ's band


def reference_placement(seg: np.ndarray, coords: np.ndarray, hu: np.ndarray, label: int) -> dict | None:
    """The labelled organ's LR/AP centroid, CC band and median HU; None when the case lacks it.

    ``seg`` (z, y, x) labels, ``coords`` (3, z, y, x) BPR coordinates (LR, AP, CC), ``hu`` (z, y, x)."""
    mask = seg == label
    if not mask.any():
        return None
    cc = coords[2][mask]
    return {"lr": float(coords[0][mask].mean()), "ap": float(coords[1][mask].mean()),
            "band": [float(cc.min()) - BAND_MARGIN, float(cc.max()) + BAND_MARGIN],
            "median_hu": float(np.median(hu[mask]))}


def organ_placement(pred: np.ndarray, coords: np.ndarray, hu: np.ndarray, label: int, ref: dict,
                    voxel_ml: float) -> dict:
    """The predicted organ's placement against ``ref`` (see the module docstring); offsets None when the
    prediction has no voxel of the organ inside the band."""
    mask = pred == label
    lo, hi = ref["band"]
    band = mask & (coords[2] >= lo) & (coords[2] <= hi)
    out = {"ml": round(float(mask.sum()) * voxel_ml, 1), "band_ml": round(float(band.sum()) * voxel_ml, 1),
           "median_hu": round(float(np.median(hu[mask])), 1) if mask.any() else None,
           "offset_mm": None, "ap_mm": None}
    if band.any():
        d_lr = (float(coords[0][band].mean()) - ref["lr"]) * MM_PER_UNIT
        d_ap = (float(coords[1][band].mean()) - ref["ap"]) * MM_PER_UNIT
        out["offset_mm"], out["ap_mm"] = round(float(np.hypot(d_lr, d_ap)), 1), round(d_ap, 1)
    return out


def _volume(path: Path) -> np.ndarray:
    """A preprocessed array without its channel axis (data and seg files)."""
    arr = load_array(path)
    return arr[0] if arr.ndim == 4 else arr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--names", nargs="+", required=True, help="probes predicted by real_ct_whole_scans.py")
    ap.add_argument("--scans", nargs="*", default=list(SCANS))
    ap.add_argument("--frame", default="realct", help="pretrained model whose BPR maps are the frame")
    ap.add_argument("--reference", default="abdomen", help="the labelled training case")
    args = ap.parse_args()
    work = args.work.resolve()
    use_work_roots(work)
    import SimpleITK as sitk

    from diffprobe import paths
    from diffprobe.preprocessing.normalization import denormalize_ct
    from diffprobe.preprocessing.preprocess import seg_onto_preprocessed

    data = paths.preprocessed_root() / DATASET / paths.SUBFOLDER / "data"
    maps = paths.results_root() / "pretrained" / args.frame / "bpr_maps" / DATASET
    plans = json.loads((data.parent / "plans.json").read_text())
    norm = plans["preprocessing"]["normalization"]["0"]
    voxel_ml = float(np.prod(plans["preprocessing"]["target_spacing"])) / 1000.0
    labels = json.loads((work / "raw" / DATASET / "dataset.json").read_text())["labels"]

    def case(identifier: str) -> tuple[np.ndarray, np.ndarray]:
        coords = load_array(maps / f"{identifier}.b2nd").astype(np.float32)  # (3, z, y, x)
        return coords, denormalize_ct(_volume(data / f"{identifier}.b2nd"), norm)

    coords, hu = case(args.reference)
    seg = _volume(data / f"{args.reference}_seg.b2nd")
    refs = {o: r for o in ORGANS if (r := reference_placement(seg, coords, hu, labels[o])) is not None}
    scans = {s: (*case(s), json.loads((data / f"{s}.json").read_text())) for s in args.scans}
    for name in args.names:
        rows = {}
        for scan, (coords, hu, props) in scans.items():
            file = work / "whole_scans" / name / f"{scan}.nii.gz"
            if not file.is_file():
                print(f"{name}: {scan} was not predicted ({file} missing): left out")
                continue
            raw = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
            pred = seg_onto_preprocessed(raw, props)
            rows[scan] = {o: organ_placement(pred, coords, hu, labels[o], refs[o], voxel_ml) for o in refs}
            with open(work / "real_ct_placement.jsonl", "a") as f:
                f.write(json.dumps({"name": name, "scan": scan, "frame": args.frame, "organs": rows[scan]}) + "\n")
        print(f"\n{name}: offset from the labelled organ in the LR/AP plane, mm (AP part; + = posterior), "
              f"median HU (labelled organ's)")
        print(f"{'organ':26s}" + "".join(f"{s:>26s}" for s in rows))
        for organ, ref in refs.items():
            cells = []
            for scan in rows:
                r = rows[scan][organ]
                cells.append("-" if r["offset_mm"] is None else
                             f"{r['offset_mm']:.0f} ({r['ap_mm']:+.0f}) {r['median_hu']:.0f}")
            head = f"{organ} ({ref['median_hu']:.0f} HU)"
            print(f"{head:26s}" + "".join(f"{c:>26s}" for c in cells))
        offsets = [rows[s][o]["offset_mm"] for s in rows for o in refs if rows[s][o]["offset_mm"] is not None]
        print(f"mean offset over organs and scans: {np.mean(offsets):.1f} mm ({len(offsets)} placed)")


if __name__ == "__main__":
    main()
