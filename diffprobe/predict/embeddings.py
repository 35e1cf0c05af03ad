"""Voxel embeddings for research use: the frozen denoiser's multi-timestep features of a whole volume.

``diffprobe features -i IN -o OUT.npz --pretrained NAME`` reads an image (file or DICOM series),
preprocesses it as the pretrained model was trained (spacing, crop, normalisation from its plans
snapshot), computes the guidance channels of the whole volume, and runs the feature extractor
over tiles (the model's patch, half-overlapping). Each decoder level ``dec{l}`` is stitched at its
own stride (features of overlapping tiles averaged), so the output stays the size the network
computes instead of upsampling every channel to full resolution.

The ``.npz`` holds, per level read, ``dec{l}``: float16 (T * C_l, z_l, y_l, x_l) with the
timesteps' channels in blocks (timestep j at [j*C_l, (j+1)*C_l)), ``dec{l}_stride`` (z, y, x)
relative to the preprocessed grid; plus ``image`` (the preprocessed volume, float16, 1 x z x y x),
``spacing`` (mm, z, y, x of the preprocessed grid), ``timesteps``, ``levels`` and ``crop_bbox``
(where the preprocessed grid lies in the canonical input). The noise of each tile is seeded from
its position only, so the same input always gives the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.guidance import volume_guidance
from diffprobe.preprocessing.preprocess import preprocess_input
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.probe.features import FeatureExtractor, inference_seed
from diffprobe.utils import atomic_path


def _starts(size: int, patch: int, step: int) -> list[int]:
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, step)) + [size - patch]
    return sorted(set(starts))


def tile_starts(shape: tuple[int, ...], patch: list[int], strides: list[list[int]]) -> list[tuple[int, int, int]]:
    """Half-overlapping tile starts, each a multiple of every level's stride (so tiles align per level)."""
    lcm = [int(np.lcm.reduce([s[a] for s in strides])) for a in range(3)]
    steps = [max(lcm[a], (patch[a] // 2) // lcm[a] * lcm[a]) for a in range(3)]
    per_axis = []
    for a in range(3):
        starts = _starts(shape[a], patch[a], steps[a])
        per_axis.append(sorted({(s // lcm[a]) * lcm[a] for s in starts}))
    return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]


@torch.no_grad()
def volume_features(extractor: FeatureExtractor, data: np.ndarray, guidance: torch.Tensor | None,
                    patch: list[int], device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Stitched features ``{dec{l}: (T*C, z_l, y_l, x_l)}`` of a preprocessed volume (C, z, y, x)."""
    shape = data.shape[1:]
    padded = [max(s, p) for s, p in zip(shape, patch)]
    volume = np.full((data.shape[0], *padded), -1.0, dtype=np.float32)
    volume[(slice(None),) + tuple(slice(0, s) for s in shape)] = data
    guide = None
    if guidance is not None:
        guide = torch.zeros((guidance.shape[0], *padded), dtype=torch.float32)
        guide[(slice(None),) + tuple(slice(0, s) for s in shape)] = guidance.float().cpu()
    strides = {k: list(v) for k, v in extractor.feature_strides.items()}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    # the tiling follows every level's stride, not only the ones read: a subset of levels gives the same arrays
    every = [list(v) for v in extractor.denoiser.feature_strides.values()]
    for start in tile_starts(tuple(padded), patch, every):
        region = tuple(slice(s, s + p) for s, p in zip(start, patch))
        x0 = torch.from_numpy(volume[(slice(None),) + region][None]).to(device)
        g = guide[(slice(None),) + region][None].to(device) if guide is not None else None
        feats = extractor(x0, g, [inference_seed(start)])
        for key, f in feats.items():
            st = strides[key]
            if key not in sums:
                sums[key] = np.zeros((f.shape[1], *[-(-p // s) for p, s in zip(padded, st)]), dtype=np.float32)
                counts[key] = np.zeros(sums[key].shape[1:], dtype=np.float32)
            lo = [s // k for s, k in zip(start, st)]
            sl = tuple(slice(a, a + n) for a, n in zip(lo, f.shape[2:]))
            sums[key][(slice(None),) + sl] += f[0].float().cpu().numpy()
            counts[key][sl] += 1
    out = {}
    for key, total in sums.items():
        st = strides[key]
        keep = tuple(slice(0, -(-s // k)) for s, k in zip(shape, st))
        out[key] = (total / np.maximum(counts[key], 1))[(slice(None),) + keep]
    return out


def extract_features(image: str | Path, output: str | Path, pretrained: str, levels: list[int] | None = None,
                     timesteps: list[int] | None = None, device: str | torch.device = "cpu") -> Path:
    """Write the multi-timestep features of one input volume to ``output`` (.npz, atomically)."""
    from diffprobe.predict.inputs import input_cases

    model = PretrainedModel(pretrained)
    plans = model.plans
    output = Path(output)
    if output.suffix != ".npz":
        raise DiffprobeError("the output must be a .npz file", output, "name it e.g. features.npz")
    cases = input_cases(Path(image), len(plans.channel_names))
    if len(cases) != 1:
        raise DiffprobeError(f"one input volume expected, found {len(cases)}", image,
                             "pass a single image file or one DICOM series folder")
    data, props = preprocess_input(cases[0], plans.raw, plans.dataset)
    timesteps = [int(t) for t in (timesteps or plans.feature_timesteps)]
    denoiser = model.load_denoiser(device)
    try:
        extractor = FeatureExtractor(denoiser, GaussianDiffusion.from_plans(plans.raw), timesteps, levels)
    except ValueError as e:
        raise DiffprobeError(str(e), model.meta_path, "choose --levels and --t within the model's range") from None
    bpr, crop = model.load_bpr(device) if model.guidance == "bpr" else (None, None)
    guidance = volume_guidance(model.guidance, data, plans.target_spacing, bpr, crop)
    feats = volume_features(extractor, data, guidance, plans.patch_size, device)
    arrays = {k: v.astype(np.float16) for k, v in feats.items()}
    arrays.update({f"{k}_stride": np.asarray(extractor.feature_strides[k]) for k in feats})
    arrays.update({"image": data.astype(np.float16), "spacing": np.asarray(plans.target_spacing),
                   "timesteps": np.asarray(timesteps), "levels": np.asarray(extractor.levels),
                   "crop_bbox": np.asarray(props["bbox"], dtype=np.int64),
                   "meta": np.asarray(json.dumps({"pretrained": pretrained, "checksum": model.checksum(),
                                                  "guidance": model.guidance}))})
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, ".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return output
