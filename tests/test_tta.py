"""``predict --tta`` is a noise ensemble (issue 15): each tile predicted under N independent feature-noise
draws, the softmax averaged. No mirroring (the models never saw a mirrored body). The output stays a
function of the pixels (deterministic, independent of the file name), one draw *is* the prediction
without TTA, the draws really differ, and fold heads still share one extraction per draw."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import body_volume, write_sitk

from diffprobe.cli.app import main
from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.models import DiffusionUNet
from diffprobe.predict import predictor as predictor_module
from diffprobe.predict.acceleration import InferenceSettings
from diffprobe.predict.ensemble import DEFAULT_TTA_DRAWS, LOG_PROB_FLOOR, group_patch_predictor, tta_draws
from diffprobe.predict.predictor import group_probes, predict, predict_logits
from diffprobe.probe.features import FeatureExtractor, inference_seed, patch_seed
from diffprobe.probe.head import build_head
from diffprobe.probe.model import ProbeModel, TrainedProbe

MODEL = {"dataset": 1, "configuration": "tiny__fpn"}  # the trained_probe_roots fixture's probe
SETTINGS = InferenceSettings(channels_last=False, tile_batch=2)


def _tiny_probe(head_seed: int) -> TrainedProbe:
    """A probe on a small random denoiser (seed 0 for every probe: same weights, one group) with its own head."""
    torch.manual_seed(0)
    levels = [{"stride_from_previous": [1, 1, 1], "channels": 8, "attention": "linear"},
              {"stride_from_previous": [1, 2, 2], "channels": 16, "attention": "softmax"}]
    denoiser = DiffusionUNet(1, 0, levels, blocks_per_level=1).eval()
    extractor = FeatureExtractor(denoiser, GaussianDiffusion(num_timesteps=100), [30, 60])
    torch.manual_seed(head_seed)
    model = ProbeModel(extractor, build_head("linear", extractor.feature_channels, 3)).eval()
    meta = {"pretrained": "p", "pretrained_checksum": "c", "finetune": False, "guidance": "none",
            "patch_size": [4, 8, 8], "num_classes": 3}
    return TrainedProbe(Path("."), meta, model, None, None)


def test_draw_count_and_seeds():
    assert tta_draws(False) == tta_draws(0) == tta_draws(1) == 1
    assert tta_draws(True) == DEFAULT_TTA_DRAWS and tta_draws(3) == 3
    with pytest.raises(DiffprobeError):
        tta_draws(-2)
    start = (4, 16, 0)
    assert inference_seed(start) == inference_seed(start, 0) == patch_seed("features", start)  # unchanged
    seeds = {inference_seed(start, d) for d in range(8)}
    assert len(seeds) == 8  # every draw its own noise
    assert inference_seed((4, 16, 8), 1) != inference_seed(start, 1)  # and still by position
    with pytest.raises(ValueError):
        inference_seed(start, -1)


def test_draws_average_the_softmax_with_one_extraction_per_draw():
    """The tile's output is log(mean over draws of the group's softmax); one draw is the plain logits,
    bit for bit; the draws differ; two fold heads still share one denoiser forward per draw."""
    probes = [_tiny_probe(1), _tiny_probe(2)]
    (group,) = group_probes(probes)
    for probe in probes[1:]:
        probe.model.extractor = group.extractor  # as Predictor(prepare=True) does
    calls = []
    group.extractor.denoiser.register_forward_hook(lambda *a: calls.append(1))
    tiles = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 1, 4, 8, 8)).astype(np.float32))
    starts = [(0, 0, 0), (0, 0, 8)]

    def heads_mean(draw: int) -> torch.Tensor:
        feats = group.extractor(tiles, None, [inference_seed(s, draw) for s in starts])
        return torch.stack([p.model.head(feats, (4, 8, 8)) for p in probes]).mean(0)

    with torch.no_grad():
        per_draw = [heads_mean(d) for d in range(3)]
        calls.clear()
        plain = group_patch_predictor(group, torch.device("cpu"), SETTINGS, 1)(tiles, None, starts)
        assert len(calls) == 1
        calls.clear()
        ensembled = group_patch_predictor(group, torch.device("cpu"), SETTINGS, 3)(tiles, None, starts)
        assert len(calls) == 3  # one extraction per draw for both heads, not one per head and draw
    torch.testing.assert_close(plain, per_draw[0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(per_draw[0], per_draw[1]) and not torch.equal(per_draw[1], per_draw[2])
    expected = torch.stack([torch.softmax(x, 1) for x in per_draw]).mean(0).log().clamp_min(LOG_PROB_FLOOR)
    torch.testing.assert_close(ensembled, expected, rtol=1e-5, atol=1e-5)


def test_one_draw_equals_no_tta_exactly_and_more_draws_only_average():
    probe = _tiny_probe(1)
    volume = np.random.default_rng(1).uniform(-1, 1, size=(1, 6, 16, 12)).astype(np.float32)
    run = {tta: predict_logits([probe], volume, [1.0] * 3, torch.device("cpu"), tta=tta, settings=SETTINGS)
           for tta in (False, 1, 3)}
    assert torch.equal(run[False], run[1])
    assert not torch.equal(torch.softmax(run[3], 0), torch.softmax(run[False], 0))
    again = predict_logits([probe], volume, [1.0] * 3, torch.device("cpu"), tta=3, settings=SETTINGS)
    assert torch.equal(again, run[3])  # deterministic
    # An average of probabilities: still a distribution, and close to the single draw's.
    probs = torch.softmax(run[3], 0)
    torch.testing.assert_close(probs.sum(0), torch.ones_like(probs[0]))
    assert (probs - torch.softmax(run[False], 0)).abs().mean() < 0.2


def test_tta_label_map_is_deterministic_and_name_independent(use_trained_probe_roots, tmp_path):
    """With --tta the same pixels under another name and folder give byte-identical labels and
    probabilities; without draws (tta=1) the output is the plain prediction's, byte for byte."""
    img, _ = body_volume((12, 40, 48), seed=1)
    original = write_sitk(img, tmp_path / "a" / "alpha_0000.nii.gz", spacing=(0.8, 0.9, 2.5))
    (tmp_path / "b" / "deep").mkdir(parents=True)
    shutil.copyfile(original, tmp_path / "b" / "deep" / "omega_0000.nii.gz")
    kw = {**MODEL, "save_probabilities": True, "show_progress": False}
    predict(tmp_path / "a", tmp_path / "tta_a", tta=2, **kw)
    predict(tmp_path / "b" / "deep", tmp_path / "tta_b", tta=2, **kw)
    predict(tmp_path / "a", tmp_path / "plain", **kw)
    predict(tmp_path / "a", tmp_path / "one_draw", tta=1, **kw)

    def label(folder: str, name: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / f"{name}.nii.gz")))

    def probs(folder: str, name: str) -> np.ndarray:
        with np.load(tmp_path / folder / f"{name}.npz") as f:
            return f["probabilities"]

    assert label("tta_a", "alpha").tobytes() == label("tta_b", "omega").tobytes()
    assert probs("tta_a", "alpha").tobytes() == probs("tta_b", "omega").tobytes()
    assert label("plain", "alpha").tobytes() == label("one_draw", "alpha").tobytes()
    assert probs("plain", "alpha").tobytes() == probs("one_draw", "alpha").tobytes()
    assert not np.array_equal(probs("tta_a", "alpha"), probs("plain", "alpha"))  # the draws changed something


def test_cli_tta_options(monkeypatch, tmp_path, capsys):
    """--tta asks for DEFAULT_TTA_DRAWS draws, --tta_draws N for N (implies --tta), none by default;
    --tta_draws 0 is refused with a message."""
    seen = []
    monkeypatch.setattr(predictor_module, "predict", lambda *a, **k: seen.append(a[7]) or [])
    base = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out")]
    for extra in ([], ["--tta"], ["--tta", "--tta_draws", "6"], ["--tta_draws", "2"]):
        assert main(base + extra) == 0
    assert seen == [1, DEFAULT_TTA_DRAWS, 6, 2]
    assert main(base + ["--tta_draws", "0"]) == 1
    said = capsys.readouterr()
    assert "--tta_draws" in said.out + said.err
    assert main(["predict", "--help"]) == 0
    assert "noise" in capsys.readouterr().out


def test_tta_never_mirrors(monkeypatch):
    """Neither pretraining nor the probe saw a mirrored body: --tta must not flip tiles."""
    seen = []
    real = predictor_module.sliding_window_logits

    def window(*args, **kwargs):
        seen.append(kwargs.get("mirror_axes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "sliding_window_logits", window)
    volume = np.zeros((1, 4, 8, 8), np.float32)
    predict_logits([_tiny_probe(1)], volume, [1.0] * 3, torch.device("cpu"), tta=True, settings=SETTINGS)
    assert seen == [()]
