"""Honest controls (``ablate controls``) and the label-efficiency sweep (``ablate labels``).

On a private copy of ``trained_probe_roots`` (tiny phantoms, pretrained model 'tiny', one test
case in imagesTs/labelsTs), so the models and probes made here never reach other test files.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_roots, set_roots

from diffprobe.cli.app import main

DATASET = "Dataset001_Phantoms"
ROWS = ["pretrained", "random_init", "no_backbone", "from_scratch", "finetune"]


@pytest.fixture(scope="module")
def _controls_copy(trained_probe_roots, tmp_path_factory) -> dict[str, Path]:
    return copy_roots(trained_probe_roots, tmp_path_factory, "controls_roots")


@pytest.fixture
def roots(use_trained_probe_roots, _controls_copy, monkeypatch) -> dict[str, Path]:
    return set_roots(_controls_copy, monkeypatch)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def _features(name: str, x: torch.Tensor, g: torch.Tensor, timesteps: list[int]) -> dict[str, torch.Tensor]:
    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.features import FeatureExtractor

    model = PretrainedModel(name)
    ex = FeatureExtractor(model.load_denoiser("cpu"), GaussianDiffusion.from_plans(model.plans.raw), timesteps)
    with torch.no_grad():
        return ex(x, g, [123])


def _same_input_t(denoiser, x, g, t: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return denoiser(x, torch.tensor([t]), g, return_features=True, return_output=False)[1]


def test_random_init_control_is_not_degenerate(roots):
    from diffprobe.pretraining.baseline import INIT_SCHEME, make_random_init_model
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    make_random_init_model("tiny", "rnd_seed0", seed=0)
    make_random_init_model("tiny", "rnd_seed1", seed=1)
    model = PretrainedModel("rnd_seed0")
    assert model.meta["init"] == INIT_SCHEME and model.meta["random_init_of"] == "tiny"
    den = model.load_denoiser("cpu")
    # no zero residual branch, no zero output convolution
    for name, p in den.named_parameters():
        if name.endswith("conv2.weight") or name == "out_conv.weight":
            assert p.abs().sum() > 0, name
    patch = model.plans.patch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *patch, generator=gen)
    g = torch.randn(1, den.guidance_channels, *patch, generator=gen)
    # the timestep reaches the features: same noisy input, t=10 vs t=900
    f10, f900 = _same_input_t(den, x, g, 10), _same_input_t(den, x, g, 900)
    assert all(not torch.allclose(f10[k], f900[k]) for k in f10)
    # ... which is exactly what the network's own (zero-branch) init gets wrong
    torch.manual_seed(0)
    own = model.build_denoiser().eval()
    o10, o900 = _same_input_t(own, x, g, 10), _same_input_t(own, x, g, 900)
    assert all(torch.equal(o10[k], o900[k]) for k in o10)
    # through the probe's FeatureExtractor: t=10 and t=900 channels differ, and so do two seeds
    feats0 = _features("rnd_seed0", x, g, [10, 900])
    feats1 = _features("rnd_seed1", x, g, [10, 900])
    for key, f in feats0.items():
        c = f.shape[1] // 2
        assert not torch.allclose(f[:, :c], f[:, c:]), key
        assert not torch.allclose(f, feats1[key]), key
    make_random_init_model("tiny", "rnd_seed0", seed=0)  # idempotent: kept as it is
    assert PretrainedModel("rnd_seed0").checksum() == model.checksum()


def test_input_features_match_the_denoiser_scales(roots):
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.head import build_head
    from diffprobe.probe.input_features import InputFeatures

    den = PretrainedModel("tiny").build_denoiser()
    ex = InputFeatures.like(den)
    assert ex.feature_strides == den.feature_strides
    patch = PretrainedModel("tiny").plans.patch_size
    x, g = torch.randn(2, 1, *patch), torch.randn(2, den.guidance_channels, *patch)
    feats = ex(x, g, [1, 2])
    _, ref = den(x, torch.tensor([10, 10]), g, return_features=True, return_output=False)
    for key, f in feats.items():
        assert f.shape[1] == 1 + den.guidance_channels == ex.feature_channels[key]
        assert f.shape[2:] == ref[key].shape[2:]
    assert torch.equal(feats["dec0"], torch.cat([x, g], 1))
    head = build_head("fpn", ex.feature_channels, 3, 8)
    assert head(feats, tuple(patch)).shape == (2, 3, *patch)


def test_controls_quick_every_row_csv_png_and_resume(roots, capsys):
    out = roots["results"] / DATASET / "diffprobe" / "ablations" / "controls"
    assert main(["ablate", "controls", "-d", "1", "-m", "tiny", "--quick"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "5 row(s) trained, 0 reused" in text
    rows = read_csv(out / "tiny__fold_0.csv")
    assert [r["row"] for r in rows] == ROWS
    assert_png(out / "tiny__fold_0.png")
    by = {r["row"]: r for r in rows}
    assert by["random_init"]["model"] == "tiny_random_init"
    assert all(r["dice_mean"] != "" and r["test_cases"] == "1" and r["test_dice_mean"] != "" for r in rows)
    assert float(by["pretrained"]["pretrain_seconds"]) > 0 and float(by["random_init"]["pretrain_seconds"]) == 0
    for timed in ("from_scratch", "finetune"):  # steps fitted to a time budget (capped at 4 by --quick)
        assert float(by[timed]["budget_seconds"]) > 0 and 1 <= int(by[timed]["steps"]) <= 4
    assert all(int(by[r]["steps"]) == 4 for r in ROWS if r not in ("from_scratch", "finetune"))
    assert not list((roots["results"] / DATASET / "diffprobe").glob("*__timing"))  # timing run removed
    from diffprobe.utils import read_json

    probe = roots["results"] / DATASET / "diffprobe"
    assert read_json(probe / "controls_no_backbone__tiny" / "fold_0" / "probe.json")["extractor"] == "input"
    scratch = read_json(probe / "controls_from_scratch__tiny" / "fold_0" / "probe.json")
    assert (scratch["init"], scratch["finetune"], scratch["config"]["finetune_lr"]) == ("scratch", True, 1e-3)
    tuned = read_json(probe / "controls_finetune__tiny" / "fold_0" / "probe.json")
    assert (tuned["finetune"], tuned["head_init"]) == (True, "controls_pretrained__tiny")

    # resume: every finished row is reused as it is; a removed row alone is trained again
    ckpt = probe / "controls_finetune__tiny" / "fold_0" / "checkpoint_final.pt"
    stamp = ckpt.stat().st_mtime_ns
    shutil.rmtree(probe / "controls_no_backbone__tiny")
    assert main(["ablate", "controls", "-d", "1", "-m", "tiny", "--quick"]) == 0
    printed = capsys.readouterr()
    assert "1 row(s) trained, 4 reused" in printed.out + printed.err
    assert ckpt.stat().st_mtime_ns == stamp
    again = read_csv(out / "tiny__fold_0.csv")
    for before, after in zip(rows, again):
        if before["row"] != "no_backbone":
            assert {k: v for k, v in before.items() if k != "wall_seconds"} == \
                   {k: v for k, v in after.items() if k != "wall_seconds"}
        assert after["wall_seconds"] not in ("", "nan")

    # --rows trains only the rows named (from_scratch with the method's row, its budget); the table keeps
    # every row finished earlier, and leaves out one that is not (random_init removed here)
    shutil.rmtree(probe / "controls_random_init__tiny")
    assert main(["ablate", "controls", "-d", "1", "-m", "tiny", "--quick", "--rows", "from_scratch",
                 "no_backbone"]) == 0
    printed = capsys.readouterr()
    assert "0 row(s) trained, 4 reused" in printed.out + printed.err
    assert [r["row"] for r in read_csv(out / "tiny__fold_0.csv")] == [r for r in ROWS if r != "random_init"]
    assert main(["ablate", "controls", "-d", "1", "-m", "tiny", "--quick", "--rows", "supervised"]) == 1


def test_finetune_starts_from_the_methods_trained_head(roots):
    """The fine-tune row's head starts as the method's probe ended, not fresh; a probe that is not a
    frozen one on the same weights is refused with its folder named."""
    from diffprobe.errors import DiffprobeError
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.probe.model import build_probe, probe_dir
    from diffprobe.probe.warm_start import warm_start_head
    from diffprobe.training.checkpoint import load_checkpoint
    from diffprobe.utils import read_json

    assert main(["ablate", "controls", "-d", "1", "-m", "tiny", "--quick", "--rows", "no_backbone", "finetune"]) == 0
    source = probe_dir(1, "controls_pretrained__tiny", "0")
    meta = read_json(source / "probe.json")
    model = PretrainedModel("tiny")
    torch.manual_seed(123)
    probe = build_probe(model.load_denoiser("cpu"), model.meta, meta["timesteps"], meta["levels"], meta["head"],
                        meta["num_classes"], meta["config"]["width"], True)
    trained = load_checkpoint(source / "checkpoint_final.pt")["model"]
    assert any(not torch.equal(v, trained[k]) for k, v in probe.head.state_dict().items())  # fresh head differs
    warm_start_head(probe, source, {**meta, "finetune": True})
    assert all(torch.equal(v, trained[k]) for k, v in probe.head.state_dict().items())
    with pytest.raises(DiffprobeError, match="not a frozen probe") as err:
        warm_start_head(probe, probe_dir(1, "controls_no_backbone__tiny", "0"), meta)
    assert "controls_no_backbone__tiny" in str(err.value)
    with pytest.raises(DiffprobeError, match="differs in num_classes"):
        warm_start_head(probe, source, {**meta, "num_classes": meta["num_classes"] + 1})


def test_label_sweep_runs_small_nested(roots, capsys):
    from diffprobe.workflows.ablations.labels import nested_subsets

    # --pretrain: the method's model is pretrained first (as planned; --quick: 2 + 2 steps)
    assert main(["ablate", "labels", "-d", "1", "-m", "tiny_pre", "--pretrain", "--n", "1", "2", "--quick"]) == 0
    out = roots["results"] / DATASET / "diffprobe" / "ablations" / "labels"
    rows = read_csv(out / "tiny_pre__fold_0.csv")
    assert [(r["n"], r["row"]) for r in rows] == [("1", "pretrained"), ("1", "from_scratch"),
                                                  ("2", "pretrained"), ("2", "from_scratch")]
    one, two = rows[0]["train_cases"].split(), rows[2]["train_cases"].split()
    assert len(one) == 1 and len(two) == 2 and set(one) <= set(two)
    assert rows[1]["train_cases"] == rows[0]["train_cases"]
    assert_png(out / "tiny_pre__fold_0.png")
    subsets = nested_subsets(["c", "a", "d", "b"], [1, 3, 4])
    assert subsets[1] == subsets[3][:1] and subsets[3] == subsets[4][:3] and sorted(subsets[4]) == list("abcd")
    assert main(["ablate", "labels", "-d", "1", "-m", "tiny", "--n", "9", "--quick"]) == 1  # more than the fold has


def test_pretrain_seconds_from_logs_or_timed(roots):
    from diffprobe.pretraining.pretrained_model import PretrainedModel
    from diffprobe.workflows.ablations.time_budget import pretrain_seconds

    total, info = pretrain_seconds(PretrainedModel("tiny"))
    assert info["source"] == "training logs" and total == pytest.approx(info["bpr_seconds"] + info["diffusion_seconds"])
    shutil.copytree(roots["results"] / "pretrained" / "tiny", roots["results"] / "pretrained" / "tiny_nolog")
    for stage in ("bpr", "diffusion"):  # an installed model: checkpoints, no logs
        (roots["results"] / "pretrained" / "tiny_nolog" / stage / "training_log.jsonl").unlink()
    total, info = pretrain_seconds(PretrainedModel("tiny_nolog"))
    assert info["source"].startswith("timed") and total > 0 and info["bpr_seconds"] > 0


def test_train_finetune_warm_start_cli(roots, capsys):
    """``diffprobe train --finetune --warm_start`` starts from the fold's frozen probe; user errors exit 1."""
    from diffprobe.utils import read_json

    assert main(["train", "-d", "1", "-f", "all", "-m", "tiny", "--finetune", "--warm_start", "--steps", "2"]) == 0
    meta = read_json(roots["results"] / DATASET / "diffprobe" / "tiny__fpn__finetune" / "fold_all" / "probe.json")
    assert (meta["finetune"], meta["head_init"]) == (True, "tiny__fpn")
    capsys.readouterr()
    assert main(["train", "-d", "1", "-f", "all", "-m", "tiny", "--warm_start", "--steps", "2"]) == 1
    assert "--finetune" in capsys.readouterr().err
    assert main(["train", "-d", "1", "-f", "1", "-m", "tiny", "--finetune", "--warm_start", "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "has not finished training" in err and "tiny__fpn" in err
