"""Multi-scale, multi-timestep features of the frozen denoiser (the probe's input).

For a clean patch x_0 and each planned timestep t, x_t = q_sample(x_0, t, eps) is fed to the
denoiser together with the guidance channels; the decoder taps ``dec{l}`` are concatenated
over timesteps per scale. All timesteps of all patches go through the network in one
batched forward (``batched=False`` runs one forward per timestep, for the benchmark).

Determinism: eps of a patch is drawn from a CPU generator seeded by the patch seed and the
timestep, so the same input always gives the same features, on any device, whatever the batch
composition. Training seeds by case identifier and patch position (:func:`patch_seed`: fresh noise
per case); inference by the tile position alone (:func:`inference_seed`), so a prediction depends
on the pixels only, never on the file's name, folder or the order of the cases.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from diffprobe.diffusion import GaussianDiffusion
from diffprobe.models import DiffusionUNet
from diffprobe.probe.input_features import input_stack, pool_to_strides


def patch_seed(identifier: str, start: Sequence[int]) -> int:
    """A 31-bit seed from the case identifier and the patch start (z, y, x) on the preprocessed grid."""
    key = f"{identifier}:{','.join(str(int(s)) for s in start)}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


INFERENCE_SEED_KEY = "features"  # the key `diffprobe features` (predict/embeddings.py) seeds its tiles with


def inference_seed(start: Sequence[int], draw: int = 0) -> int:
    """The seed of a tile's feature noise at inference: its start (z, y, x) on the preprocessed grid only.

    Not the case name: the same pixels under another name, in another folder or another ``-num_parts``
    split must give the same segmentation. Not a hash of the pixels either: a one-ulp difference in
    the preprocessed volume (another platform's resampling) would redraw every tile's noise and move
    the output far more than the pixels moved.

    ``draw``: the index of an independent noise draw for the same tile (``predict --tta``, the
    noise ensemble). Draw 0 is the plain prediction's seed, so one draw *is* the prediction without
    TTA; draw d > 0 hashes ``"features#d"`` instead of ``"features"`` (another crc32: independent noise).
    """
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    return patch_seed(INFERENCE_SEED_KEY if draw == 0 else f"{INFERENCE_SEED_KEY}#{int(draw)}", start)


def _fill_normal(out: Tensor, seed: int) -> None:
    torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), out=out)


@functools.lru_cache(maxsize=1)
def _noise_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)), thread_name_prefix="noise")


def batch_noise(shape: Sequence[int], seeds: Sequence[int], timesteps: Sequence[int], pinned: bool = False,
                threads: bool = False) -> Tensor:
    """(B*T, *shape) CPU noise, patch-major: row ``b*T + j`` is the draw of (``seeds[b]``, ``timesteps[j]``).

    Each row has its own generator, so the rows can be drawn in parallel (``threads``: a small pool,
    for a GPU host, where one thread drew a paper-class tile batch's noise in 15-85 ms while the GPU
    waited) and are the same bits however they are drawn. ``pinned``: page-locked, so the copy to a
    GPU can be asynchronous."""
    jobs = [int(s) * 1009 + int(t) for s in seeds for t in timesteps]
    out = torch.empty((len(jobs), *(int(v) for v in shape)), pin_memory=pinned)
    if threads and len(jobs) > 1:
        list(_noise_pool().map(_fill_normal, out.unbind(0), jobs))
    else:
        for row, seed in zip(out.unbind(0), jobs):
            _fill_normal(row, seed)
    return out


class FeatureExtractor(nn.Module):
    """Frozen denoiser -> ``{"dec{l}": (B, T * C_l, z_l, y_l, x_l)}`` for the levels the probe reads.

    Args:
        denoiser: the pretrained denoiser (EMA weights); frozen unless ``trainable``.
        diffusion: the noise schedule it was trained with.
        timesteps: feature timesteps (paper: 10, 30, 60 of a linear 1000-step schedule).
        levels: decoder levels to return (default: all). The decoder stops at the finest one
            read, so reading only coarse levels skips the expensive full-resolution stages.
        trainable: fine-tuning (gradients flow into the denoiser).
        with_input: each level also carries the clean input (image ⊕ guidance channels), average-pooled
            to the level's stride, after the features. Why: the frozen features barely depend on the
            guidance (shifting the BPR coordinates by 100 mm relabels 16 % of a whole scan's foreground,
            a UNet trained from scratch on the same input 48 %), so a head on them alone cannot use
            where a voxel is; the position the paper's guidance gives is then handed to the head
            directly (``docs/results.md``, "The head reads the guidance too").
    """

    def __init__(self, denoiser: DiffusionUNet, diffusion: GaussianDiffusion, timesteps: Sequence[int],
                 levels: Sequence[int] | None = None, trainable: bool = False, with_input: bool = False) -> None:
        super().__init__()
        if not timesteps:
            raise ValueError("at least one feature timestep is needed")
        bad = [t for t in timesteps if not 0 <= int(t) < diffusion.num_timesteps]
        if bad:
            raise ValueError(f"timesteps {bad} are outside [0, {diffusion.num_timesteps - 1}]")
        self.denoiser = denoiser
        self.diffusion = diffusion
        self.timesteps = [int(t) for t in timesteps]
        self.levels = sorted(set(range(denoiser.num_levels) if levels is None else (int(v) for v in levels)))
        if not self.levels or not 0 <= self.levels[0] <= self.levels[-1] < denoiser.num_levels:
            raise ValueError(f"levels must lie in [0, {denoiser.num_levels - 1}], got {levels}")
        self.trainable = trainable
        self.with_input = bool(with_input)
        if not trainable:
            for p in self.denoiser.parameters():
                p.requires_grad_(False)

    @property
    def feature_channels(self) -> dict[str, int]:
        extra = self.denoiser.in_channels + self.denoiser.guidance_channels if self.with_input else 0
        return {f"dec{lv}": self.denoiser.feature_channels[f"dec{lv}"] * len(self.timesteps) + extra
                for lv in self.levels}

    @property
    def feature_strides(self) -> dict[str, tuple[int, ...]]:
        return {f"dec{lv}": self.denoiser.feature_strides[f"dec{lv}"] for lv in self.levels}

    @property
    def signature(self) -> tuple:
        """What the features depend on besides the denoiser's weights: timesteps, levels read and the
        noise schedule. Two extractors with equal weights and equal signatures give identical features."""
        betas = self.diffusion.betas
        return (tuple(self.timesteps), tuple(self.levels), torch.as_tensor(betas).double().cpu().numpy().tobytes(),
                self.with_input)

    def network_summary(self, patch_size: Sequence[int]) -> dict:
        """The denoiser as a plans-style network dict for one tile of ``patch_size`` (``levels`` with
        ``tokens``, ``channels``, ``attention``; ``blocks_per_level``): what predict's RAM bound needs."""
        den = self.denoiser
        levels = []
        for i in range(den.num_levels):
            stride = den.feature_strides[f"dec{i}"]
            tokens = math.prod(max(1, int(p) // int(s)) for p, s in zip(patch_size, stride, strict=True))
            levels.append({"tokens": tokens, "channels": int(den.channels[i]), "attention": den.level_attention[i]})
        return {"levels": levels, "blocks_per_level": len(den.encoder[0].blocks)}

    def train(self, mode: bool = True) -> FeatureExtractor:
        """A frozen denoiser stays in eval mode whatever the head does."""
        super().train(mode)
        if not self.trainable:
            self.denoiser.eval()
        return self

    def _timesteps_on(self, device: torch.device) -> Tensor:
        """The feature timesteps as a tensor on ``device``, made once per device (a host copy per tile batch
        made the host wait for the GPU)."""
        cache = self.__dict__.setdefault("_timestep_tensors", {})
        if str(device) not in cache:
            cache[str(device)] = torch.tensor(self.timesteps, device=device)
        return cache[str(device)]

    def noisy_inputs(self, x0: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """x_t for every (patch, timestep), patch-major: row ``b * T + j`` is patch b at timestep j."""
        b, tn = x0.shape[0], len(self.timesteps)
        if len(seeds) != b:
            raise ValueError(f"one seed per patch needed: {b} patches, {len(seeds)} seeds")
        cuda = x0.is_cuda
        noise = batch_noise(x0.shape[1:], seeds, self.timesteps, pinned=cuda, threads=cuda)
        noise = noise.to(device=x0.device, dtype=x0.dtype, non_blocking=cuda)
        t = self._timesteps_on(x0.device).repeat(b)
        x0_rep = x0.repeat_interleave(tn, dim=0)
        return self.diffusion.q_sample(x0_rep, t, noise), t

    def features_of_noisy(self, xt: Tensor, t: Tensor, guidance: Tensor | None) -> dict[str, Tensor]:
        """The batched extraction from ``noisy_inputs``' result onwards: device work only, no host
        tensors and no synchronisation, so that ``predict`` can replay it as one CUDA graph
        (``predict.cuda_graphs``). ``guidance`` is per patch (B, G, ...); ``xt`` patch-major (B*T, ...)."""
        tn = len(self.timesteps)
        b = xt.shape[0] // tn
        g = guidance.repeat_interleave(tn, dim=0) if guidance is not None else None
        _, feats = self.denoiser(xt, t, g, return_features=True, max_level=self.levels[0], return_output=False)
        return {k: _merge_timesteps(feats[k], b, tn) for k in self.feature_channels}

    def forward(self, x0: Tensor, guidance: Tensor | None, seeds: Sequence[int],
                batched: bool = True) -> dict[str, Tensor]:
        feats = self._denoiser_features(x0, guidance, seeds, batched)
        return with_pooled_input(feats, x0, guidance, self.feature_strides) if self.with_input else feats

    def _denoiser_features(self, x0: Tensor, guidance: Tensor | None, seeds: Sequence[int],
                           batched: bool) -> dict[str, Tensor]:
        b, tn = x0.shape[0], len(self.timesteps)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            xt, t = self.noisy_inputs(x0, seeds)
            if batched:
                return self.features_of_noisy(xt, t, guidance)
            per_t: dict[str, list[Tensor]] = {k: [] for k in self.feature_channels}
            xt = xt.view(b, tn, *xt.shape[1:])
            for j in range(tn):
                _, feats = self.denoiser(xt[:, j], t[j:j + 1].expand(b), guidance, return_features=True,
                                         max_level=self.levels[0], return_output=False)
                for k in per_t:
                    per_t[k].append(feats[k])
            return {k: torch.cat(v, dim=1) for k, v in per_t.items()}


def with_pooled_input(feats: dict[str, Tensor], x0: Tensor, guidance: Tensor | None,
                      strides: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Each level's features ⊕ the clean input (image ⊕ guidance) average-pooled to its stride, as the
    no-backbone control reads it (:mod:`diffprobe.probe.input_features`)."""
    pooled = pool_to_strides(input_stack(x0, guidance), {key: strides[key] for key in feats})
    return {key: torch.cat([f, pooled[key][..., : f.shape[2], : f.shape[3], : f.shape[4]].to(f.dtype)], dim=1)
            for key, f in feats.items()}


def _merge_timesteps(f: Tensor, b: int, tn: int) -> Tensor:
    """(B*T, C, ...) patch-major -> (B, T*C, ...) with timestep j's channels at [j*C, (j+1)*C)."""
    return f.reshape(b, tn * f.shape[1], *f.shape[2:])
