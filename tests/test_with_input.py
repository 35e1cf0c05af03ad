"""``train --with_input``: the probe head reads the denoiser's features ⊕ the input (image ⊕ guidance) pooled.

On a private copy of ``trained_probe_roots`` (tiny phantoms, pretrained model 'tiny'), as test_controls.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_roots, set_roots

from diffprobe.cli.app import main

DATASET = "Dataset001_Phantoms"


@pytest.fixture(scope="module")
def _copy(trained_probe_roots, tmp_path_factory) -> dict[str, Path]:
    return copy_roots(trained_probe_roots, tmp_path_factory, "with_input_roots")


@pytest.fixture
def roots(use_trained_probe_roots, _copy, monkeypatch) -> dict[str, Path]:
    return set_roots(_copy, monkeypatch)


def test_features_with_input_are_the_features_then_the_pooled_input(roots):
    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.features import FeatureExtractor

    model = PretrainedModel("tiny")
    denoiser, diffusion = model.load_denoiser("cpu"), GaussianDiffusion.from_plans(model.plans.raw)
    plain = FeatureExtractor(denoiser, diffusion, [10, 30])
    both = FeatureExtractor(denoiser, diffusion, [10, 30], with_input=True)
    assert plain.signature != both.signature  # predict must not share their extraction
    torch.manual_seed(0)
    x = torch.rand(1, denoiser.in_channels, *model.plans.patch_size) * 2 - 1
    g = torch.randn(1, denoiser.guidance_channels, *model.plans.patch_size)
    with torch.no_grad():
        a, b = plain(x, g, [7]), both(x, g, [7])
    inputs = torch.cat([x, g], dim=1)
    for key, feats in a.items():
        c = feats.shape[1]
        assert b[key].shape[1] == both.feature_channels[key] == c + inputs.shape[1]
        assert torch.equal(b[key][:, :c], feats)  # the features unchanged, same noise
        stride = both.feature_strides[key]
        pooled = inputs if all(s == 1 for s in stride) else F.avg_pool3d(inputs, stride, stride, ceil_mode=True)
        assert torch.allclose(b[key][:, c:], pooled[..., : feats.shape[2], : feats.shape[3], : feats.shape[4]])
    assert torch.equal(b["dec0"][:, -inputs.shape[1]:], inputs)  # full resolution: the input itself


def test_train_with_input_cli_predicts_and_warm_starts(roots, tmp_path, capsys):
    """Its own configuration folder; predict rebuilds it from probe.json; a fine-tune warm-starts from it and a
    probe without the input is refused as its source."""
    from diffprobe.errors import DiffprobeError
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.model import build_probe, probe_dir
    from diffprobe.probe.warm_start import warm_start_head
    from diffprobe.utils import read_json

    assert main(["train", "-d", "1", "-f", "all", "-m", "tiny", "--with_input", "--steps", "2"]) == 0
    folder = probe_dir(1, "tiny__fpn__withinput", "all")
    meta = read_json(folder / "probe.json")
    assert meta["config"]["with_input"] is True
    images = roots["raw"] / DATASET / "imagesTs"
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "segs"), "-d", "1", "-c", "tiny__fpn__withinput",
                 "-f", "all", "-device", "cpu"]) == 0
    assert len(list((tmp_path / "segs").glob("*.nii.gz"))) == len(list(images.glob("*_0000.nii.gz")))
    assert main(["train", "-d", "1", "-f", "all", "-m", "tiny", "--with_input", "--finetune", "--warm_start",
                 "--steps", "2"]) == 0
    tuned = read_json(probe_dir(1, "tiny__fpn__withinput__finetune", "all") / "probe.json")
    assert tuned["head_init"] == "tiny__fpn__withinput" and tuned["config"]["with_input"] is True
    model = PretrainedModel("tiny")
    plain_meta = {**meta, "finetune": True, "config": {**meta["config"], "with_input": False}}
    probe = build_probe(model.load_denoiser("cpu"), model.meta, meta["timesteps"], meta["levels"], "fpn",
                        meta["num_classes"], meta["config"]["width"], True)
    with pytest.raises(DiffprobeError, match="differs in with_input"):
        warm_start_head(probe, folder, plain_meta)
