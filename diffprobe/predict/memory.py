"""How much RAM ``predict`` needs for one case, stated before anything large is allocated.

A CT of 512x512x600 voxels is 157 M voxels; every whole-volume float32 array on it is 0.63 GB.
``predict`` holds, per phase (N = raw voxels, M = voxels on the planned grid, K classes, G
guidance channels; bytes):

* **read + check + preprocess** — the file's pixels, a float32 copy, the canonical-orientation
  copy, the body mask and crop, the resampled (slice by slice, see
  ``diffprobe.preprocessing.resampling``) and normalised volume: ~``READ_BYTES_PER_RAW_VOXEL * N
  + 8 M``.
* **sliding window** — the volume (4 M), the guidance channels (4 G M), the weighted logit sum
  (4 K M, divided in place), the weight sum (4 M), a second logit sum when folds are ensembled:
  ``4 M (2 + G + K [+ K])`` (the second sum only when several windows are summed: fold heads
  sharing one denoiser share one window); plus the denoiser's working memory on one batch of tiles
  (``tile_batch`` tiles x the feature timesteps; bf16 activations count half), bounded by the
  planner's per-sample training-activation estimate (inference keeps fewer tensors alive, so this
  over-states it). ``--tta`` (noise draws) adds nothing here: the draws of a batch run one after
  another through the same ``tile_batch`` forward, shared by the fold heads, and only the batch's
  running log-probability sum (tiles x K x patch, float32) is kept between them.
* **back to the raw grid** — the K float32 softmax planes on the planned grid (4 K M), each
  resampled linearly in turn with a running float16 maximum and the label map (its argmax),
  postprocessed (``diffprobe.postprocessing``), un-cropped, re-oriented and handed to SimpleITK:
  ~``WRITE_BYTES_PER_RAW_VOXEL * N + 4 K M``; with
  ``--save_probabilities`` also K float16 planes on the raw grid and one being un-cropped.

The bound is the largest phase plus the process's fixed cost (Python, torch, the models).
The coefficients were measured on a 512x512x600 CT (``benchmarks/bench_memory.py``,
docs/reliability.md) and rounded up; ``predict`` refuses a case whose bound exceeds the RAM
the OS reports available, naming the file and the numbers, instead of being killed by the
OOM killer half-way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from diffprobe.guidance import guidance_channels
from diffprobe.host_allocator import release_free_memory

FIXED_BYTES = 0.8e9  # interpreter, torch, nnU-Net imports, BPR + denoiser + head (tiny..paper presets)
READ_BYTES_PER_RAW_VOXEL = 14.0  # pixels + float32 copy + canonical copy + mask + crop, + integrity re-read
# label map on the raw grid, un-cropped, re-oriented, SimpleITK's copy (6, measured), plus one class plane
# resampled in float32, its float16 copy and the running maximum (+4: 2.7 -> 6.0 B a voxel measured for
# the label-map vs the probability path on an anisotropic 60x256x256 case, cases.to_raw_grid); +1 for the
# body mask kept for postprocessing (its reduction's temporaries, ~9 B a cropped voxel at most, come after
# the class planes are freed, so they stay under the loop's peak)
WRITE_BYTES_PER_RAW_VOXEL = 11.0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per phase of one case's prediction, and the bound (largest phase + fixed cost)."""

    raw_voxels: int
    grid_voxels: int
    read_bytes: float
    window_bytes: float
    write_bytes: float

    @property
    def total_bytes(self) -> float:
        return FIXED_BYTES + max(self.read_bytes, self.window_bytes, self.write_bytes)

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 1e9

    def describe(self) -> str:
        return (f"fixed {FIXED_BYTES / 1e9:.1f} + max(read {self.read_bytes / 1e9:.1f}, "
                f"window {self.window_bytes / 1e9:.1f}, write {self.write_bytes / 1e9:.1f}) GB")


def estimate_predict_bytes(raw_shape: tuple[int, ...], raw_spacing: tuple[float, ...],
                           target_spacing: tuple[float, ...], num_classes: int, guidance_channels: int = 3,
                           num_probes: int = 1, save_probabilities: bool = False,
                           network_bytes: float = 0.0) -> MemoryEstimate:
    """The bound for one case; shapes and spacings in the same axis order (any order, consistently).

    The planned grid is taken uncropped (cropping to the body only makes it smaller).
    """
    n = math.prod(int(v) for v in raw_shape)
    m = math.prod(max(1, round(int(s) * float(sp) / float(t)))
                  for s, sp, t in zip(raw_shape, raw_spacing, target_spacing, strict=True))
    k = int(num_classes)
    read = READ_BYTES_PER_RAW_VOXEL * n + 8.0 * m
    window = 4.0 * m * (2 + guidance_channels + k * (2 if num_probes > 1 else 1)) + network_bytes
    write = WRITE_BYTES_PER_RAW_VOXEL * n + 4.0 * k * m  # the softmax planes wait for the way back
    if save_probabilities:  # K float16 planes on the raw grid + the one being un-cropped
        write += 2.0 * k * n + 2.0 * n
    return MemoryEstimate(n, m, read, window, write)


def image_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) in (x, y, z) order from the header alone; a DICOM folder from its file list."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise FileNotFoundError(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        size = list(reader.GetSize())
        size[2] = len(files)
        return tuple(size), tuple(reader.GetSpacing())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(reader.GetSize()), tuple(reader.GetSpacing())


def estimate_for_input(image: Path, meta: dict, num_probes: int = 1, save_probabilities: bool = False, *,
                       tile_batch: int = 2, bf16: bool = False, network: dict | None = None) -> MemoryEstimate:
    """The bound for predicting ``image`` (its header only is read) with a probe whose probe.json is ``meta``.

    ``num_probes``: sliding windows whose logits are summed (the predictor passes its number of
    feature-extraction groups: fold heads sharing one denoiser run in one window). ``tile_batch``,
    ``bf16`` and ``network``: see :func:`network_working_bytes` (the predictor passes its settings' and
    its loaded denoiser's).
    """
    size_xyz, spacing_xyz = image_header(image)
    target_xyz = tuple(reversed(meta["plans"]["preprocessing"]["target_spacing"]))
    return estimate_predict_bytes(size_xyz[:3], spacing_xyz[:3], target_xyz, int(meta["num_classes"]),
                                  guidance_channels(meta.get("guidance", "bpr")), num_probes,
                                  save_probabilities, network_working_bytes(meta, tile_batch, bf16=bf16,
                                                                            network=network))


def network_working_bytes(meta: dict, tiles_per_batch: int = 2, *, bf16: bool = False,
                          network: dict | None = None) -> float:
    """Upper bound on the denoiser's memory for one batch: tiles x timesteps samples, each at the
    planner's training-activation estimate (fp32) for the network's levels, halved for bf16 activations.

    ``network`` is a plans-style network dict (``levels`` with ``tokens``, ``channels``,
    ``attention``; ``blocks_per_level``): the predictor passes the loaded denoiser's at the probe's
    tile size (``FeatureExtractor.network_summary``); without it, the plans snapshot in probe.json.
    """
    from diffprobe.planning.planner import estimate_memory_gb

    network = network or meta["plans"]["network"]
    samples = int(tiles_per_batch) * max(1, len(meta.get("timesteps", [1])))
    per_sample = estimate_memory_gb(network["levels"], network.get("blocks_per_level", 2)) * 1024**3
    return samples * per_sample * (0.5 if bf16 else 1.0)


def available_bytes() -> float | None:
    """RAM that can be allocated without swapping, or None where it cannot be read (non-Linux).

    Linux ``MemAvailable``, lowered to the cgroup v2 limit minus current use when the process
    runs in a memory-limited container or cluster job (which MemAvailable does not see).
    ``DIFFPROBE_MEMORY_LIMIT_GB`` overrides both.
    """
    override = os.environ.get("DIFFPROBE_MEMORY_LIMIT_GB")
    if override:
        return float(override) * 1e9
    release_free_memory()  # free heap this process keeps for reuse (host_allocator) is available too
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = float(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = float(limit) - used
            found = room if found is None else min(found, room)
    except (OSError, ValueError):
        pass
    return found
