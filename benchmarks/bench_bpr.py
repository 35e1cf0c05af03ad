"""BPR quality at CPU budget: train only the BPR stage, then judge its coordinate maps per scan.

Two datasets, each planned with the given size class:

- ``real``: the shared real CTs (``benchmarks/real_ct.py:make_dataset``: the labelled abdomen slab
  without its held-out slices + three unlabelled scans), target spacing 3 x 1.5 x 1.5 mm as in
  the issue's real-CT command;
- ``phantoms``: the default demo phantoms (8 labelled + 4 unlabelled, fov 110 mm, portal venous).

For each: ``pretrain(stage="bpr")`` with the planned (or given) steps, CPU time measured, then the
maps of every training volume (``write_bpr_maps``, as pretrain computes them for diffusion) and
the reports pretrain writes next to them (``bpr_consistency.json``, ``bpr_quality.json``,
``bpr_profiles.png``, ``bpr_figures/``). Prints Spearman rho of the CC coordinate per scan, the
tile disagreement and the organ-centroid consistency ratio (phantoms) with its rigid bound.

    python benchmarks/bench_bpr.py --work /tmp/bench_bpr                      # tiny, both datasets
    python benchmarks/bench_bpr.py --work /tmp/bench_bpr --size_class cpu --datasets real
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATASETS = {"real": 10, "phantoms": 1}


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def prepare(kind: str, base: Path, size_class: str) -> None:
    from diffprobe.paths import roots_at
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess

    with roots_at(base) as roots:
        if kind == "real":
            from real_ct import make_dataset

            make_dataset(roots["raw"], holdout_slices=6)
            overrides = ["preprocessing.target_spacing=[3.0,1.5,1.5]"]
        else:
            from diffprobe.phantoms import PhantomConfig, make_phantom_dataset

            raw = roots["raw"] / "Dataset001_Phantoms"
            if not (raw / "dataset.json").is_file():
                make_phantom_dataset(raw, PhantomConfig(num_train_labelled=8, num_train_unlabelled=4, num_test=4,
                                                        fov_mm=110.0, phase="portal_venous"))
            overrides = None
        plan_and_preprocess(DATASETS[kind], num_processes=1, show_progress=False,
                            plan_kwargs={"size_class": size_class}, overrides=overrides)


def run(kind: str, base: Path, name: str, steps: int | None, lr: float | None, seed: int) -> dict:
    import torch

    from diffprobe.paths import roots_at
    from diffprobe.pretraining.bpr_maps import write_bpr_maps
    from diffprobe.pretraining.pretrain import _write_bpr_consistency, collect_volumes, pretrain
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    with roots_at(base):
        model = PretrainedModel(name)
        if model.folder.exists():
            shutil.rmtree(model.folder)
        overrides = {"num_workers": 0, "bpr_steps": steps, "bpr_lr": lr}
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        pretrain([str(DATASETS[kind])], name=name, stage="bpr", device="cpu", overrides=overrides, seed=seed,
                 show_progress=False)
        cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
        volumes, plans, _ = collect_volumes([str(DATASETS[kind])])
        bpr, crop = model.load_bpr("cpu")
        t0 = time.perf_counter()
        volumes = write_bpr_maps(bpr, volumes, crop, model.folder, torch.device("cpu"))
        infer = time.perf_counter() - t0
        consistency = _write_bpr_consistency(volumes, model.folder)
        quality = json.loads((model.folder / "bpr_quality.json").read_text())
    bpr_plans = plans["training"]["bpr"]
    return {"dataset": kind, "size_class": plans["size_class"], "steps": steps or bpr_plans["steps"],
            "lr": lr or bpr_plans["lr"], "width": bpr_plans["width"], "crop": crop, "seed": seed,
            "bpr_cpu_seconds": round(cpu, 1), "bpr_wall_seconds": round(wall, 1),
            "maps_wall_seconds": round(infer, 1), "threads": torch.get_num_threads(),
            "folder": str(model.folder), "quality": quality["scans"], "summary": quality["summary"],
            "consistency": {k: {kk: vv for kk, vv in v.items() if kk != "organs"} for k, v in consistency.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--datasets", nargs="+", default=["real", "phantoms"], choices=list(DATASETS))
    ap.add_argument("--size_class", default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="BPR steps (default: as planned for the size class)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small convolutions, busy machine)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.datasets:
        base = args.work.resolve() / f"{kind}_{args.size_class}"
        prepare(kind, base, args.size_class)
        for seed in args.seeds:
            row = run(kind, base, f"bpr_{args.size_class}_s{seed}", args.steps, args.lr, seed)
            rows.append(row)
            print(f"\n{kind} ({row['size_class']}, {row['steps']} steps, lr {row['lr']}, crop {row['crop']}, "
                  f"seed {seed}): BPR {row['bpr_cpu_seconds']} CPU s ({row['bpr_wall_seconds']} s wall, "
                  f"{row['threads']} thread(s)); maps {row['maps_wall_seconds']} s")
            print(f"  {'scan':<34}{'rho CC':>8}{'slope LR/AP/CC':>20}{'tile mm LR/AP/CC':>22}")
            for scan, q in row["quality"].items():
                tiles = q.get("tile_disagreement_mm")
                tile_txt = "/".join(f"{v:.0f}" for v in tiles.values()) if tiles else "one tile"
                print(f"  {scan:<34}{q['spearman_cc']:>8.3f}{'/'.join(f'{v:.2f}' for v in q['slope'].values()):>20}"
                      f"{tile_txt:>22}")
            for ds, c in row["consistency"].items():
                if c.get("ratio") is not None:
                    print(f"  consistency {ds}: ratio {c['ratio']:.3f} (BPR {c['bpr_mm']:.1f} mm vs array "
                          f"{c['array_mm']:.1f} mm; per axis BPR {_fmt(c['bpr_mm_axes'])} array "
                          f"{_fmt(c['array_mm_axes'])}); rigid bound {c['rigid_bound_ratio']:.3f}")
    out = args.work / f"bench_bpr_{args.size_class}.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwritten {out}")


def _fmt(d: dict) -> str:
    return "/".join(f"{v:.1f}" for v in d.values())


if __name__ == "__main__":
    main()
