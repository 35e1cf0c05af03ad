"""Guidance modes: the extra input channels the denoiser sees next to the image.

Each mode is ONE entry of :data:`MODES` (adding a mode = one more entry), defining

* ``channels`` — how many guidance channels the denoiser gets (0: none);
* ``patch(ref, start, size)`` — the channels of one patch of a preprocessed volume (pretraining
  and probe training; ``start`` may lie outside the volume, patches may be larger than it);
* ``volume(data, spacing, bpr, bpr_crop)`` — the channels of a whole preprocessed volume (predict;
  the sliding window crops them per tile);
* its seeding — no mode depends on the case's identifier or on a per-step random generator.

For every mode the patch at ``start`` equals the whole-volume guidance cropped at ``start``
(inside the volume), so training patches and predict tiles see the same thing:

* ``none``: no channels.
* ``random``: a fixed uniform(-1, 1) field on the voxel grid, a hash of (seed, channel, z, y, x)
  (splitmix64), the same for every case — a control that carries no anatomy.
* ``physical``: mm (channels LR, AP, CC) from the centre of the body crop (the preprocessed,
  cropped volume), / ``PHYSICAL_SCALE_MM``; not scanner coordinates: the origin moves with the crop.
* ``bpr``: the trained body part regressor's coordinates of the whole volume, stored as float16
  (the BPR map cache read per patch, ``diffprobe.pretraining.bpr_maps``); predict rounds its
  freshly computed map to float16 too, so both see the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffprobe.preprocessing.storage import open_array
from diffprobe.preprocessing.volumes import VolumeRef, read_region

PHYSICAL_SCALE_MM = 200.0  # physical guidance: mm from the body-crop centre / this
RANDOM_GUIDANCE_SEED = 0x5EED  # the random guidance field's one seed
_SLAB_VOXELS = 1 << 22  # random field: voxels hashed at a time (bounds the uint64 temporaries)


@dataclass(frozen=True)
class Guidance:
    """One guidance mode; subclasses define the channels."""

    name: str
    channels: int

    def check(self, volumes: Sequence[VolumeRef]) -> None:
        """Raise ValueError when ``volumes`` lack what this mode reads per patch."""

    def patch(self, ref: VolumeRef, start: Sequence[int], size: Sequence[int]) -> np.ndarray | None:
        """(channels, *size) float32 for the patch of ``ref`` at ``start`` (z, y, x), or None."""
        raise NotImplementedError

    def volume(self, data: np.ndarray, spacing: Sequence[float], bpr: torch.nn.Module | None = None,
               bpr_crop: Sequence[int] | None = None) -> torch.Tensor | None:
        """(channels, z, y, x) float32 for the whole preprocessed volume ``data`` (C, z, y, x), or None."""
        raise NotImplementedError


@dataclass(frozen=True)
class NoGuidance(Guidance):
    name: str = "none"
    channels: int = 0

    def patch(self, ref, start, size):
        return None

    def volume(self, data, spacing, bpr=None, bpr_crop=None):
        return None


@dataclass(frozen=True)
class _FieldGuidance(Guidance):
    """A mode that is a function of the voxel position (and the volume's shape and spacing)."""

    def field(self, shape: Sequence[int], spacing: Sequence[float], start: Sequence[int],
              size: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def patch(self, ref, start, size):
        return self.field(ref.shape, ref.spacing, start, size)

    def volume(self, data, spacing, bpr=None, bpr_crop=None):
        shape = tuple(int(s) for s in data.shape[1:])
        return torch.from_numpy(self.field(shape, spacing, (0, 0, 0), shape))


@dataclass(frozen=True)
class PhysicalGuidance(_FieldGuidance):
    name: str = "physical"
    channels: int = 3
    scale_mm: float = PHYSICAL_SCALE_MM

    def field(self, shape, spacing, start, size):
        """mm (channels x, y, z: LR, AP, CC) from the centre of the body crop (the preprocessed volume) / scale;
        not scanner coordinates."""
        centre = (np.array(shape) - 1) / 2
        out = np.empty((3, *(int(s) for s in size)), np.float32)
        for channel, axis in enumerate((2, 1, 0)):  # channel 0 varies along x, 1 along y, 2 along z
            values = ((int(start[axis]) + np.arange(int(size[axis])) - centre[axis]) * spacing[axis]
                      / self.scale_mm).astype(np.float32)
            out[channel] = values.reshape([-1 if a == axis else 1 for a in range(3)])
        return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (a bijection with full avalanche)."""
    np.bitwise_xor(x, x >> np.uint64(30), out=x)
    np.multiply(x, np.uint64(0xBF58476D1CE4E5B9), out=x)
    np.bitwise_xor(x, x >> np.uint64(27), out=x)
    np.multiply(x, np.uint64(0x94D049BB133111EB), out=x)
    np.bitwise_xor(x, x >> np.uint64(31), out=x)
    return x


def _axis_keys(seed: int, channel: int, axis: int, start: int, size: int) -> np.ndarray:
    salt = np.random.SeedSequence([seed, channel, axis]).generate_state(1, np.uint64)[0]
    coords = (int(start) + np.arange(int(size), dtype=np.int64)).view(np.uint64)  # two's complement: any sign
    return _mix(coords + salt)


@dataclass(frozen=True)
class RandomGuidance(_FieldGuidance):
    name: str = "random"
    channels: int = 3
    seed: int = RANDOM_GUIDANCE_SEED

    def field(self, shape, spacing, start, size):
        """uniform[-1, 1) per (channel, voxel): the top 24 bits of a hash of (seed, channel, z, y, x)."""
        size = tuple(int(s) for s in size)
        out = np.empty((self.channels, *size), np.float32)
        slab = max(1, _SLAB_VOXELS // max(1, size[1] * size[2]))
        for c in range(self.channels):
            kz, ky, kx = (_axis_keys(self.seed, c, a, start[a], size[a]) for a in range(3))
            kyx = ky[:, None] ^ kx[None, :]
            for z0 in range(0, size[0], slab):
                x = _mix(kz[z0:z0 + slab, None, None] ^ kyx[None])
                out[c, z0:z0 + slab] = (x >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23) - 1
        return out


def bpr_coordinates(model: torch.nn.Module, data: np.ndarray, crop: Sequence[int]) -> torch.Tensor:
    """The BPR map of a whole volume as stored and used: (3, z, y, x) float16, on the model's device."""
    from diffprobe.bpr import predict_coordinates

    return predict_coordinates(model, data, tuple(int(c) for c in crop)).half()


@dataclass(frozen=True)
class BprGuidance(Guidance):
    name: str = "bpr"
    channels: int = 3

    def check(self, volumes):
        if any(v.guidance_path is None for v in volumes):
            raise ValueError("bpr guidance needs a coordinate map for every volume (run the BPR stage first)")

    def patch(self, ref, start, size):
        if ref.guidance_path is None:
            raise ValueError(f"bpr guidance needs the coordinate map of {ref.identifier} (run the BPR stage first)")
        return read_region(open_array(ref.guidance_path), np.asarray(start), tuple(int(s) for s in size), fill=0.0,
                           edge=True)

    def volume(self, data, spacing, bpr=None, bpr_crop=None):
        if bpr is None or bpr_crop is None:
            raise ValueError("bpr guidance of a whole volume needs the trained BPR and its crop")
        return bpr_coordinates(bpr, data, bpr_crop).float()


MODES: dict[str, Guidance] = {m.name: m for m in (BprGuidance(), NoGuidance(), RandomGuidance(), PhysicalGuidance())}
GUIDANCE_MODES = tuple(MODES)  # ("bpr", "none", "random", "physical")


def guidance_mode(mode: str) -> Guidance:
    """The mode called ``mode``; ValueError naming the modes when there is none."""
    try:
        return MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {mode!r}") from None


def guidance_channels(mode: str) -> int:
    """Number of guidance channels of a mode (0 for ``none``)."""
    return guidance_mode(mode).channels


def patch_guidance(mode: str, ref: VolumeRef, start: Sequence[int], size: Sequence[int]) -> np.ndarray | None:
    """The guidance channels (G, *size) float32 of the patch of ``ref`` at ``start``, None for ``none``."""
    return guidance_mode(mode).patch(ref, start, size)


def volume_guidance(mode: str, data: np.ndarray, spacing: Sequence[float], bpr: torch.nn.Module | None = None,
                    bpr_crop: Sequence[int] | None = None) -> torch.Tensor | None:
    """The guidance channels (G, z, y, x) float32 of a whole preprocessed volume ``data`` (C, z, y, x).

    On the CPU, except ``bpr`` (computed on the BPR's device); None for ``none``.
    """
    return guidance_mode(mode).volume(data, spacing, bpr, bpr_crop)
