"""Patch batches for pretraining, deterministic per (seed, step, rank).

Every batch is a pure function of the step number, so several loader processes can work
ahead and a resumed run sees exactly the batches an uninterrupted run would. Patches are
read lazily from the blosc2 files (only the chunks needed), cropped with a margin and
augmented with batchgenerators' spatial transform (small rotation about the cranio-caudal
axis, mild scaling; no mirroring, which would swap left and right anatomy; no intensity
changes, since the diffusion model must learn real HU statistics). Guidance channels are
cropped and transformed together with the image so they stay voxel-aligned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffprobe.guidance import GUIDANCE_MODES, guidance_channels, guidance_mode, patch_guidance
from diffprobe.preprocessing import volumes
from diffprobe.preprocessing.access import case_summaries
from diffprobe.preprocessing.storage import open_array
from diffprobe.preprocessing.volumes import VolumeRef, read_region

__all__ = ["GUIDANCE_MODES", "PatchBatches", "VolumeRef", "loader", "read_region", "step_rng", "volume_refs"]


def volume_refs(data_dir: Path, identifiers: list[str]) -> list[VolumeRef]:
    """References (shape, spacing) to the cases, from the case index (``access.case_summaries``).

    Why not each properties JSON: parsing them all made start-up grow with the dataset (a labelled
    case's JSON holds thousands of class locations); the index holds the two fields needed. Nothing
    here opens an array: patches are read lazily, per step, in the loader.
    """
    summaries = case_summaries(data_dir)
    refs = []
    for ident in identifiers:
        s = summaries.get(ident)
        if s is None or s.get("shape") is None or s.get("spacing") is None:
            refs.extend(volumes.volume_refs(data_dir, [ident]))  # not indexed: read its JSON (its errors)
        else:
            refs.append(VolumeRef(data_dir, ident, tuple(s["shape"]), tuple(s["spacing"])))
    return refs


def step_rng(seed: int, step: int, rank: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, step, rank, stream]))


def place_short_axes(start: np.ndarray, shape: Sequence[int], patch: Sequence[int],
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """``start`` with every axis shorter than the patch placed inside the patch: centred without ``rng``
    (what the sliding window does: nnU-Net's ``pad_nd_image`` pads both sides), at a uniformly random
    offset with it (training).

    Why random in training: a volume thinner than the patch (the shared labelled CT: 9 slices at 3 mm
    in a 24-slice patch) otherwise sits at one fixed place in every training patch, and the probe
    learns the denoiser's features of exactly that placement. Measured on the shared real CT: a probe
    trained on centred patches fitted its slab (mean Dice 0.75) but fell to 0.02 on the same slices
    when the image had one more slice at 3 mm (the slab one slice off the centre, another phase of the
    strided levels). Top-aligned training (before) never matched the centred prediction at all.
    """
    shape_a, patch_a = np.asarray(shape), np.asarray(patch)
    out = np.array(start, dtype=int)
    for axis in np.flatnonzero(shape_a < patch_a):
        room = int(patch_a[axis] - shape_a[axis])
        out[axis] = -(room // 2 if rng is None else int(rng.integers(0, room + 1)))
    return out


class PatchBatches:
    """``batch(step)`` -> {'image': (B,1,z,y,x), 'guidance': (B,G,z,y,x) or None}."""

    def __init__(self, volumes: list[VolumeRef], patch_size: list[int], batch_size: int, guidance: str = "bpr",
                 augment: bool = True, seed: int = 0, rank: int = 0):
        guidance_mode(guidance).check(volumes)
        self.volumes, self.patch, self.batch_size = volumes, tuple(patch_size), batch_size
        self.guidance, self.augment, self.seed, self.rank = guidance, augment, seed, rank

    @property
    def guidance_channels(self) -> int:
        return guidance_channels(self.guidance)

    def start(self, ref: VolumeRef, rng: np.random.Generator) -> np.ndarray:
        """A uniform random patch start; an axis shorter than the patch lies at a random place inside it."""
        span = np.maximum(np.array(ref.shape) - np.array(self.patch), 0)
        return place_short_axes(np.array([int(rng.integers(0, s + 1)) for s in span]), ref.shape, self.patch, rng)

    def _patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        ref = self.volumes[int(rng.integers(len(self.volumes)))]
        margin = np.array([max(2, p // 6) for p in self.patch]) if self.augment else np.zeros(3, int)
        region = tuple(int(p + 2 * m) for p, m in zip(self.patch, margin))
        start = self.start(ref, rng) - margin
        image = read_region(open_array(ref.data_path), start, region, fill=-1.0)
        guide = patch_guidance(self.guidance, ref, start, region)
        stack = image if guide is None else np.concatenate([image, guide])
        if self.augment:
            stack = self._spatial(stack, rng)
        else:
            stack = stack[(slice(None),) + tuple(slice(0, p) for p in self.patch)]
        return stack[:1], (stack[1:] if guide is not None else None)

    def _spatial(self, stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rotation about the cranio-caudal axis and scaling, one draw for the image and its guidance.

        The image is interpolated with cubic splines (nnU-Net's order for data), the guidance channels
        linearly: they are smooth body coordinates, which linear interpolation reproduces (exactly, where
        a map is linear), and the spline prefilter of three more channels was most of a batch's loading
        (24x64x64 patch, augmented: 103 -> 40 ms on one core). Both calls seed numpy's global RNG alike, so
        they draw the same transform (batchgenerators' draws do not depend on the data)."""
        seed = int(rng.integers(2**31))
        image = self._augment(stack[:1], seed, order=3)
        if stack.shape[0] == 1:
            return image
        return np.concatenate([image, self._augment(stack[1:], seed, order=1)])

    def _augment(self, channels: np.ndarray, seed: int, order: int) -> np.ndarray:
        from batchgenerators.augmentations.spatial_transformations import augment_spatial

        np.random.seed(seed)  # batchgenerators draws from numpy's global RNG
        out, _ = augment_spatial(
            channels[None], None, self.patch, patch_center_dist_from_border=None, do_elastic_deform=False,
            do_rotation=True, angle_x=(-0.17, 0.17), angle_y=(0.0, 0.0), angle_z=(0.0, 0.0),
            do_scale=True, scale=(0.9, 1.1), border_mode_data="nearest", order_data=order, random_crop=False,
            p_rot_per_sample=0.5, p_scale_per_sample=0.5)
        return out[0].astype(np.float32)

    def batch(self, step: int) -> dict[str, torch.Tensor | None]:
        rng = step_rng(self.seed, step, self.rank)
        pairs = [self._patch(rng) for _ in range(self.batch_size)]
        image = torch.from_numpy(np.stack([p[0] for p in pairs]))
        guide = torch.from_numpy(np.stack([p[1] for p in pairs])) if pairs[0][1] is not None else None
        return {"image": image, "guidance": guide, "step": step}


class _StepDataset(Dataset):
    def __init__(self, source: PatchBatches):
        self.source = source

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        return self.source.batch(step)


class _StepsFrom(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            yield step
            step += 1


def _collate(item):
    return item


def _quiet_handover_failures(previous: Callable[..., None]) -> Callable[..., None]:
    """A loader process's ``sys.excepthook`` that drops the OSError / EOFError of a batch hand-over.

    A batch's tensors reach the main process as file descriptors, sent by a thread of the loader
    process (``multiprocessing.resource_sharer``) that reports any failure through ``sys.excepthook``.
    When the main process stops receiving mid-hand-over (Ctrl-C, an error) the send fails with a
    broken connection, and the loader process printed that traceback under the CLI's one-line
    "interrupted" (1 CI run of test_kill_resume, 2026-11-30). Nothing is lost: the main process is
    leaving. Other exceptions still print (through ``previous``).
    """

    def hook(kind, value, tb) -> None:
        if issubclass(kind, (OSError, EOFError)):
            return
        previous(kind, value, tb)

    return hook


def _init_loader_process(worker_id: int) -> None:
    sys.excepthook = _quiet_handover_failures(sys.excepthook)


def loader(source: PatchBatches, start_step: int, num_workers: int = 2) -> Iterator[dict]:
    """Batches for steps start_step, start_step + 1, ... loaded by ``num_workers`` processes (0: in-process)."""
    dl = DataLoader(_StepDataset(source), batch_size=None, sampler=_StepsFrom(start_step), num_workers=num_workers,
                    collate_fn=_collate, prefetch_factor=2 if num_workers else None,
                    persistent_workers=False, worker_init_fn=_init_loader_process if num_workers else None)
    return iter(dl)
