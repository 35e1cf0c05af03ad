"""A pool of precomputed frozen features, so a frozen probe trains many steps per extraction.

Why: with a frozen denoiser, a patch's features are a fixed function of (patch, noise seed).
Extracting them (one denoiser forward per timestep) costs far more than a step of the small
pointwise head, and the head needs thousands of steps to converge; on a CPU, extracting fresh
features for every step would make probing slower than pretraining. The pool extracts the
features of ``size`` patches once and the head trains on random batches drawn from it; every
``refresh_every`` steps a new pool of new patches replaces it, so the head still sees many
distinct patches over a run.

Determinism (resume equals uninterrupted): pool ``e`` holds the patches of source batches
``e * n .. (e + 1) * n - 1`` and the batch of step ``s`` is drawn by a generator seeded by
(seed, s), so a resumed run rebuilds exactly the pool and batches an uninterrupted run had.

Memory: the pool is stored in float16 and sized to fit ``budget_gb``
(:func:`pool_size_for_budget`); when not even one batch fits, the caller extracts on the fly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from diffprobe.probe.data import LabelledPatches
from diffprobe.probe.features import FeatureExtractor


def feature_bytes_per_patch(extractor: FeatureExtractor, patch_size: list[int] | tuple[int, ...],
                            bytes_per_value: int = 2) -> int:
    """Bytes one patch's features take in the pool (float16 by default)."""
    total = 0
    for key, channels in extractor.feature_channels.items():
        stride = extractor.feature_strides[key]
        total += channels * math.prod(math.ceil(p / s) for p, s in zip(patch_size, stride, strict=True))
    return total * bytes_per_value


def pool_size_for_budget(wanted: int, batch_size: int, per_patch_bytes: int, budget_gb: float) -> int:
    """The pool size (a multiple of ``batch_size``, at most ``wanted``) that fits ``budget_gb``; 0: none fits."""
    fit = int(budget_gb * 1024**3 // max(per_patch_bytes, 1))
    size = min(wanted, fit)
    return (size // batch_size) * batch_size


class FeaturePool:
    """``batch(step)`` -> {"features": {"dec{l}": (B, C, ...)}, "seg": (B, z, y, x), "shape": (z, y, x)}.

    Args:
        extractor: the frozen feature extractor (features are taken without gradients).
        source: labelled patches; its ``batch(i)`` (of its own batch size) fills the pool.
        size: patches per pool (a multiple of the source's batch size).
        batch_size: patches per training step.
        refresh_every: steps between pool rebuilds.
        seed: seeds the per-step choice of pool entries.
        device: where features are extracted and the pool is kept.
    """

    def __init__(self, extractor: FeatureExtractor, source: LabelledPatches, size: int, batch_size: int,
                 refresh_every: int, seed: int, device: torch.device | str) -> None:
        if size < batch_size or size % source.batch_size:
            raise ValueError(f"pool size {size} must be >= the batch size {batch_size} and a multiple of the "
                             f"source batch size {source.batch_size}")
        self.extractor, self.source, self.size = extractor, source, size
        self.batch_size, self.refresh_every, self.seed = batch_size, max(1, refresh_every), seed
        self.device = torch.device(device)
        self._epoch: int | None = None
        self._features: dict[str, Tensor] = {}
        self._seg: Tensor | None = None
        self._shape: tuple[int, ...] = ()

    @torch.no_grad()
    def _fill(self, epoch: int) -> None:
        per = self.source.batch_size
        n = self.size // per
        feats: dict[str, list[Tensor]] = {}
        segs = []
        self._features, self._seg = {}, None  # free the old pool before building the new one
        for i in range(epoch * n, (epoch + 1) * n):
            b = self.source.batch(i)
            g = b["guidance"].to(self.device) if b["guidance"] is not None else None
            out = self.extractor(b["image"].to(self.device), g, b["seeds"])
            for k, v in out.items():
                feats.setdefault(k, []).append(v.to(torch.float16))
            segs.append(b["seg"])
        self._features = {k: torch.cat(v) for k, v in feats.items()}
        self._seg = torch.cat(segs)
        self._shape = tuple(self._seg.shape[1:])
        self._epoch = epoch

    def batch(self, step: int) -> dict:
        epoch = step // self.refresh_every
        if epoch != self._epoch:
            self._fill(epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randperm(self.size, generator=g)[: self.batch_size]
        dev_idx = idx.to(self.device)
        return {"features": {k: v[dev_idx].float() for k, v in self._features.items()},
                "seg": self._seg[idx], "shape": self._shape, "step": step}

    def batches(self, start_step: int) -> Iterator[dict]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
