"""Fold heads that share one feature extraction: which probes can, and the per-tile predictor that does.

Fold heads trained on one frozen denoiser see exactly the same features for a tile (the denoiser's
input noise is seeded by the tile position alone, never by the fold or the case's name), so ``predict -f 0 1 2 3 4``
runs the denoiser once per tile and applies the five heads to its features; the heads' logits are
averaged per tile, which equals averaging the folds' Gaussian-weighted windows to float rounding
(the weighting is linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffprobe.predict.acceleration import InferenceSettings, autocast, memory_format
from diffprobe.probe.features import inference_seed
from diffprobe.probe.model import TrainedProbe


@dataclass
class ProbeGroup:
    """Probes whose features are identical, so that one extraction per tile feeds every head.

    Fold heads trained on the same frozen denoiser (same pretrained model and checksum, not
    finetuned) with the same timesteps, levels, noise schedule and patch size see exactly the same
    features: the denoiser's input noise is seeded by the tile position alone, never by the
    fold. A finetuned probe carries its own denoiser and is a group of its own.
    """

    probes: list[TrainedProbe]

    @property
    def first(self) -> TrainedProbe:
        return self.probes[0]

    @property
    def extractor(self) -> torch.nn.Module:
        return self.first.model.extractor


def share_key(probe: TrainedProbe) -> tuple | None:
    """Probes with equal keys share their features; None for a probe that shares with none (finetuned,
    or no recorded checksum of the denoiser weights it was trained on)."""
    meta = probe.meta
    if meta.get("finetune") or not meta.get("pretrained_checksum"):
        return None
    return (meta["pretrained"], meta["pretrained_checksum"], meta.get("guidance"), probe.patch_size,
            probe.model.extractor.signature)


def group_probes(probes: list[TrainedProbe], share: bool = True) -> list[ProbeGroup]:
    """The probes in groups of shared feature extraction, in order of first appearance
    (``share=False``: one group per probe, i.e. one extraction per fold)."""
    groups: list[ProbeGroup] = []
    by_key: dict[tuple, ProbeGroup] = {}
    for probe in probes:
        key = share_key(probe) if share else None
        if key is not None and key in by_key:
            by_key[key].probes.append(probe)
            continue
        groups.append(ProbeGroup([probe]))
        if key is not None:
            by_key[key] = groups[-1]
    return groups


def group_patch_predictor(group: ProbeGroup, device: torch.device, settings: InferenceSettings):
    """``predict_patch`` for the sliding window: the group's mean head logits of a batch of tiles.

    Each tile's feature noise is seeded by its start alone (:func:`inference_seed`): the same pixels
    give the same logits whatever the case is called.
    """
    fmt = memory_format(settings)

    def predict_patch(tiles, gtiles, starts):
        tiles = tiles.contiguous(memory_format=fmt)
        gtiles = gtiles.contiguous(memory_format=fmt) if gtiles is not None else None
        seeds = [inference_seed(s) for s in starts]
        with autocast(device, settings):
            if len(group.probes) == 1:
                return group.first.model(tiles, gtiles, seeds).float()
            feats = group.extractor(tiles, gtiles, seeds)  # once for every head of the group
            shape = tuple(tiles.shape[2:])
            total = None
            for probe in group.probes:
                out = probe.model.head(feats, shape).float()
                total = out if total is None else total.add_(out)
        return total.div_(len(group.probes))

    return predict_patch
