"""How the probe's network runs at inference: memory format, precision, compilation, tile batch.

None of these settings changes what is computed, only how fast: outputs agree with the plain
float32 path to float rounding (channels_last_3d, torch.compile) or to bf16 rounding (bf16
autocast; the logits are returned in float32 and accumulated in float32/float16 as before).
Measured effects are in docs/performance.md (``benchmarks/bench_predict_phases.py``):

* ``channels_last``: channels_last_3d weights and tiles. oneDNN (CPU) and cuDNN (GPU) have
  faster 3D convolution kernels for it; on the 2-core CPU machine the probe's forward took
  0.74x the time. On by default.
* ``precision="bf16"``: ``torch.autocast`` in bfloat16. Meant for GPUs (tensor cores); on a
  CPU without bf16 units (AVX2 only) it was ~40x slower, so ``auto`` means bf16 on CUDA and
  float32 elsewhere.
* ``compile``: ``torch.compile`` of the denoiser and the head (static shapes: one compilation
  for the full tile batch, one for a smaller last batch). On the 2-core CPU it compiled for
  ~90 s and gained nothing; off by default, for long GPU runs.
* ``tile_batch``: tiles per forward (each tile runs once per feature timestep, so a batch of
  2 tiles x 3 timesteps is a forward of 6 samples).
* ``share_features``: fold heads on the same frozen denoiser (same pretrained model and checksum,
  timesteps, levels, patch size; not finetuned) share one feature extraction per tile, and their
  logits are averaged per tile (Gaussian weighting is linear, so this equals averaging the folds'
  windows to float rounding). On by default; off runs one extraction per fold (the old path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffprobe.errors import DiffprobeError

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class InferenceSettings:
    """Speed settings of ``predict``; the defaults are the fastest measured exact ones."""

    channels_last: bool = True
    precision: str = "auto"
    compile: bool = False
    tile_batch: int = 2
    pipeline: bool = True  # overlap reading the next case and writing the last with the current window
    share_features: bool = True  # fold heads on one frozen denoiser: one feature extraction per tile

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise DiffprobeError(f"-precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                                 fix="use auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16")
        if self.tile_batch < 1:
            raise DiffprobeError(f"-tile_batch {self.tile_batch} must be at least 1", fix="use e.g. 2")

    def dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on ``device`` (float32 = no autocast)."""
        if self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return torch.float32


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
