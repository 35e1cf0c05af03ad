"""The GPU suite's model set-up, CT-like volume, agreement and predict sections (``gpu_suite.py``)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from gpu_suite_common import DATASET_ID, PREDICT_GOAL_S, PRETRAINED, diff_stats, sync


def phantom_config(dry_run: bool):
    """The suite's phantom dataset. GPU: CT spacing (0.8 mm in-plane, 1.5 mm slices) and volumes larger
    than the paper patch (32x128x128) after the body crop, so the planned patch is not capped by the
    data; dry run: the tests' tiny phantoms."""
    from diffprobe.phantoms import PhantomConfig

    if dry_run:
        return PhantomConfig(num_train_labelled=2, num_train_unlabelled=1, num_test=1, fov_mm=60,
                             spacing_inplane=(1.0, 1.3), spacing_slice=(2.0, 3.0), scan_length_mm=(50, 70))
    return PhantomConfig(num_train_labelled=2, num_train_unlabelled=1, num_test=1, fov_mm=200,
                         spacing_inplane=(0.8, 0.8), spacing_slice=(1.5, 1.5), scan_length_mm=(66, 66))


def setup_model(args: argparse.Namespace, config=None, dataset_id: int = DATASET_ID) -> dict:
    """Phantoms (``config``, default :func:`phantom_config`) -> plan_and_preprocess (``args.size_class``) ->
    pretrain -> probe, each for ``args.setup_steps`` steps, in the data roots the caller set."""
    from diffprobe.phantoms import make_phantom_dataset
    from diffprobe.pretraining.pretrain import pretrain
    from diffprobe.probe.model import configuration_name, probe_dir
    from diffprobe.utils import read_json
    from diffprobe.workflows.plan_and_preprocess import plan_and_preprocess
    from diffprobe.workflows.train_probe import train_probe

    name, roots = f"Dataset{dataset_id:03d}_GpuSuite", args.workdir / "roots"
    for old in (roots / "raw" / name, roots / "preprocessed" / name, roots / "results" / name,
                roots / "results" / "pretrained" / PRETRAINED):  # this set-up's folders only
        shutil.rmtree(old, ignore_errors=True)
    raw = roots / "raw" / name
    times = {}
    t0 = time.perf_counter()
    make_phantom_dataset(raw, config or phantom_config(args.dry_run))
    times["phantoms_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan_and_preprocess(dataset_id, num_processes=2, show_progress=False, plan_kwargs={"size_class": args.size_class})
    times["plan_and_preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = args.setup_steps
    pretrain([str(dataset_id)], name=PRETRAINED, device=args.device, show_progress=False,
             overrides={"bpr_steps": steps, "diffusion_steps": steps, "num_workers": 0})
    times["pretrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a near-initial head (low lr, as the tests' fixture): label maps with several classes, so that the
    # agreement check compares decisions, not two all-background maps
    train_probe(dataset_id, "all", PRETRAINED, device=args.device, show_progress=False, final_validation=False,
                overrides={"steps": steps, "validate_every": 0, "lr": 1e-3, "warmup_steps": 0}, seed=9)
    times["train_probe_s"] = time.perf_counter() - t0
    folder = probe_dir(dataset_id, configuration_name(PRETRAINED, "fpn", False), "all")
    meta = read_json(folder / "probe.json")
    test = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0]
    return {"probe_folder": str(folder), "test_image": str(test), "size_class": args.size_class,
            "patch_size": meta["patch_size"], "timesteps": meta["timesteps"], "guidance": meta["guidance"],
            "num_classes": meta["num_classes"],
            "target_spacing": meta["plans"]["preprocessing"]["target_spacing"],
            **{k: round(v, 2) for k, v in times.items()}}


def ct_like_volume(shape_zyx: tuple[int, int, int], seed: int = 0):
    """A CT-like int16 HU volume (air, fat, soft tissue, organs, spine, lungs cranially), built slice-wise
    from a few 2D templates: seconds for 512x512x300, where the phantom generator takes minutes and GBs.
    Content only has to look like a body to the crop and the BPR; prediction time does not depend on it."""
    import numpy as np

    nz, ny, nx = shape_zyx
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, ny, dtype=np.float32), np.linspace(-1, 1, nx, dtype=np.float32),
                       indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    inner = (x / 0.75) ** 2 + (y / 0.55) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1
    lungs = (((np.abs(x) - 0.35) / 0.25) ** 2 + ((y + 0.05) / 0.35) ** 2 < 1) & inner
    liver = (((x + 0.35) / 0.3) ** 2 + ((y + 0.05) / 0.3) ** 2 < 1) & inner
    kidneys = (((np.abs(x) - 0.3) / 0.09) ** 2 + ((y - 0.25) / 0.12) ** 2 < 1)
    base = np.full((ny, nx), -1000, np.int16)
    base[body] = -100
    base[inner] = 40
    vol = np.empty(shape_zyx, np.int16)
    for k in range(nz):
        f = k / max(1, nz - 1)
        sl = base.copy()
        if f < 0.3:
            sl[lungs] = -850
        elif f < 0.6:
            sl[liver] = 60
        else:
            sl[kidneys] = 30
        sl[spine] = 700
        vol[k] = sl
    for k in range(0, nz, 16):  # noise in blocks of slices: float32 noise for 78 M voxels at once is 300 MB
        block = vol[k:k + 16]
        block += rng.normal(0, 12, block.shape).astype(np.int16)
    return vol


def write_volume(path: Path, vol, spacing_zyx: tuple[float, float, float]) -> Path:
    """Uncompressed NIfTI: gzip of a 150 MB volume would time the compressor, not the predictor."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=False)
    return path


# ---- sections ----------------------------------------------------------------------------------
def section_agreement(args: argparse.Namespace, setup: dict) -> dict:
    """CPU fp32 vs the device on fixed inputs: denoiser forward, probe logits, a small predict."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from diffprobe.predict.acceleration import InferenceSettings
    from diffprobe.predict.predictor import Predictor
    from diffprobe.probe.model import load_trained_probe

    folder = Path(setup["probe_folder"])
    cpu = load_trained_probe(folder, "cpu")
    dev = load_trained_probe(folder, args.device)
    patch, timesteps = tuple(setup["patch_size"]), setup["timesteps"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((1, 1, *patch), generator=g) * 2 - 1
    gch = cpu.model.extractor.denoiser.guidance_channels
    guide = torch.randn((1, gch, *patch), generator=g) if gch else None
    t = torch.tensor([timesteps[0]])
    out: dict[str, Any] = {"compared": f"cpu fp32 vs {args.device}",
                           "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                           "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    device_type = torch.device(args.device).type
    bf16 = device_type == "cuda"  # what predict's "auto" precision runs on this device

    def on(x):
        return None if x is None else x.to(args.device)

    with torch.no_grad():
        ref = cpu.model.extractor.denoiser(x0, t, guide)
        got = dev.model.extractor.denoiser(on(x0), on(t), on(guide))
        out["denoiser_fp32"] = diff_stats(ref, got)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            got = dev.model.extractor.denoiser(on(x0), on(t), on(guide))
        out["denoiser_autocast"] = {"dtype": "bf16" if bf16 else "fp32", **diff_stats(ref, got)}
        ref_logits = cpu.model(x0, guide, [0])
        got_logits = dev.model(on(x0), on(guide), [0])
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            got_auto = dev.model(on(x0), on(guide), [0])
        out["probe_logits_fp32"] = {**diff_stats(ref_logits, got_logits), "argmax_agreement": float(
            (ref_logits.argmax(1) == got_logits.argmax(1).cpu()).float().mean())}
        out["probe_logits_autocast"] = {**diff_stats(ref_logits, got_auto), "argmax_agreement": float(
            (ref_logits.argmax(1) == got_auto.argmax(1).cpu()).float().mean())}
    del cpu, dev

    # a small predict: the test phantom cut to one patch in-plane and 1.5 along z (two tiles: the window's
    # blending runs), so that the CPU side stays short on a GPU machine (paper class: ~0.5 TFLOP a forward)
    image = sitk.ReadImage(setup["test_image"])
    size = image.GetSize()  # x, y, z
    want = [min(s, int(f * p)) for s, p, f in zip(size, patch[::-1], (1, 1, 1.5))]
    lo = [(s - w) // 2 for s, w in zip(size, want)]
    small = sitk.RegionOfInterest(image, want, lo)
    inputs = args.workdir / "agreement_in"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    sitk.WriteImage(small, str(inputs / "small_0000.nii.gz"))
    labels, probs = {}, {}
    for name, device, settings in (("cpu", "cpu", InferenceSettings(precision="fp32", pipeline=False)),
                                   ("device", args.device, InferenceSettings())):
        predictor = Predictor.from_folders([folder], device, settings)
        t0 = time.perf_counter()
        out_dir = args.workdir / f"agreement_out_{name}"
        shutil.rmtree(out_dir, ignore_errors=True)
        written = predictor.predict_folder(inputs, out_dir, show_progress=False, save_probabilities=True)
        out[f"small_predict_{name}_s"] = round(time.perf_counter() - t0, 2)
        labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(written[0])))
        with np.load(out_dir / "small.npz") as z:
            probs[name] = z["probabilities"].astype(np.float32)
        del predictor
    a, b = labels["cpu"], labels["device"]
    top2 = np.sort(probs["cpu"], axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 0.05  # voxels where the CPU's decision is not a near-tie
    out["small_predict"] = {"shape_zyx": list(a.shape), "label_agreement": float(np.mean(a == b)),
                            "label_agreement_clear_voxels": float(np.mean((a == b)[clear])) if clear.any() else None,
                            "clear_fraction": float(clear.mean()),
                            "probabilities_max_abs_diff": float(np.abs(probs["cpu"] - probs["device"]).max()),
                            "classes_cpu": sorted(int(v) for v in np.unique(a)),
                            "classes_device": sorted(int(v) for v in np.unique(b))}
    return out


def section_predict(args: argparse.Namespace, setup: dict) -> dict:
    """Seconds of predict on a CT-sized volume with the size class's model (loaded and warmed up first)."""
    import torch

    from diffprobe.predict.predictor import Predictor

    shape = tuple(args.volume)
    spacing = (1.5, 0.8, 0.8)
    t0 = time.perf_counter()
    inputs = args.workdir / "predict_in"
    shutil.rmtree(inputs, ignore_errors=True)
    write_volume(inputs / "ct_0000.nii", ct_like_volume(shape), spacing)
    make_s = time.perf_counter() - t0
    predictor = Predictor.from_folders([Path(setup["probe_folder"])], args.device)
    # warm-up on the small agreement input: CUDA context, cuDNN plans for the tile shape
    warm = args.workdir / "agreement_in"
    if warm.is_dir():
        predictor.predict_folder(warm, args.workdir / "predict_warm", show_progress=False)
    runs = []
    for r in range(args.predict_repeats):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timings: list[dict] = []
        out_dir = args.workdir / f"predict_out_{r}"
        shutil.rmtree(out_dir, ignore_errors=True)
        t0 = time.perf_counter()
        predictor.predict_folder(inputs, out_dir, show_progress=False, timings=timings)
        sync(args.device)
        run = {"seconds": round(time.perf_counter() - t0, 2),
               "phases_s": {k: round(v, 2) for k, v in timings[0].items() if k.endswith("_s")}}
        if args.device.startswith("cuda"):
            run["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        runs.append(run)
        print(f"  run {r}: {run['seconds']:.1f} s {run['phases_s']}", flush=True)
    best = min(r["seconds"] for r in runs)
    return {"volume_zyx": list(shape), "spacing_zyx_mm": list(spacing), "size_class": setup["size_class"],
            "patch_size": setup["patch_size"], "make_volume_s": round(make_s, 2), "runs": runs, "best_s": best,
            "goal_s": PREDICT_GOAL_S, "goal_met": best <= PREDICT_GOAL_S}


