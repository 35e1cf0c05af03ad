"""``diffprobe predict``: raw images -> label maps in each input's exact original geometry.

Per case: integrity check and canonical orientation, preprocessing as planned (crop,
resample, normalise), the guidance channels once per volume (BPR coordinates computed on
the whole volume, then cropped per tile by the sliding window), Gaussian-weighted sliding
window of the probe(s) with logits accumulated on the device (per-tile features are never
kept), folds averaged, softmax on the preprocessed grid, then (``cases.to_raw_grid``, as
nnU-Net) the probabilities resampled linearly, one class at a time, with the label map their
argmax, crop undone and canonical orientation undone. Outputs are written atomically, so
``--continue_prediction`` can trust every file it finds.

The segmentation is a function of the pixels (and the model) only: the features' noise is
seeded by the tile position (``probe.features.inference_seed``), never by the case's name, so
renaming, moving, reordering or splitting the inputs (``-num_parts``) changes no voxel.

``--tta`` is a noise ensemble, the one test-time augmentation these models are trained for: each
tile is predicted under N independent feature-noise draws (seeds from the tile position and the draw
index) and the softmax averaged (``ensemble.group_patch_predictor``). It used to mirror image and
guidance over three axes, which neither pretraining nor the probe ever saw (anatomy is not
mirror-symmetric, the BPR's left-right coordinate flips meaning); docs/probe.md has the measurement.

``Predictor`` holds the loaded folds: fold heads on one frozen denoiser share one feature
extraction per tile (``-f 0 1 2 3 4`` costs about one fold's denoiser work, not five) and their
logits are averaged per tile, which equals averaging the folds' windows to float rounding (the
Gaussian weighting is linear). ``predict`` is the thin wrapper the CLI calls.

Postprocessing (``diffprobe.postprocessing``) follows the model: background outside the body where the
plans say so (CT), and the largest component of the classes every loaded fold's validation chose
(``postprocessing.json``); ``postprocess=False`` (``--no_postprocessing``) writes the plain argmax.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from diffprobe.dataset.cases import Case
from diffprobe.devices import resolve_device
from diffprobe.errors import DiffprobeError
from diffprobe.guidance import volume_guidance as guidance_of_volume
from diffprobe.host_allocator import tune_host_allocator
from diffprobe.parallel import progress_bar
from diffprobe.postprocessing.operations import Postprocessing
from diffprobe.predict.acceleration import InferenceSettings, prepare_head, prepare_model
from diffprobe.predict.cases import LoadedCase, WindowResult, export_case, load_case, softmax_  # noqa: F401
from diffprobe.predict.cases import add_time as _add
from diffprobe.predict.ensemble import (  # noqa: F401 - re-exported
    DEFAULT_TTA_DRAWS,
    ProbeGroup,
    group_patch_predictor,
    group_probes,
    share_key,
    tta_draws,
)
from diffprobe.predict.inputs import input_cases, output_name, select_model, trained_configurations  # noqa: F401
from diffprobe.predict.memory import MemoryEstimate, available_bytes, estimate_for_input
from diffprobe.predict.outputs import check_output_type, output_paths
from diffprobe.predict.sliding_window import sliding_window_logits
from diffprobe.probe.model import TrainedProbe, load_trained_probe


# ---- the prediction itself ------------------------------------------------------------------
def _guidance(probe: TrainedProbe, data: np.ndarray, spacing: list[float], device: torch.device) -> torch.Tensor | None:
    """Guidance channels (G, z, y, x) for the whole preprocessed volume, as in training (``diffprobe.guidance``)."""
    guide = guidance_of_volume(probe.meta["guidance"], data, spacing, probe.bpr, probe.bpr_crop)
    return None if guide is None else guide.to(device)


def volume_guidance(probe: TrainedProbe, data: np.ndarray, identifier: str,
                    spacing: list[float], device: torch.device) -> torch.Tensor | None:
    """Guidance channels (G, z, y, x) for the whole preprocessed volume, as in training (``diffprobe.guidance``).

    ``identifier`` is not used: no guidance mode depends on the case's name.
    """
    return _guidance(probe, data, spacing, device)


@torch.no_grad()
def _ensemble_logits(groups: list[ProbeGroup], data: np.ndarray, spacing: list[float],
                     device: torch.device, step_size: float, tta: bool | int, progress,
                     settings: InferenceSettings, timings: dict[str, float] | None,
                     mirror_axes: tuple[int, ...] = ()) -> torch.Tensor:
    """Mean logits over every probe of ``groups``: one sliding window per group, weighted by its size.

    ``tta``: the noise ensemble (:func:`tta_draws`: draws per tile, each one extraction for the whole
    group). ``mirror_axes`` is not offered by ``predict``: neither pretraining nor the probe saw a
    mirrored body; ``benchmarks/bench_tta.py`` passes it to measure what the old mirroring ``--tta`` did.
    """
    draws = tta_draws(tta)
    volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if device.type == "cuda":  # once, not a host-to-device copy (and a host wait) per tile batch
        volume = volume.to(device)
    num_probes = sum(len(g.probes) for g in groups)
    total = None
    guidance_cache: dict[str, torch.Tensor | None] = {}
    for group in groups:
        probe = group.first
        key = probe.meta["pretrained"]
        if key not in guidance_cache:
            started = time.perf_counter()
            guidance_cache[key] = _guidance(probe, data, spacing, device)
            _add(timings, "guidance_s", started)
        started = time.perf_counter()
        logits = sliding_window_logits(
            volume, guidance_cache[key], group_patch_predictor(group, device, settings, draws), probe.num_classes,
            probe.patch_size, step_size=step_size, batch_size=settings.tile_batch,
            mirror_axes=mirror_axes, device=device, thin_padding=probe.thin_padding,
            accumulate_dtype=torch.float16 if device.type == "cuda" else torch.float32, progress=progress)
        n = len(group.probes)  # the window holds the group's mean: it counts n times in the ensemble
        if total is None:
            total = logits.mul_(n) if n > 1 and len(groups) > 1 else logits
        else:
            total.add_(logits, alpha=n)
        del logits
        _add(timings, "window_s", started)
    return total.div_(num_probes) if len(groups) > 1 else total  # in place: no second K x volume copy


@torch.no_grad()
def predict_logits(probes: list[TrainedProbe], data: np.ndarray, spacing: list[float],
                   device: torch.device, step_size: float = 0.5, tta: bool | int = False,
                   progress=None, settings: InferenceSettings | None = None,
                   timings: dict[str, float] | None = None) -> torch.Tensor:
    """Mean sliding-window logits (K, z, y, x) of the probes on a preprocessed volume.

    ``settings`` choose memory format, precision, tile batch and whether fold heads on one frozen
    denoiser share their feature extraction (``prepare_model`` must have been applied to the probes'
    models for the memory format to pay off; the probes are not modified); ``timings`` collects the
    seconds spent on the guidance channels and in the window. No case name: the result depends on
    the pixels only (the features' noise is seeded by tile position).
    """
    predictor = Predictor(probes, device, settings, prepare=False, postprocess=False)
    return predictor.logits(data, step_size, tta, progress, timings, spacing=spacing)


def window_case(probes: list[TrainedProbe], loaded: LoadedCase, device: torch.device, step_size: float = 0.5,
                tta: bool | int = False, save_probabilities: bool = False, progress=None,
                settings: InferenceSettings | None = None, timings: dict[str, float] | None = None) -> WindowResult:
    """Sliding window, fold ensemble and softmax on the planned grid; frees the preprocessed volume."""
    predictor = Predictor(probes, device, settings, prepare=False, postprocess=False)
    return predictor.window_case(loaded, step_size, tta, save_probabilities, progress, timings)


def _memory_need(case: Case, meta: dict, num_probes: int, save_probabilities: bool, **options) -> MemoryEstimate | None:
    """The case's RAM bound from its header, or None when the header cannot be read (the
    integrity check then reports the file properly). ``options``: ``estimate_for_input``'s keywords."""
    try:
        return estimate_for_input(case.images[0], meta, num_probes, save_probabilities, **options)
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


def _check_run_arguments(step_size: float, num_parts: int, part_id: int) -> None:
    if not 0 <= part_id < num_parts:
        raise DiffprobeError(f"-part_id {part_id} must be in [0, {num_parts - 1}]", fix="use 0 <= part_id < num_parts")
    if not 0 < step_size <= 1:
        raise DiffprobeError(f"-step_size {step_size} must be in (0, 1]", fix="use e.g. 0.5 (nnU-Net's default)")


# ---- the predictor ------------------------------------------------------------------------------
class Predictor:
    """Trained fold probes, loaded once, ready to predict case after case.

    The probes are grouped by shared feature extraction (:func:`group_probes`): ``-f 0 1 2 3 4`` of
    one frozen-denoiser configuration is one group, whose tiles go through the denoiser once and
    through the five heads; each group is one sliding window. ``prepare=True`` (the predictor owns
    the probes): the probes of a group are made to hold one denoiser module (their weights are the
    same checkpoint, checked by its checksum at load), and models are put in the settings' memory
    format (and compiled when asked). ``prepare=False`` leaves the probes untouched (the caller
    prepared them).

    Usage::

        predictor = Predictor.from_folders(select_model(1, "tiny__fpn", ["0", "1"]), "cpu")
        predictor.predict_folder("imagesTs", "out")
    """

    def __init__(self, probes: list[TrainedProbe], device: str | torch.device,
                 settings: InferenceSettings | None = None, *, prepare: bool = True, postprocess: bool = True) -> None:
        if not probes:
            raise ValueError("a predictor needs at least one probe")
        tune_host_allocator()  # also when given a torch.device (resolve_device does it otherwise)
        self.postprocessing = Postprocessing.for_model(probes[0].meta.get("plans") or {}, [p.folder for p in probes]) \
            if postprocess else Postprocessing()
        self.device = torch.device(device)
        self.settings = settings or InferenceSettings()
        self.settings.check()
        self.probes = list(probes)
        self.groups = group_probes(self.probes, self.settings.share_features)
        # The denoiser's levels at the tile size, for the RAM bound (taken before any torch.compile).
        self.network = max((g.extractor.network_summary(g.first.patch_size) for g in self.groups),
                           key=lambda n: sum(lv["tokens"] * lv["channels"] for lv in n["levels"]))
        if prepare:
            for group in self.groups:
                for probe in group.probes[1:]:
                    probe.model.extractor = group.extractor  # one denoiser in memory per group
                prepare_model(group.first.model, self.settings)
                for probe in group.probes[1:]:
                    probe.model.head = prepare_head(probe.model.head, self.settings)

    @classmethod
    def from_folders(cls, folders: list[Path], device: str | torch.device = "auto",
                     settings: InferenceSettings | None = None, postprocess: bool = True) -> Predictor:
        """Load the trained probes of ``folders`` (fold folders, e.g. from ``select_model``) onto ``device``."""
        dev = torch.device(resolve_device(device)) if isinstance(device, str) else device
        return cls([load_trained_probe(Path(f), dev) for f in folders], dev, settings, postprocess=postprocess)

    @property
    def meta(self) -> dict:
        """The first probe's probe.json (plans, labels, guidance: the same for every fold)."""
        return self.probes[0].meta

    def memory_need(self, case: Case, save_probabilities: bool = False) -> MemoryEstimate | None:
        """The case's RAM bound with these probes and settings, from its header (None: header unreadable)."""
        return _memory_need(case, self.meta, len(self.groups), save_probabilities,
                            tile_batch=self.settings.tile_batch,
                            bf16=self.settings.dtype(self.device) == torch.bfloat16, network=self.network)

    def load_case(self, case: Case, timings: dict[str, float] | None = None) -> LoadedCase:
        """Read, integrity-check and preprocess one input (no torch work: may run in a thread)."""
        return load_case(self.probes, case, timings, keep_body=self.postprocessing.outside_body)

    def logits(self, data: np.ndarray, step_size: float = 0.5, tta: bool | int = False, progress=None,
               timings: dict[str, float] | None = None, spacing: list[float] | None = None) -> torch.Tensor:
        """Mean logits (K, z, y, x) of every probe on a preprocessed volume (``spacing``: the planned one).

        ``tta``: False (default), True (:data:`DEFAULT_TTA_DRAWS` noise draws per tile) or the number of
        draws; with N > 1 draws the values are the log of the draws' mean softmax (``tta_draws``,
        ``ensemble.group_patch_predictor``): the softmax of the result is the ensemble's probabilities."""
        spacing = spacing if spacing is not None else self.meta["plans"]["preprocessing"]["target_spacing"]
        return _ensemble_logits(self.groups, data, spacing, self.device, step_size, tta, progress,
                                self.settings, timings)

    def window_case(self, loaded: LoadedCase, step_size: float = 0.5, tta: bool | int = False,
                    save_probabilities: bool = False, progress=None,
                    timings: dict[str, float] | None = None) -> WindowResult:
        """Sliding window, fold ensemble and softmax on the planned grid; frees the preprocessed volume.

        The probabilities (not a label map) go to export: the label map is their argmax after they are
        resampled to the input's grid (``cases.to_raw_grid``), with or without ``save_probabilities``.
        """
        logits = self.logits(loaded.data, step_size, tta, progress, timings)
        loaded.data = None  # the caller's LoadedCase no longer pins the preprocessed volume
        started = time.perf_counter()
        probabilities = softmax_(logits).cpu()  # in place on the device; one K x volume copy to the CPU
        del logits
        _add(timings, "argmax_s", started)  # key kept for the benchmarks: now the softmax
        return WindowResult(loaded.case, probabilities, loaded.props, save_probabilities)

    def export_case(self, result: WindowResult, out_path: Path, timings: dict[str, float] | None = None,
                    output_type: str = "nifti") -> Path:
        """Label map (and probabilities) back to the input's raw geometry, written atomically."""
        return export_case(self.probes, result, out_path, timings, output_type, self.postprocessing)

    def predict_folder(self, inputs: str | Path, output: str | Path, step_size: float = 0.5, tta: bool | int = False,
                       save_probabilities: bool = False, continue_prediction: bool = False, num_parts: int = 1,
                       part_id: int = 0, show_progress: bool = True,
                       timings: list[dict] | None = None, output_type: str = "nifti") -> list[Path]:
        """Predict every input case (this part of them); returns the written segmentation files.

        With ``settings.pipeline`` (default) the next case is read and preprocessed in a thread while the
        current one is in the sliding window, and the previous one is resampled back and written in
        another, when the RAM bounds of the three allow it. ``timings`` receives one dict of seconds
        per predicted case (preprocess, guidance, window, argmax, export; each measured in its thread).
        """
        _check_run_arguments(step_size, num_parts, part_id)
        tta_draws(tta)  # a bad number of draws refuses before any case is read
        cases = input_cases(Path(inputs), len(self.meta["plans"]["channel_names"]))[part_id::num_parts]
        check_output_type(output_type, cases, inputs)  # nifti | dicom_seg | both (diffprobe.predict.outputs)
        output = Path(output)
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DiffprobeError(f"cannot create the output folder ({e.strerror})", output,
                                 "choose a writable output folder with -o") from None
        written, todo = [], []
        for case in cases:
            out_path, *others = output_paths(case, output, output_type)
            done = all(p.is_file() for p in (out_path, *others)) and \
                (not save_probabilities or (output / f"{case.identifier}.npz").is_file())
            if continue_prediction and done:
                written.append(out_path)
            else:
                todo.append((case, out_path))
        needs = [self.memory_need(case, save_probabilities) for case, _ in todo]
        overlap = self.settings.pipeline and len(todo) > 1
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
                        loaded = self.load_case(case, case_timings)
                    else:
                        loaded, case_timings = next_load.result()
                        next_load = None
                    if loader is not None and i + 1 < len(todo) and \
                            _room_to_prefetch(needs[i], needs[i + 1], needs[i - 1] if last_write else None):
                        following, ft = todo[i + 1][0], {}
                        next_load = loader.submit(lambda c=following, t=ft: (self.load_case(c, t), t))
                    bar.update(task, description=f"predict {case.identifier}")
                    tiles = bar.add_task(f"  tiles of {case.identifier}", total=None, visible=show_progress)

                    def progress(done: int, total: int, tiles=tiles) -> None:
                        bar.update(tiles, completed=done, total=total)

                    result = self.window_case(loaded, step_size, tta, save_probabilities, progress, case_timings)
                    del loaded
                    bar.remove_task(tiles)
                    _finish(last_write)  # at most one export in flight: memory stays bounded
                    last_write = None
                    if writer is not None:
                        last_write = writer.submit(self.export_case, result, out_path, case_timings, output_type)
                    else:
                        self.export_case(result, out_path, case_timings, output_type)
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


def predict(inputs: str | Path, output: str | Path, dataset: str | int | None = None,
            configuration: str | None = None, folds: list[str] | None = None, device: str = "auto",
            step_size: float = 0.5, tta: bool | int = False, save_probabilities: bool = False,
            continue_prediction: bool = False, num_parts: int = 1, part_id: int = 0,
            show_progress: bool = True, settings: InferenceSettings | None = None,
            timings: list[dict] | None = None, output_type: str = "nifti", postprocess: bool = True) -> list[Path]:
    """Predict every input case (this part of them) with the chosen model's folds; returns the written
    segmentation files. A thin wrapper: ``Predictor.from_folders(select_model(...)).predict_folder(...)``."""
    settings = settings or InferenceSettings()
    settings.check()
    _check_run_arguments(step_size, num_parts, part_id)  # before the (slow) loading
    tta_draws(tta)
    check_output_type(output_type, inputs=inputs)
    dev = torch.device(resolve_device(device))
    predictor = Predictor.from_folders(select_model(dataset, configuration, folds), dev, settings, postprocess)
    return predictor.predict_folder(inputs, output, step_size, tta, save_probabilities, continue_prediction,
                                    num_parts, part_id, show_progress, timings, output_type)
