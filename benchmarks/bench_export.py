"""Export of one whole real CT (probabilities back to the raw grid, postprocessing, NIfTI): numpy's float16
cast vs torch's (``diffprobe.predict.cases.to_probability_dtype``), side by side on the same probabilities.

Usage:
    python benchmarks/bench_export.py --work /tmp/realct6 --name realct__fpn --scans crlm1004 pancreas001 [--rounds 3]

``--work``: a ``benchmarks/real_ct.py`` folder. For each scan the sliding window runs once (the trained
probe, default settings); then ``Predictor.export_case`` runs on copies of the same probabilities with
each cast, alternating, ``--rounds`` times; the median seconds are printed and the label maps compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, use_work_roots  # noqa: E402
from real_ct_whole_scans import scan_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--name", default="realct__fpn")
    ap.add_argument("--scans", nargs="*", default=["crlm1004", "pancreas001"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    use_work_roots(work)
    from diffprobe.predict import cases
    from diffprobe.predict.inputs import input_cases
    from diffprobe.predict.predictor import Predictor, select_model

    casts = {"numpy astype": lambda plane: plane.astype(cases.PROBABILITY_DTYPE),
             "torch (default)": cases.to_probability_dtype}
    _, inputs = scan_inputs(work, "export", args.scans)
    predictor = Predictor.from_folders(select_model(DATASET, args.name, ["all"]), "cpu")
    out = work / "export" / "out"
    rows = []
    for scan in args.scans:
        case = next(c for c in input_cases(inputs, 1) if c.identifier == scan)
        result = predictor.window_case(predictor.load_case(case))
        seconds: dict[str, list[float]] = {k: [] for k in casts}
        labels = {}
        for r in range(args.rounds):
            for name in (list(casts) if r % 2 == 0 else list(reversed(casts))):
                one = copy.copy(result)
                one.probabilities = result.probabilities.clone()
                cases.to_probability_dtype = casts[name]  # what to_raw_grid calls
                target = out / name.split()[0] / f"{scan}.nii.gz"
                shutil.rmtree(target.parent, ignore_errors=True)
                target.parent.mkdir(parents=True)
                started = time.perf_counter()
                predictor.export_case(one, target)
                seconds[name].append(time.perf_counter() - started)
                labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(target)))
        cases.to_probability_dtype = casts["torch (default)"]
        same = bool(np.array_equal(*labels.values()))
        row = {"scan": scan, "classes": int(result.probabilities.shape[0]),
               "median_s": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
               "all_s": {k: [round(x, 2) for x in v] for k, v in seconds.items()}, "labels_identical": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'scan':12s} {'numpy s':>8s} {'torch s':>8s} {'ratio':>6s}  labels identical")
    for row in rows:
        a, b = row["median_s"]["numpy astype"], row["median_s"]["torch (default)"]
        print(f"{row['scan']:12s} {a:8.2f} {b:8.2f} {b / a:6.2f}  {row['labels_identical']}")


if __name__ == "__main__":
    main()
