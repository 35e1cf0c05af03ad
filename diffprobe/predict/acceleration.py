"""How the probe's network runs at inference: memory format, precision, compilation, tile batch.

None of these settings changes what is computed, only how fast: outputs agree with the plain
float32 path to float rounding (channels_last_3d, torch.compile) or to bf16 rounding (bf16
autocast; the logits are returned in float32 and accumulated in float32/float16 as before).
Measured effects are in docs/performance.md (``benchmarks/bench_predict_phases.py``):

* ``channels_last``: channels_last_3d weights and tiles. oneDNN (CPU) and cuDNN (GPU) have
  faster 3D convolution kernels for it; on the 2-core CPU machine the probe's forward took
  0.74x the time. On by default.
* ``precision="bf16"``: ``torch.autocast`` in bfloat16. On GPUs (tensor cores) and on CPUs with
  bf16 units (``avx512_bf16`` / ``amx_bf16``, detected by :func:`cpu_bf16_native`) it is faster; on
  a CPU without them (AVX2 only) it was ~40x slower (emulated). ``auto`` means bf16 on CUDA, bf16 on
  a CPU whose bf16 units are detected when :data:`AUTO_BF16_ON_NATIVE_CPU` (set from the agreement
  measured in docs/performance.md, "CPU bf16"), and float32 elsewhere.
* ``compile``: ``torch.compile`` of the denoiser and the head (static shapes: one compilation
  for the full tile batch, one for a smaller last batch). On the 2-core CPU it compiled for
  ~90 s and gained nothing; off by default, for long GPU runs.
* ``tile_batch``: tiles per forward (each tile runs once per feature timestep, so a batch of
  2 tiles x 3 timesteps is a forward of 6 samples).
* ``cuda_graphs``: on CUDA, the denoiser and heads of a full tile batch are captured once as a
  CUDA graph and replayed (``predict.cuda_graphs``): one launch instead of thousands of small ones.
  Same logits bit for bit; off by default, since the paper-class window on an H200 is bound by its
  kernels, not their launches (30.4 vs 30.2 ms per tile). No effect on a CPU.
* ``share_features``: fold heads on the same frozen denoiser (same pretrained model and checksum,
  timesteps, levels, patch size; not finetuned) share one feature extraction per tile, and their
  logits are averaged per tile (Gaussian weighting is linear, so this equals averaging the folds'
  windows to float rounding). On by default; off runs one extraction per fold (the old path).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from diffprobe.errors import DiffprobeError

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
# Whether ``auto`` picks bf16 on a CPU with native bf16 units: only where its labels agreed with fp32
# (>= 99.9 % of voxels, benchmarks/bench_precision.py; docs/performance.md, "CPU bf16").
AUTO_BF16_ON_NATIVE_CPU = False


def cpuinfo_flags(text: str) -> set[str] | None:
    """The CPU flags of a /proc/cpuinfo text (x86 ``flags``, ARM ``Features``); None when it lists none."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _torch_reports_bf16() -> bool:
    """torch's own CPU probes (cpuinfo library; for systems without /proc/cpuinfo)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_bf16_native(flags: Iterable[str] | None = None) -> bool:
    """Whether this CPU has bf16 arithmetic units oneDNN uses (not emulation, which was ~40x slower).

    ``flags``: the CPU flags to judge (tests pass fakes); default: /proc/cpuinfo's, or when it lists
    none (not Linux), torch's CPU probes. oneDNN (``torch.backends.mkldnn``) must be available: it
    holds the bf16 convolution kernels."""
    if not torch.backends.mkldnn.is_available():
        return False
    if flags is None:
        return _detected_bf16()
    return any(f in set(flags) for f in BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=1)
def _detected_bf16() -> bool:
    flags = cpuinfo_flags(_read_cpuinfo())
    return _torch_reports_bf16() if flags is None else any(f in flags for f in BF16_CPU_FLAGS)


def auto_dtype(device: torch.device, cpu_bf16: bool | None = None) -> torch.dtype:
    """What ``-precision auto`` means on ``device``: bf16 on CUDA; on a CPU bf16 only where its bf16
    units are detected (``cpu_bf16``: the detection's answer, default :func:`cpu_bf16_native`) and
    :data:`AUTO_BF16_ON_NATIVE_CPU` holds; float32 otherwise."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and AUTO_BF16_ON_NATIVE_CPU:
        native = cpu_bf16_native() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if native else torch.float32
    return torch.float32


@dataclass(frozen=True)
class InferenceSettings:
    """Speed settings of ``predict``; the defaults are the fastest measured exact ones."""

    channels_last: bool = True
    precision: str = "auto"
    compile: bool = False
    tile_batch: int = 2
    pipeline: bool = True  # overlap reading the next case and writing the last with the current window
    share_features: bool = True  # fold heads on one frozen denoiser: one feature extraction per tile
    # CUDA: replay each full tile batch's forward as one graph (predict.cuda_graphs). Off: at the paper class
    # on an H200 the GPU was already 95 % busy and graphs gained nothing (docs/performance.md, "GPU day 2")
    cuda_graphs: bool = False

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise DiffprobeError(f"-precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                                 fix="use auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), fp32 or bf16")
        if self.tile_batch < 1:
            raise DiffprobeError(f"-tile_batch {self.tile_batch} must be at least 1", fix="use e.g. 2")

    def dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on ``device`` (float32 = no autocast); ``auto``: :func:`auto_dtype`."""
        if self.precision == "auto":
            return auto_dtype(device)
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def memory_format(settings: InferenceSettings) -> torch.memory_format:
    return torch.channels_last_3d if settings.channels_last else torch.contiguous_format


def prepare_model(model: torch.nn.Module, settings: InferenceSettings) -> torch.nn.Module:
    """The probe model in the settings' memory format, its denoiser and head compiled if asked.

    Returns the same module (modified in place): ``TrainedProbe.model`` stays the object callers hold.
    """
    model = model.to(memory_format=memory_format(settings))
    if settings.compile:
        model.extractor.denoiser = torch.compile(model.extractor.denoiser, dynamic=False)
    model.head = prepare_head(model.head, settings)
    return model


def prepare_head(head: torch.nn.Module, settings: InferenceSettings) -> torch.nn.Module:
    """A probe head in the settings' memory format, compiled if asked (for heads that share an extractor
    another probe's ``prepare_model`` already prepared)."""
    head = head.to(memory_format=memory_format(settings))
    return torch.compile(head, dynamic=False) if settings.compile else head


@contextlib.contextmanager
def autocast(device: torch.device, settings: InferenceSettings) -> Iterator[None]:
    """bf16 autocast when the settings ask for it on this device; a no-op for float32."""
    dtype = settings.dtype(device)
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
