"""The predictor as an object: fold heads on one frozen denoiser share one feature extraction per
tile (same labels as averaging the folds' own windows), settings reach the RAM bound, and the BPR's
whole-volume inference runs through the same tile loop with unchanged outputs."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from test_predict import SMALL, read_array, write_case

from diffprobe.bpr import BodyPartRegressor, predict_coordinates
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.models import DiffusionUNet
from diffprobe.predict import predictor
from diffprobe.predict.acceleration import InferenceSettings
from diffprobe.predict.memory import estimate_for_input
from diffprobe.predict.predictor import Predictor, group_probes, predict, predict_logits
from diffprobe.predict.sliding_window import sliding_window_logits, window_starts
from diffprobe.probe.features import FeatureExtractor, inference_seed
from diffprobe.probe.head import build_head
from diffprobe.probe.model import ProbeModel, TrainedProbe, load_trained_probe, probe_dir
from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint

CONFIG = "tiny__fpn"


# ---- two folds on disk: the fixture's probe and a copy with a perturbed head -----------------
@pytest.fixture
def two_folds(use_trained_probe_roots, tmp_path, monkeypatch) -> list[Path]:
    """Results root copied (the session's stays untouched), with fold '1' = fold 'all' + head noise."""
    results = tmp_path / "results"
    shutil.copytree(use_trained_probe_roots["results"], results)
    monkeypatch.setenv("DIFFPROBE_RESULTS", str(results))
    first = probe_dir(1, CONFIG, "all")
    second = first.parent / "fold_1"
    shutil.copytree(first, second)
    ckpt = load_checkpoint(second / "checkpoint_final.pt")
    g = torch.Generator().manual_seed(1)
    ckpt["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    save_checkpoint(second / "checkpoint_final.pt", ckpt)
    return [first, second]


def _count_denoiser_and_tiles(monkeypatch) -> dict[str, int]:
    """Counts every denoiser forward (hooked at load) and every tile the sliding windows predict."""
    counts = {"denoiser": 0, "tiles": 0}
    real_load, real_window = predictor.load_trained_probe, predictor.sliding_window_logits

    def load(folder, device="cpu"):
        probe = real_load(folder, device)
        probe.model.extractor.denoiser.register_forward_hook(lambda *a: counts.__setitem__("denoiser",
                                                                                             counts["denoiser"] + 1))
        return probe

    def window(volume, guidance, predict_patch, *args, **kwargs):
        def counted(tiles, gtiles, starts):
            counts["tiles"] += len(starts)
            return predict_patch(tiles, gtiles, starts)

        return real_window(volume, guidance, counted, *args, **kwargs)

    monkeypatch.setattr(predictor, "load_trained_probe", load)
    monkeypatch.setattr(predictor, "sliding_window_logits", window)
    return counts


def test_two_folds_run_the_denoiser_once_per_tile_with_the_same_labels(two_folds, tmp_path, monkeypatch):
    write_case(tmp_path / "in", "a", shape=(24, 72, 80), seed=3)  # several tiles of the tiny preset's patch
    counts = _count_denoiser_and_tiles(monkeypatch)
    runs = {}
    for name, folds, share in [("one", ["all"], True), ("shared", ["all", "1"], True),
                               ("per_fold", ["all", "1"], False)]:
        counts.update(denoiser=0, tiles=0)
        settings = InferenceSettings(tile_batch=1, pipeline=False, share_features=share)
        out = predict(tmp_path / "in", tmp_path / name, dataset=1, configuration=CONFIG, folds=folds, device="cpu",
                      show_progress=False, settings=settings)
        runs[name] = (dict(counts), read_array(out[0]))
    tiles = runs["one"][0]["tiles"]
    assert tiles > 1 and runs["one"][0]["denoiser"] == tiles          # tile_batch 1: one forward per tile
    assert runs["shared"][0] == {"denoiser": tiles, "tiles": tiles}   # two folds: still one forward per tile
    assert runs["per_fold"][0] == {"denoiser": 2 * tiles, "tiles": 2 * tiles}  # before: one per fold and tile
    # Same labels as the per-fold windows averaged (the old path); the perturbed head made them differ.
    np.testing.assert_array_equal(runs["shared"][1], runs["per_fold"][1])
    assert not np.array_equal(runs["one"][1], runs["shared"][1])


def test_shared_logits_equal_the_mean_of_each_folds_window(two_folds):
    probes = [load_trained_probe(f) for f in two_folds]
    volume = np.random.default_rng(0).uniform(-1, 0.5, size=(1, 20, 60, 52)).astype(np.float32)
    ident, spacing, dev = "v", [2.0, 1.0, 1.0], torch.device("cpu")
    guidance = predictor.volume_guidance(probes[0], volume, ident, spacing, dev)
    windows = []
    for probe in probes:  # the old path: each fold's own window, then the mean
        def predict_patch(tiles, gtiles, starts, probe=probe):
            return probe.model(tiles, gtiles, [inference_seed(s) for s in starts])

        windows.append(sliding_window_logits(torch.from_numpy(volume), guidance, predict_patch, probe.num_classes,
                                             probe.patch_size, batch_size=2))
    reference = torch.stack(windows).mean(0)
    assert len(group_probes(probes)) == 1
    logits = predict_logits(probes, volume, spacing, dev, settings=InferenceSettings(channels_last=False))
    assert (logits - reference).abs().max().item() <= 1e-5 * max(reference.abs().max().item(), 1.0)
    assert torch.equal(logits.argmax(0), reference.argmax(0))
    assert not torch.equal(windows[0].argmax(0), windows[1].argmax(0))  # the folds do disagree somewhere


# ---- grouping --------------------------------------------------------------------------------
def _tiny_probe(seed: int, finetune: bool = False, timesteps=(10, 30), pretrained: str = "p") -> TrainedProbe:
    torch.manual_seed(seed)
    levels = [{"stride_from_previous": [1, 1, 1], "channels": 8, "attention": "linear"},
              {"stride_from_previous": [1, 2, 2], "channels": 16, "attention": "softmax"}]
    denoiser = DiffusionUNet(1, 0, levels, blocks_per_level=1).eval()
    extractor = FeatureExtractor(denoiser, GaussianDiffusion(num_timesteps=100), list(timesteps), trainable=finetune)
    model = ProbeModel(extractor, build_head("linear", extractor.feature_channels, 3)).eval()
    meta = {"pretrained": pretrained, "pretrained_checksum": "c", "finetune": finetune, "guidance": "none",
            "patch_size": [4, 8, 8], "num_classes": 3}
    return TrainedProbe(Path("."), meta, model, None, None)


def test_grouping_shares_only_identical_features():
    a, b = _tiny_probe(0), _tiny_probe(0)
    assert [len(g.probes) for g in group_probes([a, b])] == [2]
    assert [len(g.probes) for g in group_probes([a, b], share=False)] == [1, 1]
    assert len(group_probes([a, _tiny_probe(0, finetune=True), _tiny_probe(0, finetune=True)])) == 3
    assert len(group_probes([a, _tiny_probe(0, timesteps=(10, 60))])) == 2
    assert len(group_probes([a, _tiny_probe(0, pretrained="q")])) == 2
    # Predictor owns its probes: one denoiser module per group, and the logits are the heads' mean.
    volume = np.random.default_rng(1).uniform(-1, 1, size=(1, 6, 12, 10)).astype(np.float32)
    reference = torch.stack([predict_logits([p], volume, [1.0] * 3, torch.device("cpu"))
                             for p in (a, b)]).mean(0)
    owned = Predictor([a, b], "cpu", InferenceSettings(channels_last=False))
    assert a.model.extractor is b.model.extractor
    torch.testing.assert_close(owned.logits(volume, spacing=[1.0] * 3), reference, rtol=1e-5, atol=1e-5)


# ---- the RAM bound sees the settings -----------------------------------------------------------
def test_ram_estimate_grows_with_tile_batch(two_folds, tmp_path):
    image = write_case(tmp_path / "in", "a", shape=SMALL)
    meta = load_trained_probe(two_folds[0]).meta
    by_batch = [estimate_for_input(image, meta, tile_batch=b).window_bytes for b in (1, 2, 4)]
    assert by_batch[0] < by_batch[1] < by_batch[2]
    network_1 = by_batch[1] - by_batch[0]  # the denoiser's working memory of one tile
    assert by_batch[2] - by_batch[1] == pytest.approx(2 * network_1)
    bf16 = estimate_for_input(image, meta, tile_batch=4, bf16=True).window_bytes
    assert by_batch[2] - bf16 == pytest.approx(2 * network_1)  # bf16 activations count half
    # Through the predictor: its settings' tile batch, the loaded denoiser's levels at the tile size,
    # and shared folds count one window (no second K x volume sum).
    case = predictor.input_cases(tmp_path / "in", 1)[0]
    needs = {b: Predictor.from_folders(two_folds, "cpu", InferenceSettings(tile_batch=b)).memory_need(case)
             for b in (1, 4)}
    assert needs[1].window_bytes < needs[4].window_bytes and needs[1].total_bytes <= needs[4].total_bytes
    one_fold = Predictor.from_folders(two_folds[:1], "cpu", InferenceSettings(tile_batch=4)).memory_need(case)
    assert one_fold.window_bytes == needs[4].window_bytes
    per_fold = Predictor.from_folders(two_folds, "cpu", InferenceSettings(tile_batch=4, share_features=False))
    assert per_fold.memory_need(case).window_bytes > needs[4].window_bytes


# ---- one tile loop for the BPR and the probe ----------------------------------------------------
def _old_predict_coordinates(model, volume, patch_size, tile_batch):
    """predict_coordinates' sliding window as it was before the shared tile loop (copied verbatim)."""
    def gaussian_weights(shape, device):
        w = torch.ones((), device=device)
        for n in shape:
            t = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
            g = torch.exp(-0.5 * (t / max(n / 4, 1e-3)) ** 2)
            w = w[..., None] * (g / g.max()).clamp_min(1e-3)
        return w

    def starts_of(size, patch, step, stride):
        if size <= patch:
            return [0]
        n = math.ceil((size - patch) / step) + 1
        starts = {int(round(i * (size - patch) / (n - 1) / stride)) * stride for i in range(n)}
        return sorted(starts | {size - patch})

    x = torch.as_tensor(volume)
    shape, stride = tuple(x.shape[1:]), model.total_stride
    target = tuple(max(math.ceil(n / s) * s, p) for n, s, p in zip(shape, stride, patch_size))
    x = F.pad(x, [v for t, n in zip(reversed(target), reversed(shape)) for v in (0, t - n)], value=-1.0)[None]
    model.eval()
    with torch.no_grad():
        low_shape = tuple(t // s for t, s in zip(target, stride))
        patch_low = tuple(p // s for p, s in zip(patch_size, stride))
        weights = gaussian_weights(patch_low, x.device)
        acc = torch.zeros((3, *low_shape))
        norm = torch.zeros(low_shape)
        tiles = list(itertools.product(*[starts_of(t, p, max(p // 2, s), s)
                                         for t, p, s in zip(target, patch_size, stride)]))
        for first in range(0, len(tiles), tile_batch):
            chunk = tiles[first:first + tile_batch]
            batch = torch.cat([x[..., sz:sz + patch_size[0], sy:sy + patch_size[1], sx:sx + patch_size[2]]
                               for sz, sy, sx in chunk])
            for out, (sz, sy, sx) in zip(model(batch), chunk):
                lz, ly, lx = sz // stride[0], sy // stride[1], sx // stride[2]
                region = (slice(lz, lz + patch_low[0]), slice(ly, ly + patch_low[1]), slice(lx, lx + patch_low[2]))
                acc[(slice(None), *region)] += out.float() * weights
                norm[region] += weights
        low = (acc / norm).float()
    full = F.interpolate(low[None], size=target, mode="trilinear", align_corners=False)[0]
    return low, full[:, : shape[0], : shape[1], : shape[2]].contiguous()


@pytest.mark.parametrize("shape, patch, depth, tile_batch", [((1, 37, 90, 77), (8, 32, 32), 3, 8),
                                                             ((1, 50, 64, 70), (16, 32, 32), 3, 3),
                                                             ((1, 30, 40, 44), (4, 16, 16), 2, 1)])
def test_bpr_coordinates_unchanged_by_the_shared_tile_loop(shape, patch, depth, tile_batch):
    torch.manual_seed(0)
    model = BodyPartRegressor(width=4, depth=depth)
    volume = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    old_low, old_full = _old_predict_coordinates(model, volume, patch, tile_batch)
    low = predict_coordinates(model, volume, patch, full_resolution=False, tile_batch=tile_batch)
    full = predict_coordinates(model, volume, patch, tile_batch=tile_batch)
    assert (low - old_low).abs().max().item() <= 1e-6 and (full - old_full).abs().max().item() <= 1e-6


def test_window_starts_follow_nnunet_float_for_float():
    for step_size, patch in itertools.product((0.5, 0.33, 1.0), (1, 5, 16, 48, 80)):
        for size in range(patch, patch + 300, 7):
            assert window_starts(size, patch, patch * step_size) == \
                compute_steps_for_sliding_window((size,), (patch,), step_size)[0], (size, patch, step_size)
    assert window_starts(40, 48, 24) == [0] and window_starts(96, 32, 16, align=8) == [0, 16, 32, 48, 64]
