"""Fold heads that share one feature extraction: which probes can, and the per-tile predictor that does.

Fold heads trained on one frozen denoiser see exactly the same features for a tile (the denoiser's
input noise is seeded by the tile position alone, never by the fold or the case's name), so ``predict -f 0 1 2 3 4``
runs the denoiser once per tile and applies the five heads to its features; the heads' logits are
averaged per tile, which equals averaging the folds' Gaussian-weighted windows to float rounding
(the weighting is linear). The noise test-time ensemble (``predict --tta``) keeps that sharing: each
noise draw is one extraction per tile for all the heads (:func:`group_patch_predictor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.predict.acceleration import InferenceSettings, autocast, memory_format
from diffprobe.predict.cuda_graphs import GraphedGroupLogits, graphs_supported
from diffprobe.probe.features import FeatureExtractor, inference_seed
from diffprobe.probe.head import mean_logits
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
            probe.model.extractor.signature, probe.thin_padding)


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


DEFAULT_TTA_DRAWS = 4
"""Noise draws per tile of ``predict --tta`` without ``--tta_draws`` (4x the denoiser work)."""


def tta_draws(tta: bool | int) -> int:
    """Noise draws per tile for a ``tta`` argument: False, 0 or 1 -> 1 (no TTA), True ->
    :data:`DEFAULT_TTA_DRAWS`, an int N >= 2 -> N. (A bool is checked first: ``True == 1`` in Python.)"""
    if isinstance(tta, bool):
        return DEFAULT_TTA_DRAWS if tta else 1
    if int(tta) != tta or tta < 0:
        raise DiffprobeError(f"the number of TTA noise draws must be a whole number >= 1, got {tta}",
                             fix="use e.g. --tta --tta_draws 4 (or leave --tta off)")
    return max(1, int(tta))


LOG_PROB_FLOOR = -100.0
"""Lowest log-probability a noise-ensembled tile returns (e^-100: zero for any argmax). The window
accumulates ``weight x value`` in float16 on CUDA (peak weight 10, a few overlapping tiles): the floor
keeps those sums finite even where a class's probability underflows to 0 (log 0 = -inf)."""


def group_patch_predictor(group: ProbeGroup, device: torch.device, settings: InferenceSettings, draws: int = 1):
    """``predict_patch`` for the sliding window: the group's mean head logits of a batch of tiles.

    Each tile's feature noise is seeded by its start alone (:func:`inference_seed`): the same pixels
    give the same logits whatever the case is called.

    ``draws`` > 1 is the noise test-time ensemble (``predict --tta``): the features are random by
    design (x_t = q_sample(x_0, t, eps)), so each tile is predicted under ``draws`` independent noise
    draws (seeds ``inference_seed(start, d)``, d = 0..draws-1) and the softmax is averaged; the tile
    returns the log of that mean, floored at :data:`LOG_PROB_FLOOR`, and the window averages these over
    overlapping tiles exactly as it averages logits (log-probabilities differ from logits by a per-voxel
    constant, which the final softmax removes). Every draw is one extraction shared by all the group's
    heads, and the draws run one after another: per-forward memory (``tile_batch`` tiles) is
    that of one draw. ``draws`` = 1 returns the plain logits, bit for bit (draw 0 is the plain seed).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    fmt = memory_format(settings)

    def eager_logits(tiles, gtiles, seeds):
        with autocast(device, settings):
            if len(group.probes) == 1:
                return group.first.model(tiles, gtiles, seeds).float()
            feats = group.extractor(tiles, gtiles, seeds)  # once for every head of the group
            return mean_logits([p.model.head for p in group.probes], feats, tuple(tiles.shape[2:]))

    group_logits = eager_logits
    # the graph replays features_of_noisy, which lacks the pooled input of a with_input probe
    if (settings.cuda_graphs and graphs_supported(device) and isinstance(group.extractor, FeatureExtractor)
            and not group.extractor.with_input):
        group_logits = GraphedGroupLogits(group.extractor, [p.model.head for p in group.probes], device,
                                          settings.dtype(device), settings.tile_batch, eager_logits)

    def predict_patch(tiles, gtiles, starts):
        tiles = tiles.contiguous(memory_format=fmt)
        gtiles = gtiles.contiguous(memory_format=fmt) if gtiles is not None else None
        if draws == 1:
            return group_logits(tiles, gtiles, [inference_seed(s) for s in starts])
        log_sum = None  # log of the running sum of the draws' probabilities (stable: logaddexp)
        for draw in range(draws):
            log_p = torch.log_softmax(group_logits(tiles, gtiles, [inference_seed(s, draw) for s in starts]), dim=1)
            log_sum = log_p if log_sum is None else torch.logaddexp(log_sum, log_p)
        return log_sum.sub_(math.log(draws)).clamp_min_(LOG_PROB_FLOOR)

    return predict_patch
