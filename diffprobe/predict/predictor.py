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

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffprobe.dataset.cases import Case
from diffprobe.dataset.dataset_json import DatasetInfo
from diffprobe.dataset.integrity import check_case
from diffprobe.devices import resolve_device
from diffprobe.errors import DiffprobeError
from diffprobe.guidance import volume_guidance as guidance_of_volume
from diffprobe.io.image_io import file_ending, write_image
from diffprobe.parallel import progress_bar
from diffprobe.predict.acceleration import InferenceSettings, autocast, memory_format, prepare_model
from diffprobe.predict.inputs import input_cases, output_name, select_model, trained_configurations  # noqa: F401
from diffprobe.predict.memory import MemoryEstimate, available_bytes, estimate_for_input
from diffprobe.predict.sliding_window import sliding_window_logits
from diffprobe.preprocessing.preprocess import preprocess_checked, revert_to_original
from diffprobe.probe.features import patch_seed
from diffprobe.probe.model import TrainedProbe, load_trained_probe
from diffprobe.utils import atomic_path


# ---- the prediction itself ------------------------------------------------------------------
def volume_guidance(probe: TrainedProbe, data: np.ndarray, identifier: str,
                    spacing: list[float], device: torch.device) -> torch.Tensor | None:
    """Guidance channels (G, z, y, x) for the whole preprocessed volume, as in training (``diffprobe.guidance``).

    ``identifier`` is not used: no guidance mode depends on the case's name.
    """
    guide = guidance_of_volume(probe.meta["guidance"], data, spacing, probe.bpr, probe.bpr_crop)
    return None if guide is None else guide.to(device)


@torch.no_grad()
def predict_logits(probes: list[TrainedProbe], data: np.ndarray, identifier: str, spacing: list[float],
                   device: torch.device, step_size: float = 0.5, tta: bool = False,
                   progress=None, settings: InferenceSettings | None = None,
                   timings: dict[str, float] | None = None) -> torch.Tensor:
    """Mean sliding-window logits (K, z, y, x) of the probes on a preprocessed volume.

    ``settings`` choose memory format, precision and tile batch (``prepare_model`` must have been
    applied to the probes' models for the memory format to pay off); ``timings`` collects the seconds
    spent on the guidance channels and in the window.
    """
    settings = settings or InferenceSettings()
    fmt = memory_format(settings)
    volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    total = None
    guidance_cache: dict[str, torch.Tensor | None] = {}
    for probe in probes:
        key = probe.meta["pretrained"]
        if key not in guidance_cache:
            started = time.perf_counter()
            guidance_cache[key] = volume_guidance(probe, data, identifier, spacing, device)
            _add(timings, "guidance_s", started)

        def predict_patch(tiles, gtiles, starts, probe=probe):
            tiles = tiles.contiguous(memory_format=fmt)
            gtiles = gtiles.contiguous(memory_format=fmt) if gtiles is not None else None
            with autocast(device, settings):
                return probe.model(tiles, gtiles, [patch_seed(identifier, s) for s in starts]).float()

        started = time.perf_counter()
        logits = sliding_window_logits(
            volume, guidance_cache[key], predict_patch, probe.num_classes, probe.patch_size, step_size=step_size,
            batch_size=settings.tile_batch, mirror_axes=(0, 1, 2) if tta else (), device=device,
            accumulate_dtype=torch.float16 if device.type == "cuda" else torch.float32, progress=progress)
        total = logits if total is None else total.add_(logits)
        del logits
        _add(timings, "window_s", started)
    return total.div_(len(probes)) if len(probes) > 1 else total  # in place: no second K x volume copy


def _add(timings: dict[str, float] | None, key: str, started: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def label_map(logits: torch.Tensor, slab: int = 16) -> np.ndarray:
    """``argmax`` over classes as uint8, slab by slab along z.

    ``logits.argmax(0)`` on a whole CT would allocate an int64 volume (8 bytes a voxel, ~0.6 GB for
    75 M voxels) only to narrow it to uint8; slabs keep that transient at ``slab`` slices.
    """
    out = np.empty(logits.shape[1:], dtype=np.uint8)
    for z in range(0, logits.shape[1], slab):
        out[z:z + slab] = logits[:, z:z + slab].argmax(0).to(torch.uint8).cpu().numpy()
    return out


@dataclass
class LoadedCase:
    """A case read, checked and preprocessed: what the sliding window needs, and what export needs."""

    case: Case
    data: np.ndarray
    props: dict


@dataclass
class WindowResult:
    """A case's label map on the planned grid (and its logits when probabilities are saved)."""

    case: Case
    seg: np.ndarray
    props: dict
    logits: torch.Tensor | None


def load_case(probes: list[TrainedProbe], case: Case, timings: dict[str, float] | None = None) -> LoadedCase:
    """Read, integrity-check and preprocess one input exactly as planned (no torch work: runs in a thread)."""
    started = time.perf_counter()
    meta = probes[0].meta
    plans = meta["plans"]
    info = DatasetInfo(case.images[0].parent, meta["dataset"], {int(k): v for k, v in plans["channel_names"].items()},
                       plans["labels"], 0, file_ending(case.images[0]) if case.images[0].is_file() else ".nii.gz", {})
    checked, problems = check_case(case, info)
    if checked is None:
        raise DiffprobeError(problems[0].what, problems[0].file, problems[0].fix)
    data, _, props = preprocess_checked(checked, info, plans)
    del checked  # the raw-resolution float32 image is not needed past preprocessing
    _add(timings, "preprocess_s", started)
    return LoadedCase(case, data, props)


def window_case(probes: list[TrainedProbe], loaded: LoadedCase, device: torch.device, step_size: float = 0.5,
                tta: bool = False, save_probabilities: bool = False, progress=None,
                settings: InferenceSettings | None = None, timings: dict[str, float] | None = None) -> WindowResult:
    """Sliding window, fold ensemble and argmax on the planned grid; frees the preprocessed volume."""
    plans = probes[0].meta["plans"]
    logits = predict_logits(probes, loaded.data, loaded.case.identifier, plans["preprocessing"]["target_spacing"],
                            device, step_size, tta, progress=progress, settings=settings, timings=timings)
    loaded.data = None  # the caller's LoadedCase no longer pins the preprocessed volume
    started = time.perf_counter()
    seg = label_map(logits)
    _add(timings, "argmax_s", started)
    if not save_probabilities:
        del logits  # the label map is all that is resampled back; free K x volume first
        logits = None
    return WindowResult(loaded.case, seg, loaded.props, logits)


def export_case(probes: list[TrainedProbe], result: WindowResult, out_path: Path,
                timings: dict[str, float] | None = None) -> Path:
    """Label map (and probabilities) back to the input's raw geometry, written atomically (runs in a thread)."""
    started = time.perf_counter()
    resampling = probes[0].meta["plans"]["preprocessing"]["resampling"]
    seg_raw, geometry = revert_to_original(result.seg, result.props, is_seg=True, resampling=resampling)
    if result.logits is not None:
        probs = torch.softmax(result.logits.float(), 0).cpu().numpy()
        result.logits = None
        raw = [revert_to_original(p, result.props, is_seg=False, fill_value=float(k == 0),
                                  resampling=resampling)[0] for k, p in enumerate(probs)]
        del probs
        npz = out_path.parent / f"{result.case.identifier}.npz"
        with atomic_path(npz, ".npz") as tmp:
            np.savez_compressed(tmp, probabilities=np.stack(raw).astype(np.float16))
    write_image(seg_raw.astype(np.uint8), geometry, out_path)
    _add(timings, "export_s", started)
    return out_path


def _memory_need(case: Case, meta: dict, num_probes: int, save_probabilities: bool) -> MemoryEstimate | None:
    """The case's RAM bound from its header, or None when the header cannot be read (the
    integrity check then reports the file properly)."""
    try:
        return estimate_for_input(case.images[0], meta, num_probes, save_probabilities)
    except Exception:  # noqa: BLE001 - corrupt or unsupported header: check_case reports it properly
        return None


def _refuse_if_too_large(case: Case, need: MemoryEstimate | None) -> None:
    """Refuse, before reading the pixels, a case whose RAM bound exceeds what the OS can give.

    Being OOM-killed half-way through a long ensemble is the worst outcome on a shared node:
    no message, nothing written.
    """
    have = available_bytes()
    if need is not None and have is not None and need.total_bytes > have:
        raise DiffprobeError(
            f"predicting this image needs about {need.total_gb:.1f} GB of RAM ({need.describe()}; "
            f"{need.raw_voxels / 1e6:.1f} M voxels), but only {have / 1e9:.1f} GB are available",
            case.images[0], "free memory or run on a machine with more RAM; drop --save_probabilities or "
            "ensemble fewer folds (-f) to lower the need; if a cluster job's limit is misread, set "
            "DIFFPROBE_MEMORY_LIMIT_GB")


def _room_to_prefetch(current: MemoryEstimate | None, following: MemoryEstimate | None,
                      previous: MemoryEstimate | None) -> bool:
    """Whether the next case may be read while this one is in the window and the last one is written.

    Overlapping the phases holds up to three cases at once, so it is only done when the sum of those
    phases' bounds fits in what is available now; otherwise the cases run one after another (same
    outputs, the single-case bound of docs/reliability.md).
    """
    if current is None or following is None:
        return False
    have = available_bytes()
    need = current.window_bytes + following.read_bytes + (previous.write_bytes if previous else 0.0)
    # A case that would be refused on its own is never read ahead: its turn refuses it unread.
    return have is None or (need < have and following.total_bytes <= have)


def _finish(future: Future | None) -> None:
    if future is not None:
        future.result()


def predict(inputs: str | Path, output: str | Path, dataset: str | int | None = None,
            configuration: str | None = None, folds: list[str] | None = None, device: str = "auto",
            step_size: float = 0.5, tta: bool = False, save_probabilities: bool = False,
            continue_prediction: bool = False, num_parts: int = 1, part_id: int = 0,
            show_progress: bool = True, settings: InferenceSettings | None = None,
            timings: list[dict] | None = None) -> list[Path]:
    """Predict every input case (this part of them); returns the written segmentation files.

    With ``settings.pipeline`` (default) the next case is read and preprocessed in a thread while the
    current one is in the sliding window, and the previous one is resampled back and written in
    another, when the RAM bounds of the three allow it. ``timings`` receives one dict of seconds
    per predicted case (preprocess, guidance, window, argmax, export; each measured in its thread).
    """
    settings = settings or InferenceSettings()
    settings.check()
    if not 0 <= part_id < num_parts:
        raise DiffprobeError(f"-part_id {part_id} must be in [0, {num_parts - 1}]", fix="use 0 <= part_id < num_parts")
    if not 0 < step_size <= 1:
        raise DiffprobeError(f"-step_size {step_size} must be in (0, 1]", fix="use e.g. 0.5 (nnU-Net's default)")
    dev = torch.device(resolve_device(device))
    fold_dirs = select_model(dataset, configuration, folds)
    probes = [load_trained_probe(d, dev) for d in fold_dirs]
    for probe in probes:
        prepare_model(probe.model, settings)
    meta = probes[0].meta
    cases = input_cases(Path(inputs), len(meta["plans"]["channel_names"]))[part_id::num_parts]
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffprobeError(f"cannot create the output folder ({e.strerror})", output,
                             "choose a writable output folder with -o") from None
    written, todo = [], []
    for case in cases:
        out_path = output / output_name(case)
        done = out_path.is_file() and (not save_probabilities or (output / f"{case.identifier}.npz").is_file())
        if continue_prediction and done:
            written.append(out_path)
        else:
            todo.append((case, out_path))
    needs = [_memory_need(case, meta, len(probes), save_probabilities) for case, _ in todo]
    overlap = settings.pipeline and len(todo) > 1
    loader = ThreadPoolExecutor(1, "diffprobe-load") if overlap else None
    writer = ThreadPoolExecutor(1, "diffprobe-write") if overlap else None
    next_load: Future | None = None
    last_write: Future | None = None
    try:
        with progress_bar() as bar:
            task = bar.add_task("predict", total=len(cases), completed=len(written), visible=show_progress)
            for i, (case, out_path) in enumerate(todo):
                case_timings: dict[str, float] = {}
                if next_load is None:
                    _refuse_if_too_large(case, needs[i])
                    loaded = load_case(probes, case, case_timings)
                else:
                    loaded, case_timings = next_load.result()
                    next_load = None
                if loader is not None and i + 1 < len(todo) and \
                        _room_to_prefetch(needs[i], needs[i + 1], needs[i - 1] if last_write else None):
                    following, ft = todo[i + 1][0], {}
                    next_load = loader.submit(lambda c=following, t=ft: (load_case(probes, c, t), t))
                bar.update(task, description=f"predict {case.identifier}")
                tiles = bar.add_task(f"  tiles of {case.identifier}", total=None, visible=show_progress)

                def progress(done: int, total: int, tiles=tiles) -> None:
                    bar.update(tiles, completed=done, total=total)

                result = window_case(probes, loaded, dev, step_size, tta, save_probabilities, progress, settings,
                                     case_timings)
                del loaded
                bar.remove_task(tiles)
                _finish(last_write)  # at most one export in flight: memory stays bounded
                last_write = None
                if writer is not None:
                    last_write = writer.submit(export_case, probes, result, out_path, case_timings)
                else:
                    export_case(probes, result, out_path, case_timings)
                del result
                written.append(out_path)
                if timings is not None:  # the dict itself: the writer thread adds export_s to it later
                    case_timings["case"] = case.identifier  # type: ignore[assignment]
                    timings.append(case_timings)
                bar.advance(task)
            _finish(last_write)
            last_write = None
    finally:
        # A case already in the writer is finished (never lost because a later case failed or
        # Ctrl-C came); a case being read for later is abandoned.
        if writer is not None:
            writer.shutdown(wait=True)
        if loader is not None:
            loader.shutdown(wait=False, cancel_futures=True)
    return written
