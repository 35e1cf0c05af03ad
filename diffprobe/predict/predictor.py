"""``diffprobe predict``: raw images -> label maps in each input's exact original geometry.

Per case: integrity check and canonical orientation, preprocessing as planned (crop,
resample, normalise), the guidance channels once per volume (BPR coordinates computed on
the whole volume, then cropped per tile by the sliding window), Gaussian-weighted sliding
window of the probe(s) with logits accumulated on the device (per-tile features are never
kept), folds averaged, argmax on the preprocessed grid, then resampling of the *label map*
(nnU-Net's one-hot linear label resampling, so no full-resolution multi-class logits are
ever resampled on the CPU), crop undone and canonical orientation undone. Outputs are
written atomically, so ``--continue_prediction`` can trust every file it finds.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from diffprobe import paths
from diffprobe.dataset.cases import Case
from diffprobe.dataset.dataset_json import DatasetInfo
from diffprobe.dataset.integrity import check_case
from diffprobe.errors import DiffprobeError
from diffprobe.io.image_io import SUPPORTED_ENDINGS, file_ending, write_image
from diffprobe.parallel import progress_bar
from diffprobe.predict.memory import available_bytes, estimate_for_input
from diffprobe.predict.sliding_window import sliding_window_logits
from diffprobe.preprocessing.preprocess import preprocess_checked, revert_to_original
from diffprobe.pretraining.data import VolumeRef, physical_guidance
from diffprobe.pretraining.pretrain import resolve_device
from diffprobe.probe.features import patch_seed
from diffprobe.probe.model import TrainedProbe, load_trained_probe
from diffprobe.utils import atomic_path

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


# ---- finding models -----------------------------------------------------------------------
def trained_configurations(dataset: str | int | None = None) -> dict[tuple[str, str], list[str]]:
    """{(dataset folder name, configuration): [finished folds]} under the results root."""
    root = paths.results_root()
    names = [paths.dataset_name(dataset)] if dataset is not None else \
        sorted(p.name for p in root.glob("Dataset*") if p.is_dir()) if root.is_dir() else []
    found: dict[tuple[str, str], list[str]] = {}
    for name in names:
        base = root / name / paths.SUBFOLDER
        for ckpt in sorted(base.glob("*/fold_*/checkpoint_final.pt")):
            fold_dir = ckpt.parent
            if (fold_dir / "probe.json").is_file():
                found.setdefault((name, fold_dir.parent.name), []).append(fold_dir.name[len("fold_"):])
    return found


def select_model(dataset: str | int | None, configuration: str | None,
                 folds: list[str] | None) -> list[Path]:
    """Fold folders to predict with; the short form (no -d) works when exactly one model exists."""
    found = trained_configurations(dataset)
    if configuration is not None:
        found = {k: v for k, v in found.items() if k[1] == configuration}
    if len(found) != 1:
        listing = "\n".join(f"      -d {d} -c {c}  (folds {', '.join(f)})" for (d, c), f in sorted(found.items()))
        what = "no trained probe found" if not found else f"{len(found)} trained probes found:\n{listing}\n   "
        raise DiffprobeError(what, paths.results_root(),
                             "train one with `diffprobe train -d ID -f FOLD`" if not found
                             else "choose one with -d and -c")
    (name, config), available = next(iter(found.items()))
    folds = folds or available
    missing = [f for f in folds if f not in available]
    if missing:
        raise DiffprobeError(f"fold(s) {', '.join(missing)} of {config} are not trained (available: "
                             f"{', '.join(available)})", paths.results_root() / name / paths.SUBFOLDER / config,
                             "train them first or choose existing folds with -f")
    return [paths.results_root() / name / paths.SUBFOLDER / config / f"fold_{f}" for f in folds]


# ---- finding inputs -----------------------------------------------------------------------
def _strip_ending(name: str) -> tuple[str, str] | None:
    for ending in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if name.endswith(ending):
            return name[: -len(ending)], ending
    return None


def input_cases(inputs: Path, num_channels: int) -> list[Case]:
    """Cases from a folder of ``<case>_XXXX`` images, one image file, or one DICOM series folder."""
    inputs = Path(inputs)
    if not inputs.exists():
        raise DiffprobeError("input does not exist", inputs, "pass an image, a DICOM folder or a folder of images")
    if inputs.is_file():
        split = _strip_ending(inputs.name)
        if split is None:
            raise DiffprobeError("unsupported image format", inputs, f"use one of {', '.join(SUPPORTED_ENDINGS)}")
        m = _CHANNEL_RE.match(split[0])
        return [Case(m.group("case") if m else split[0], [inputs], None, "test")]
    channels: dict[str, dict[int, Path]] = {}
    for f in sorted(inputs.iterdir()):
        split = _strip_ending(f.name) if f.is_file() and not f.name.startswith(".") else None
        m = _CHANNEL_RE.match(split[0]) if split else None
        if m:
            channels.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    if not channels:  # a DICOM series folder (read_sitk reports a folder without a series)
        # abspath, not resolve: "-i ." gets the folder's name (not ""), a symlink keeps its own name
        return [Case(Path(os.path.abspath(inputs)).name, [inputs], None, "test")]
    cases = []
    for ident, found in sorted(channels.items()):
        missing = [c for c in range(num_channels) if c not in found]
        if missing:
            raise DiffprobeError(f"case '{ident}' lacks channel {missing[0]:04d}", inputs,
                                 f"add {ident}_{missing[0]:04d} or remove the case's files")
        cases.append(Case(ident, [found[c] for c in range(num_channels)], None, "test"))
    return cases


# Detached-header formats are two files, and the atomic rename moves only the header (whose data file
# keeps its temporary name): their segmentations are written in the single-file equivalent.
_SINGLE_FILE_ENDING = {".mhd": ".mha", ".nhdr": ".nrrd"}


def output_name(case: Case) -> str:
    src = case.images[0]
    ending = file_ending(src) if src.is_file() else ".nii.gz"
    return case.identifier + _SINGLE_FILE_ENDING.get(ending, ending)


# ---- the prediction itself ------------------------------------------------------------------
def volume_guidance(probe: TrainedProbe, data: np.ndarray, identifier: str,
                    spacing: list[float], device: torch.device) -> torch.Tensor | None:
    """Guidance channels (3, z, y, x) for the whole preprocessed volume, as in training."""
    mode = probe.meta["guidance"]
    shape = data.shape[1:]
    if mode == "bpr":
        from diffprobe.bpr import predict_coordinates

        return predict_coordinates(probe.bpr, data, tuple(probe.bpr_crop)).to(device)
    if mode == "physical":
        ref = VolumeRef(Path(), identifier, tuple(shape), tuple(spacing))
        return torch.from_numpy(physical_guidance(ref, np.zeros(3, dtype=int), tuple(shape))).to(device)
    if mode == "random":
        rng = np.random.default_rng(zlib.crc32(identifier.encode()))
        return torch.from_numpy(rng.uniform(-1, 1, size=(3, *shape)).astype(np.float32)).to(device)
    return None


@torch.no_grad()
def predict_logits(probes: list[TrainedProbe], data: np.ndarray, identifier: str, spacing: list[float],
                   device: torch.device, step_size: float = 0.5, tta: bool = False, batch_size: int = 2,
                   progress=None) -> torch.Tensor:
    """Mean sliding-window logits (K, z, y, x) of the probes on a preprocessed volume."""
    volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    total = None
    guidance_cache: dict[str, torch.Tensor | None] = {}
    for probe in probes:
        key = probe.meta["pretrained"]
        if key not in guidance_cache:
            guidance_cache[key] = volume_guidance(probe, data, identifier, spacing, device)

        def predict_patch(tiles, gtiles, starts, probe=probe):
            return probe.model(tiles, gtiles, [patch_seed(identifier, s) for s in starts]).float()

        logits = sliding_window_logits(
            volume, guidance_cache[key], predict_patch, probe.num_classes, probe.patch_size, step_size=step_size,
            batch_size=batch_size, mirror_axes=(0, 1, 2) if tta else (), device=device,
            accumulate_dtype=torch.float16 if device.type == "cuda" else torch.float32, progress=progress)
        total = logits if total is None else total.add_(logits)
        del logits
    return total.div_(len(probes)) if len(probes) > 1 else total  # in place: no second K x volume copy


def label_map(logits: torch.Tensor, slab: int = 16) -> np.ndarray:
    """``argmax`` over classes as uint8, slab by slab along z.

    ``logits.argmax(0)`` on a whole CT would allocate an int64 volume (8 bytes a voxel, ~0.6 GB for
    75 M voxels) only to narrow it to uint8; slabs keep that transient at ``slab`` slices.
    """
    out = np.empty(logits.shape[1:], dtype=np.uint8)
    for z in range(0, logits.shape[1], slab):
        out[z:z + slab] = logits[:, z:z + slab].argmax(0).to(torch.uint8).cpu().numpy()
    return out


def predict_case(probes: list[TrainedProbe], case: Case, out_path: Path, device: torch.device,
                 step_size: float = 0.5, tta: bool = False, save_probabilities: bool = False,
                 progress=None) -> Path:
    meta = probes[0].meta
    plans = meta["plans"]
    info = DatasetInfo(case.images[0].parent, meta["dataset"], {int(k): v for k, v in plans["channel_names"].items()},
                       plans["labels"], 0, file_ending(case.images[0]) if case.images[0].is_file() else ".nii.gz", {})
    checked, problems = check_case(case, info)
    if checked is None:
        raise DiffprobeError(problems[0].what, problems[0].file, problems[0].fix)
    data, _, props = preprocess_checked(checked, info, plans)
    del checked  # the raw-resolution float32 image is not needed past preprocessing
    logits = predict_logits(probes, data, case.identifier, plans["preprocessing"]["target_spacing"], device,
                            step_size, tta, progress=progress)
    del data
    seg = label_map(logits)
    if not save_probabilities:
        del logits  # the label map is all that is resampled back; free K x volume first
    seg_raw, geometry = revert_to_original(seg, props, is_seg=True, resampling=plans["preprocessing"]["resampling"])
    if save_probabilities:
        probs = torch.softmax(logits.float(), 0).cpu().numpy()
        raw = [revert_to_original(p, props, is_seg=False, fill_value=float(k == 0),
                                  resampling=plans["preprocessing"]["resampling"])[0] for k, p in enumerate(probs)]
        npz = out_path.parent / f"{case.identifier}.npz"
        with atomic_path(npz, ".npz") as tmp:
            np.savez_compressed(tmp, probabilities=np.stack(raw).astype(np.float16))
    write_image(seg_raw.astype(np.uint8), geometry, out_path)
    return out_path


def _refuse_if_too_large(case: Case, meta: dict, num_probes: int, save_probabilities: bool) -> None:
    """Refuse, before reading the pixels, a case whose RAM bound exceeds what the OS can give.

    Being OOM-killed half-way through a long ensemble is the worst outcome on a shared node:
    no message, nothing written. Unreadable headers are left to the integrity check's message.
    """
    try:
        need = estimate_for_input(case.images[0], meta, num_probes, save_probabilities)
    except Exception:  # noqa: BLE001 - corrupt or unsupported header: check_case reports it properly
        return
    have = available_bytes()
    if have is not None and need.total_bytes > have:
        raise DiffprobeError(
            f"predicting this image needs about {need.total_gb:.1f} GB of RAM ({need.describe()}; "
            f"{need.raw_voxels / 1e6:.1f} M voxels), but only {have / 1e9:.1f} GB are available",
            case.images[0], "free memory or run on a machine with more RAM; drop --save_probabilities or "
            "ensemble fewer folds (-f) to lower the need; if a cluster job's limit is misread, set "
            "DIFFPROBE_MEMORY_LIMIT_GB")


def predict(inputs: str | Path, output: str | Path, dataset: str | int | None = None,
            configuration: str | None = None, folds: list[str] | None = None, device: str = "auto",
            step_size: float = 0.5, tta: bool = False, save_probabilities: bool = False,
            continue_prediction: bool = False, num_parts: int = 1, part_id: int = 0,
            show_progress: bool = True) -> list[Path]:
    """Predict every input case (this part of them); returns the written segmentation files."""
    if not 0 <= part_id < num_parts:
        raise DiffprobeError(f"-part_id {part_id} must be in [0, {num_parts - 1}]", fix="use 0 <= part_id < num_parts")
    if not 0 < step_size <= 1:
        raise DiffprobeError(f"-step_size {step_size} must be in (0, 1]", fix="use e.g. 0.5 (nnU-Net's default)")
    dev = torch.device(resolve_device(device))
    fold_dirs = select_model(dataset, configuration, folds)
    probes = [load_trained_probe(d, dev) for d in fold_dirs]
    plans = probes[0].meta["plans"]
    cases = input_cases(Path(inputs), len(plans["channel_names"]))[part_id::num_parts]
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffprobeError(f"cannot create the output folder ({e.strerror})", output,
                             "choose a writable output folder with -o") from None
    written = []
    with progress_bar() as bar:
        task = bar.add_task("predict", total=len(cases), visible=show_progress)
        for case in cases:
            out_path = output / output_name(case)
            done = out_path.is_file() and (not save_probabilities or (output / f"{case.identifier}.npz").is_file())
            if continue_prediction and done:
                written.append(out_path)
                bar.advance(task)
                continue
            _refuse_if_too_large(case, probes[0].meta, len(probes), save_probabilities)
            bar.update(task, description=f"predict {case.identifier}")
            tiles = bar.add_task(f"  tiles of {case.identifier}", total=None, visible=show_progress)

            def progress(done: int, total: int, tiles=tiles) -> None:
                bar.update(tiles, completed=done, total=total)

            written.append(predict_case(probes, case, out_path, dev, step_size, tta, save_probabilities, progress))
            bar.remove_task(tiles)
            bar.advance(task)
    return written
