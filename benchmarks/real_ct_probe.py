"""Probe variants on the real-CT dataset of ``benchmarks/real_ct.py``, scored the honest ways we have.

``real_ct.py`` runs the whole pipeline once (plan -> pretrain -> train -> predict); this script
trains further probes on its pretrained model (or a control) and scores each on:

- ``fit``: fold-``all`` validation on the training slab (the probe's own training image),
- ``heldout_alone``: the held-out slab predicted as an image of its own (4 slices at 3 mm: far
  thinner than any scan a user segments; the BPR and the denoiser see mostly padding),
- ``full_n{N}_train`` / ``full_n{N}_heldout``: the labelled image cut to its first N slices
  (default 14 16 18 20: the training slab plus 0..6 held-out slices) predicted as one image, then
  scored on the training slices and on the held-out slices it contains. The labels of the held-out
  slices were never trained on and their image was never in pretraining; the training-slice rows
  say whether the probe survives a field of view it was not trained on (one of every user's scans).

    python benchmarks/real_ct_probe.py --work /tmp/realct --name realct__zjit
    python benchmarks/real_ct_probe.py --work /tmp/realct --name realct__lr5e3 --override lr=0.005
    python benchmarks/real_ct_probe.py --work /tmp/realct --name realct__nobackbone --extractor input
    python benchmarks/real_ct_probe.py --work /tmp/realct --name realct__random --pretrained realct_random_init
    python benchmarks/real_ct_probe.py --work /tmp/realct --name zjit --score_only --tta 4       # TTA, same probe
    python benchmarks/real_ct_probe.py --work /tmp/realct --name zt2510 --timesteps 2 5 10     # less noise
    python benchmarks/real_ct_probe.py --work /tmp/realct --name zjit --score_only --precision bf16
    python benchmarks/real_ct_probe.py --work /tmp/realct --name zjit --score_only --no_postprocessing  # plain argmax

Appends one JSON line per probe to ``<work>/real_ct_probes.jsonl`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, LABELLED, dice_row, use_work_roots  # noqa: E402


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def score_cut_images(work: Path, config: str, cut: int, lengths: list[int], labels: dict[str, int],
                     tta: int = 0, precision: str = "fp32", postprocess: bool = True) -> dict:
    """Predict the labelled image cut to its first N slices; Dice on its training and held-out slices."""
    import SimpleITK as sitk

    from diffprobe.evaluation.evaluate import evaluate_folders
    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import predict

    image = sitk.ReadImage(str(LABELLED / "abdomen_dicom_0000.nii.gz"))
    raw = work / "raw" / DATASET
    refs = {"train": sitk.ReadImage(str(raw / "labelsTr" / "abdomen.nii.gz")),
            "heldout": sitk.ReadImage(str(raw / "labelsTs" / "abdomenslab.nii.gz"))}
    rows = {}
    for n in lengths:
        mode = ("none" if not tta else f"tta{tta}") + ("" if precision == "fp32" else f"_{precision}") \
            + ("" if postprocess else "_npp")
        base = work / "cut_images" / config / mode / f"n{n}"
        (base / "img").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image[:, :, :n], str(base / "img" / "abdomen_0000.nii.gz"))
        started = time.perf_counter()
        predict(base / "img", base / "pred", DATASET, config, ["all"], "cpu", show_progress=False, tta=tta or False,
                settings=InferenceSettings(precision=precision), postprocess=postprocess)
        rows[f"full_n{n}_seconds"] = round(time.perf_counter() - started, 1)
        pred = sitk.ReadImage(str(base / "pred" / "abdomen.nii.gz"))
        parts = {"train": (slice(0, min(n, cut)), refs["train"][:, :, :min(n, cut)])}
        if n > cut:
            parts["heldout"] = (slice(cut, n), refs["heldout"][:, :, :n - cut])
        for part, (where, ref) in parts.items():
            for sub, img in (("pred", pred[:, :, where]), ("ref", ref)):
                (base / part / sub).mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(img, str(base / part / sub / "abdomen.nii.gz"))
            evaluate_folders(base / part / "ref", base / part / "pred", labels, output=base / part / "summary.json",
                             show_progress=False)
            rows[f"full_n{n}_{part}"] = dice_row(base / part / "summary.json")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--name", required=True, help="configuration (folder) name of this probe")
    ap.add_argument("--pretrained", default="realct",
                    help="pretrained model; NAME_random_init makes the random-init control of NAME first")
    ap.add_argument("--extractor", default="denoiser", help="denoiser or input (the no-backbone control)")
    ap.add_argument("--override", nargs="*", default=[], help="probe settings, e.g. lr=0.005 steps=2000")
    ap.add_argument("--lengths", type=int, nargs="*", default=[14, 16, 18, 20])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timesteps", type=int, nargs="*", default=None,
                    help="feature timesteps of the probe (default: the plans', e.g. 10 30 60)")
    ap.add_argument("--score_only", action="store_true", help="score the trained configuration --name again "
                    "(with --tta / --precision) instead of training it")
    ap.add_argument("--tta", type=int, default=0, help="predict with the noise ensemble of this many draws")
    ap.add_argument("--precision", default="fp32", help="fp32 or bf16 (predict -precision)")
    ap.add_argument("--no_postprocessing", action="store_true",
                    help="score the cut images' plain argmax (predict -npp; the fit row is before postprocessing "
                         "either way)")
    args = ap.parse_args()
    work = args.work.resolve()
    use_work_roots(work)
    from diffprobe.evaluation.evaluate import evaluate_folders
    from diffprobe.predict.predictor import predict
    from diffprobe.workflows.train_probe import train_probe

    if args.pretrained.endswith("_random_init") and not (work / "results" / "pretrained" / args.pretrained).is_dir():
        from diffprobe.pretraining.baseline import make_random_init_model

        make_random_init_model(args.pretrained[: -len("_random_init")], args.pretrained)
    overrides = dict(o.split("=", 1) for o in args.override)
    overrides = {k: _value(v) for k, v in overrides.items()}
    started = time.perf_counter()
    cpu0 = os.times()
    raw = work / "raw" / DATASET
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    import SimpleITK as sitk

    from diffprobe import paths

    cut = sitk.ReadImage(str(raw / "labelsTr" / "abdomen.nii.gz")).GetSize()[2]  # slices of the training slab
    rows: dict = {}
    if not args.score_only:
        train_probe(DATASET, "all", args.pretrained, overrides=overrides, configuration=args.name,
                    extractor=args.extractor, seed=args.seed, timesteps=args.timesteps,
                    show_progress=False)
    folder = paths.results_root() / DATASET / paths.SUBFOLDER / args.name / "fold_all"
    if args.score_only and not (folder / "checkpoint_final.pt").is_file():
        sys.exit(f"--score_only: configuration {args.name} is not trained in {work}")
    train_seconds = time.perf_counter() - started
    # also for a probe trained elsewhere (ablate controls, diffprobe train): its own final validation
    if (folder / "validation" / "summary.json").is_file():
        rows["fit"] = dice_row(folder / "validation" / "summary.json")
    alone = work / "pred_alone" / args.name
    predict(raw / "imagesTs", alone, DATASET, args.name, ["all"], "cpu", show_progress=False)
    evaluate_folders(raw / "labelsTs", alone, labels, output=alone / "summary.json", show_progress=False)
    rows["heldout_alone"] = dice_row(alone / "summary.json")
    rows |= score_cut_images(work, args.name, cut, args.lengths, labels, args.tta, args.precision,
                             not args.no_postprocessing)
    cpu1 = os.times()
    line = {"name": args.name, "pretrained": args.pretrained, "extractor": args.extractor, "overrides": overrides,
            "timesteps": args.timesteps, "score_only": args.score_only, "tta": args.tta, "precision": args.precision,
            "postprocessing": not args.no_postprocessing,
            "seed": args.seed, "train_seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1),
            "load_average": round(os.getloadavg()[0], 2), "rows": rows}
    with open(work / "real_ct_probes.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"{'row':<20}{'mean':>7}  per organ")
    for name, row in rows.items():
        if not isinstance(row, dict):
            continue
        print(f"{name:<20}{row['mean']:>7.3f}  " + " ".join(f"{k[:6]}={v:.2f}" for k, v in row.items() if k != "mean"))


if __name__ == "__main__":
    main()
