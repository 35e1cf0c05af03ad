"""Labelled patch batches for probe training, deterministic per (seed, step).

Like nnU-Net's loader, the last part of every batch (``oversample_foreground``: default half; nnU-Net
uses a third) is centred on a foreground voxel of a
randomly chosen class present in the case (``oversample_foreground``), so small organs are
seen often; the rest are uniform random crops. Augmentation: ``augment``
(:class:`diffprobe.probe.augment.SpatialAugment`, drawn from a stream of its own so the crops are
the same with and without it) rotates and zooms image, labels and guidance together; no
mirroring (the anatomy is not left-right symmetric); ``intensity`` (:class:`IntensityAugment`)
changes contrast and brightness (enhanced organs differ by tens of HU between patients). An axis
shorter than the patch lies at a random place inside it (``pretraining.data.place_short_axes``),
and ``guidance_shift`` (default 0) offsets each patch's guidance channels by one uniform draw.
``thin_padding``: what fills the rest of such an axis -- ``"mirror"`` (default: image, labels and
guidance mirrored at the volume's ends, ``numpy.pad`` "symmetric": the patch holds anatomy and its labels
throughout, as every patch of a whole scan does; spatially augmented patches read their source box the
same way) or ``"air"`` (the image's air value, the guidance's edge coordinates, background labels).
The predictor pads a thin input as its probe trained (``TrainedProbe.thin_padding``).
Each patch carries its noise seed (case + start: fresh noise per case); the predictor seeds by
tile start alone (``features.inference_seed``), so that a prediction never depends on the case's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffprobe.guidance import patch_guidance
from diffprobe.preprocessing.storage import case_paths, open_array
from diffprobe.pretraining import data as pdata
from diffprobe.probe.augment import IntensityAugment, SpatialAugment, augmented_region
from diffprobe.probe.features import patch_seed
from diffprobe.utils import read_json

THIN_PADDINGS = ("air", "mirror")


def mirror_thin_axes(array: np.ndarray | None, start, shape, size, thin) -> np.ndarray | None:
    """The (C, *size) ``array`` read at ``start`` from a volume of ``shape`` (None passes through), with
    what lies outside the volume along its ``thin`` axes replaced by the volume's own slices mirrored at
    its ends (``numpy.pad`` "symmetric"); other axes keep what the read filled in."""
    if array is None:
        return None
    lo = [max(0, -int(s)) if t else 0 for s, t in zip(start, thin)]
    hi = [min(int(p), int(n) - int(s)) if t else int(p) for s, n, p, t in zip(start, shape, size, thin)]
    if all(a == 0 and b == p for a, b, p in zip(lo, hi, size)):
        return array
    inside = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))
    widths = [(0, 0)] + [(a, int(p) - b) for a, b, p in zip(lo, hi, size)]
    return np.pad(array[inside], widths, mode="symmetric")


@dataclass(frozen=True)
class LabelledVolume:
    ref: pdata.VolumeRef
    class_locations: dict[str, list[list[int]]]

    @property
    def seg_path(self):
        return case_paths(self.ref.data_dir, self.ref.identifier)["seg"]


def labelled_volumes(refs: list[pdata.VolumeRef]) -> list[LabelledVolume]:
    """The refs' class locations (from the preprocessing properties); refs must be labelled."""
    out = []
    for ref in refs:
        props = read_json(case_paths(ref.data_dir, ref.identifier)["properties"])
        out.append(LabelledVolume(ref, props.get("class_locations") or {}))
    return out


class LabelledPatches:
    """``batch(step)`` -> image (B,1,z,y,x), seg (B,z,y,x) int64, guidance or None, seeds (list of int)."""

    def __init__(self, volumes: list[LabelledVolume], patch_size: list[int], batch_size: int, guidance: str,
                 oversample_foreground: float = 0.33, seed: int = 0, rank: int = 0, guidance_shift: float = 0.0,
                 augment: SpatialAugment | None = None, intensity: IntensityAugment | None = None,
                 thin_padding: str = "mirror"):
        if not volumes:
            raise ValueError("no labelled volumes")
        self.volumes, self.patch, self.batch_size = volumes, tuple(int(p) for p in patch_size), batch_size
        self.guidance, self.oversample, self.seed, self.rank = guidance, oversample_foreground, seed, rank
        self.guidance_shift = float(guidance_shift)
        self.augment = augment if augment is not None and augment.p > 0 else None
        self.intensity = intensity if intensity is not None and intensity.p > 0 else None
        if thin_padding not in THIN_PADDINGS:
            raise ValueError(f"thin_padding must be one of {THIN_PADDINGS}, got {thin_padding!r}")
        self.thin_padding = thin_padding

    def _start(self, vol: LabelledVolume, rng: np.random.Generator, foreground: bool) -> np.ndarray:
        shape, patch = np.array(vol.ref.shape), np.array(self.patch)
        span = np.maximum(shape - patch, 0)
        present = [k for k, locs in vol.class_locations.items() if locs]
        if foreground and present:
            locs = vol.class_locations[present[int(rng.integers(len(present)))]]
            centre = np.array(locs[int(rng.integers(len(locs)))])
            start = np.clip(centre - patch // 2, 0, span)
        else:
            start = np.array([int(rng.integers(0, s + 1)) for s in span])
        # an axis shorter than the patch at a random place inside it: every placement the sliding
        # window's centring can give, never one fixed one (pretraining.data.place_short_axes)
        return pdata.place_short_axes(start, shape, patch, rng)

    def patch_at(self, vol: LabelledVolume, start: np.ndarray, shift: np.ndarray | None = None,
                 matrix: np.ndarray | None = None) -> dict:
        """The patch at ``start``; ``matrix`` (``SpatialAugment.draw``) resamples it rotated / zoomed."""
        ref = vol.ref
        seed = patch_seed(ref.identifier, start)
        plain = {
            "image": lambda at, size: pdata.read_region(open_array(ref.data_path), at, size, fill=-1.0),
            "seg": lambda at, size: pdata.read_region(open_array(vol.seg_path), at, size, fill=0.0),
            "guidance": lambda at, size: patch_guidance(self.guidance, ref, at, size),
        }
        readers = plain
        if self.thin_padding == "mirror":  # thin axes: the volume's own slices mirrored, not the fill
            thin = [int(n) < p for n, p in zip(ref.shape, self.patch)]
            readers = {k: (lambda at, size, read=read: mirror_thin_axes(read(at, size), at, ref.shape, size, thin))
                       for k, read in plain.items()}
        if matrix is None:
            image, seg, guide = (read(start, self.patch) for read in readers.values())
        else:
            image = augmented_region(readers["image"], start, self.patch, matrix, order=1)
            seg = augmented_region(readers["seg"], start, self.patch, matrix, order=0)
            guide = (augmented_region(readers["guidance"], start, self.patch, matrix, order=1)
                     if self.guidance != "none" else None)
        seg = seg[0]
        if guide is not None and shift is not None:
            guide = guide + shift.astype(np.float32)[:, None, None, None]
        return {"image": image, "seg": seg.astype(np.int64), "guidance": guide, "seed": seed}

    def batch(self, step: int) -> dict:
        rng = pdata.step_rng(self.seed, step, self.rank, stream=2)
        aug_rng = pdata.step_rng(self.seed, step, self.rank, stream=3)
        intensity_rng = pdata.step_rng(self.seed, step, self.rank, stream=4)
        n_random = round(self.batch_size * (1 - self.oversample))
        items = []
        for i in range(self.batch_size):
            vol = self.volumes[int(rng.integers(len(self.volumes)))]
            start = self._start(vol, rng, foreground=i >= n_random)
            shift = None
            if self.guidance_shift > 0:  # drawn only when asked: batches without it stay as they were
                shift = rng.uniform(-self.guidance_shift, self.guidance_shift, 3)
            matrix = self.augment.draw(aug_rng, vol.ref.spacing) if self.augment else None
            item = self.patch_at(vol, start, shift, matrix)
            drawn = self.intensity.draw(intensity_rng) if self.intensity else None
            if drawn is not None:
                item["image"] = self.intensity.apply(item["image"], drawn)
            items.append(item)
        return collate(items) | {"step": step}


def collate(items: list[dict]) -> dict:
    guide = items[0]["guidance"]
    return {
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),
        "seg": torch.from_numpy(np.stack([it["seg"] for it in items])),
        "guidance": torch.from_numpy(np.stack([it["guidance"] for it in items])) if guide is not None else None,
        "seeds": [it["seed"] for it in items],
    }
