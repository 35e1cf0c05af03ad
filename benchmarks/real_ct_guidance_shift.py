"""How much a probe's prediction depends on the BPR guidance: predict with the coordinates shifted.

The paper's idea is the guidance: the denoiser sees the noisy patch ⊕ the BPR body coordinates. Whether a
trained probe uses them can be measured without labels. Predict the same scan again with every guidance
channel offset by a fixed amount (``--shifts LR AP CC`` in BPR units, 1 unit = 100 mm). Then count the
foreground voxels whose label changes, and the change in each organ's volume. A probe that reads position
moves or loses organs; one that reads appearance alone does not change.

The offset is applied where predict computes a volume's guidance (``BprGuidance.volume``), patched in
this process only: a measuring tool, not a user option.

    python benchmarks/real_ct_guidance_shift.py --work /tmp/realct8 --names controls_pretrained__realct \\
        controls_from_scratch__realct --scans crlm1004 --shifts 0 0.3 0 --shifts 0 1 0

Writes ``<work>/whole_scans/<name>__g<LR>_<AP>_<CC>/<scan>.nii.gz`` (``real_ct_placement.py --names`` reads
them) next to the unshifted ``<work>/whole_scans/<name>/`` (``real_ct_whole_scans.py`` makes it), appends
one JSON line per (probe, scan, shift) to ``<work>/real_ct_guidance_shift.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, ORGANS, use_work_roots  # noqa: E402
from real_ct_whole_scans import SCANS, scan_inputs, selected_inputs  # noqa: E402


def label_change(reference: np.ndarray, shifted: np.ndarray) -> float:
    """The share of voxels labelled foreground in either map whose label differs between them."""
    union = (reference > 0) | (shifted > 0)
    return float((reference != shifted)[union].mean()) if union.any() else 0.0


@contextmanager
def shifted_guidance(offsets: tuple[float, float, float]) -> Iterator[None]:
    """Inside: ``BprGuidance.volume`` returns the coordinates plus ``offsets`` (LR, AP, CC)."""
    from diffprobe import guidance

    original = guidance.BprGuidance.volume

    def volume(self, data, spacing, bpr=None, bpr_crop=None):
        coords = original(self, data, spacing, bpr, bpr_crop)
        return coords + coords.new_tensor(offsets).view(3, *([1] * (coords.dim() - 1)))

    guidance.BprGuidance.volume = volume
    try:
        yield
    finally:
        guidance.BprGuidance.volume = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--names", nargs="+", required=True, help="trained probe configurations (BPR guidance)")
    ap.add_argument("--scans", nargs="*", default=["crlm1004"])
    ap.add_argument("--shifts", nargs=3, type=float, action="append", metavar=("LR", "AP", "CC"),
                    help="guidance offsets in BPR units (repeat for several; default: AP 0.3 and AP 1.0)")
    args = ap.parse_args()
    shifts = [tuple(s) for s in (args.shifts or [[0.0, 0.3, 0.0], [0.0, 1.0, 0.0]])]
    work = args.work.resolve()
    use_work_roots(work)
    import SimpleITK as sitk

    from diffprobe.predict.predictor import predict

    unknown = [s for s in args.scans if s not in SCANS]
    if unknown:
        sys.exit(f"unknown scans {unknown}: choose from {SCANS}")
    labels, inputs = scan_inputs(work, "whole_scans", args.scans)
    selected = selected_inputs(inputs, args.scans)
    for name in args.names:
        base = work / "whole_scans" / name
        missing = [s for s in args.scans if not (base / f"{s}.nii.gz").is_file()]
        if missing:
            sys.exit(f"{base}: no unshifted prediction of {missing}; run real_ct_whole_scans.py --names {name} first")
        for shift in shifts:
            out = work / "whole_scans" / f"{name}__g{shift[0]:+.1f}_{shift[1]:+.1f}_{shift[2]:+.1f}"
            with shifted_guidance(shift):
                predict(selected, out, DATASET, name, ["all"], "cpu", show_progress=False)
            for scan in args.scans:
                ref_img = sitk.ReadImage(str(base / f"{scan}.nii.gz"))
                ref = sitk.GetArrayFromImage(ref_img)
                new = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{scan}.nii.gz")))
                voxel_ml = float(np.prod(ref_img.GetSpacing())) / 1000.0
                volumes = {o: [round(float((m == labels[o]).sum()) * voxel_ml, 1) for m in (ref, new)] for o in ORGANS}
                line = {"name": name, "scan": scan, "shift_lr_ap_cc": list(shift),
                        "changed": round(label_change(ref, new), 4), "organ_ml_before_after": volumes}
                with open(work / "real_ct_guidance_shift.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                moved = " ".join(f"{o[:6]}={a:.0f}->{b:.0f}" for o, (a, b) in volumes.items() if a or b)
                print(f"{name:34s} {scan:12s} shift {shift}: {100 * line['changed']:.1f} % of foreground "
                      f"relabelled; mL {moved}")


if __name__ == "__main__":
    main()
