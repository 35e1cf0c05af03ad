"""What the frozen features of the labelled real-CT slab carry: organ identity, noise, placement.

The controls of ``real_ct_probe.py`` say a frozen *random* denoiser transfers as well as or better
than the pretrained one. This script measures three properties of the features a probe reads, per
decoder level and feature timestep, for each model named (the pretrained one and its random-init
control, same architecture, same inputs), on the training slab of ``benchmarks/real_ct.py``'s dataset:

- ``noise_share``: the feature variance that comes from the noise draw, as a fraction of the total
  (two independent noise draws a, b of every tile: mean over channels of var(a - b) / 2 divided by the
  variance over voxels). The probe sees one draw; a high share means its input is mostly noise.
- ``ncm_accuracy``: organ identity read by the simplest probe: channels z-scored, a mean per class
  (background and the 8 organs) computed on draw a, each voxel of draw b given the class of the nearest
  mean; balanced accuracy over the classes present (chance = 1 / classes). Level features are compared
  with the label subsampled at the level's stride. The same on the inputs alone (image + BPR coordinates,
  what the no-backbone control reads) is printed for reference.
- ``placement_change``: the slab (9 slices at 3 mm) is thinner than the patch (24); features of the same
  voxels with the slab at the top and as low in the patch as the coarsest level's stride allows, same
  noise: ||f_top - f_low|| / ||f_top||. A probe trained on one placement meets the others in every scan.

    python benchmarks/real_ct_feature_noise.py --work /tmp/realct2 --models realct realct_random_init

Appends one JSON line per model to ``<work>/real_ct_feature_noise.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import DATASET, use_work_roots  # noqa: E402

TRAIN_CASE = "abdomen"


def tiles_yx(shape: tuple[int, int], patch: tuple[int, int]) -> list[tuple[int, int]]:
    """Non-overlapping (y, x) tile starts of a grid ``shape`` that is a multiple of ``patch``."""
    return [(y, x) for y in range(0, shape[0], patch[0]) for x in range(0, shape[1], patch[1])]


def slab_features(extractor, data: np.ndarray, guide: np.ndarray, patch: list[int], z_at: int,
                  draw: int) -> dict[str, np.ndarray]:
    """Features ``{dec{l}: (T*C, z_l, y_l, x_l)}`` of the whole slab, placed at ``z_at`` in the patch."""
    from diffprobe.probe.features import inference_seed

    nz, ny, nx = data.shape[1:]
    py, px = -(-ny // patch[1]) * patch[1], -(-nx // patch[2]) * patch[2]  # whole tiles
    vol = np.full((data.shape[0], patch[0], py, px), -1.0, dtype=np.float32)
    vol[:, z_at:z_at + nz, :ny, :nx] = data
    gv = np.zeros((guide.shape[0], patch[0], py, px), dtype=np.float32)
    gv[:, z_at:z_at + nz, :ny, :nx] = guide
    gv[:, :z_at] = gv[:, z_at:z_at + 1]  # the sliding window repeats the edge coordinates (read_region)
    gv[:, z_at + nz:] = gv[:, z_at + nz - 1:z_at + nz]
    out: dict[str, np.ndarray] = {}
    strides = extractor.feature_strides
    for y, x in tiles_yx((py, px), (patch[1], patch[2])):
        x0 = torch.from_numpy(vol[None, :, :, y:y + patch[1], x:x + patch[2]])
        g = torch.from_numpy(gv[None, :, :, y:y + patch[1], x:x + patch[2]])
        with torch.inference_mode():
            feats = extractor(x0, g, [inference_seed((0, y, x), draw)])
        for key, f in feats.items():
            sz, sy, sx = strides[key]
            if key not in out:
                out[key] = np.zeros((f.shape[1], patch[0] // sz, py // sy, px // sx), dtype=np.float32)
            out[key][:, :, y // sy:(y + patch[1]) // sy, x // sx:(x + patch[2]) // sx] = f[0].numpy()
    return {k: v[:, z_at // strides[k][0]:(z_at + nz) // strides[k][0], :ny // strides[k][1], :nx // strides[k][2]]
            for k, v in out.items()}


def ncm_accuracy(a: np.ndarray, b: np.ndarray, seg: np.ndarray) -> float:
    """Balanced accuracy of nearest-class-mean on draw ``b`` with means from draw ``a`` (C, voxels)."""
    mu, sd = a.mean(1, keepdims=True), a.std(1, keepdims=True) + 1e-6
    za, zb = (a - mu) / sd, (b - mu) / sd
    classes = [c for c in np.unique(seg) if (seg == c).sum() >= 5]
    means = np.stack([za[:, seg == c].mean(1) for c in classes])  # (K, C)
    d = (zb ** 2).sum(0)[None] - 2 * means @ zb + (means ** 2).sum(1)[:, None]
    pred = np.asarray(classes)[d.argmin(0)]
    return float(np.mean([(pred[seg == c] == c).mean() for c in classes]))


def measure(model_name: str, work: Path, timesteps: list[int] | None = None) -> dict:
    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.preprocessing.storage import case_paths, open_array
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.features import FeatureExtractor
    from diffprobe.workflows.train_probe import dataset_volumes

    model = PretrainedModel(model_name)
    refs, _, data_dir = dataset_volumes(DATASET, model, "cpu")
    ref = next(r for r in refs if r.identifier == TRAIN_CASE)
    data = np.asarray(open_array(ref.data_path)[...], dtype=np.float32)
    seg = np.asarray(open_array(case_paths(data_dir, TRAIN_CASE)["seg"])[...])[0]
    guide = np.asarray(open_array(ref.guidance_path)[...], dtype=np.float32)
    patch = list(model.plans.patch_size)
    timesteps = [int(t) for t in (timesteps or model.plans.feature_timesteps)]
    extractor = FeatureExtractor(model.load_denoiser("cpu"), GaussianDiffusion.from_plans(model.plans.raw),
                                 timesteps).eval()
    zs = extractor.denoiser.total_stride[0]
    bottom = (patch[0] - data.shape[1]) // zs * zs  # as low as the coarsest level's grid allows
    started = time.perf_counter()
    fa = slab_features(extractor, data, guide, patch, 0, draw=0)
    fb = slab_features(extractor, data, guide, patch, 0, draw=1)
    fc = slab_features(extractor, data, guide, patch, bottom, draw=0)
    rows = []
    for key in sorted(fa, key=lambda k: int(k[3:])):
        st = extractor.feature_strides[key]
        s = seg[::st[0], ::st[1], ::st[2]][:fa[key].shape[1], :fa[key].shape[2], :fa[key].shape[3]].reshape(-1)
        c = fa[key].shape[0] // len(timesteps)
        for j, t in enumerate(timesteps):
            a = fa[key][j * c:(j + 1) * c].reshape(c, -1)
            b = fb[key][j * c:(j + 1) * c].reshape(c, -1)
            p = fc[key][j * c:(j + 1) * c].reshape(c, -1)
            total = float(np.concatenate([a, b], 1).var(1).mean())
            noise = float(((a - b) ** 2).mean(1).mean() / 2)
            rows.append({"level": key, "t": t, "noise_share": round(noise / total, 3),
                         "ncm_accuracy": round(ncm_accuracy(a, b, s), 3),
                         "placement_change": round(float(np.linalg.norm(a - p) / np.linalg.norm(a)), 3)})
    inputs = np.concatenate([data, guide]).reshape(1 + guide.shape[0], -1)  # image + BPR coordinates
    return {"model": model_name, "timesteps": timesteps,
            "input_ncm_accuracy": round(ncm_accuracy(inputs, inputs, seg.reshape(-1)), 3),
            "seconds": round(time.perf_counter() - started, 1),
            "patch": patch, "slab_shape": list(data.shape[1:]), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of benchmarks/real_ct.py")
    ap.add_argument("--models", nargs="+", default=["realct", "realct_random_init"])
    ap.add_argument("--timesteps", type=int, nargs="*", default=None, help="default: the plans' (10 30 60)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    use_work_roots(work)
    results = [measure(m, work, args.timesteps) for m in args.models]
    with open(work / "real_ct_feature_noise.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print("nearest class mean on the inputs alone (image + BPR coordinates, full resolution): "
          + ", ".join(f"{r['model']} {r['input_ncm_accuracy']:.3f}" for r in results))
    print(f"{'level':<6}{'t':>4}  " + "  ".join(f"{r['model'][:24]:>24}" for r in results))
    print(f"{'':<10}  " + "  ".join(f"{'noise  ncm   placement':>24}" for _ in results))
    for i, row in enumerate(results[0]["rows"]):
        cells = [r["rows"][i] for r in results]
        print(f"{row['level']:<6}{row['t']:>4}  " + "  ".join(
            f"{c['noise_share']:>8.3f}{c['ncm_accuracy']:>7.3f}{c['placement_change']:>9.3f}" for c in cells))


if __name__ == "__main__":
    main()
