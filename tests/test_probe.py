"""Probe: multi-timestep features, heads, loss, splits, training and resume."""

from __future__ import annotations

import json

import pytest
import torch

from diffprobe.diffusion import GaussianDiffusion
from diffprobe.errors import DiffprobeError
from diffprobe.models import DiffusionUNet
from diffprobe.probe.features import FeatureExtractor, patch_seed
from diffprobe.probe.head import FPNHead, LinearHead, build_head
from diffprobe.probe.losses import dice_per_class, segmentation_loss

LEVELS = [
    {"stride_from_previous": [1, 1, 1], "channels": 8, "attention": "linear"},
    {"stride_from_previous": [1, 2, 2], "channels": 16, "attention": "linear"},
    {"stride_from_previous": [2, 2, 2], "channels": 16, "attention": "softmax"},
]


@pytest.fixture
def extractor() -> FeatureExtractor:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = DiffusionUNet(1, 3, LEVELS, blocks_per_level=1).eval()
    return FeatureExtractor(net, GaussianDiffusion("linear", 1000), [10, 30, 60])


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.rand((b, 1, 8, 16, 16), generator=g) * 2 - 1, torch.rand((b, 3, 8, 16, 16), generator=g)


def test_batched_timesteps_equal_one_forward_per_timestep(extractor):
    x0, guide = _inputs()
    with torch.no_grad():
        batched = extractor(x0, guide, [1, 2])
        sequential = extractor(x0, guide, [1, 2], batched=False)
    assert set(batched) == {"dec0", "dec1", "dec2"}
    for k, v in batched.items():
        assert v.shape[1] == extractor.feature_channels[k] == 3 * extractor.denoiser.feature_channels[k]
        torch.testing.assert_close(v, sequential[k], atol=1e-5, rtol=1e-4)


def test_features_are_deterministic_per_patch_seed(extractor):
    x0, guide = _inputs()
    with torch.no_grad():
        a = extractor(x0, guide, [5, 6])["dec0"]
        b = extractor(x0, guide, [5, 6])["dec0"]
        # patch 0 alone, seed 5: same features whatever else is in the batch
        c = extractor(x0[:1], guide[:1], [5])["dec0"]
        d = extractor(x0, guide, [7, 6])["dec0"]
    assert torch.equal(a, b)
    torch.testing.assert_close(a[:1], c, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[0], d[0])
    assert patch_seed("case_1", (0, 8, 16)) != patch_seed("case_1", (0, 8, 17)) != patch_seed("case_2", (0, 8, 17))


def test_reading_coarse_levels_only_skips_fine_decoder(extractor):
    coarse = FeatureExtractor(extractor.denoiser, extractor.diffusion, [10], levels=[1, 2])
    x0, guide = _inputs(1)
    with torch.no_grad():
        out = coarse(x0, guide, [0])
    assert set(out) == {"dec1", "dec2"} and out["dec1"].shape[2:] == (8, 8, 8)


def test_heads_output_shapes_and_linear_head_is_linear(extractor):
    x0, guide = _inputs()
    with torch.no_grad():
        feats = extractor(x0, guide, [1, 2])
        fpn = FPNHead(extractor.feature_channels, 4, width=8)
        assert fpn(feats, (8, 16, 16)).shape == (2, 4, 8, 16, 16)
        lin = LinearHead(extractor.feature_channels, 4)
        zero = {k: torch.zeros_like(v) for k, v in feats.items()}
        other = {k: torch.randn_like(v) for k, v in feats.items()}
        both = {k: feats[k] + other[k] for k in feats}
        torch.testing.assert_close(lin(both, (8, 16, 16)),
                                   lin(feats, (8, 16, 16)) + lin(other, (8, 16, 16)) - lin(zero, (8, 16, 16)),
                                   atol=1e-4, rtol=1e-4)


def _one_coarse_voxel_changed(feats: dict) -> dict:
    """The features with one voxel of the coarsest level raised (its corner), the rest unchanged."""
    coarse = max(feats, key=lambda k: int(k[3:]))
    changed = {k: v.clone() for k, v in feats.items()}
    changed[coarse][:, :, 0, 0, 0] += 5.0
    return changed


@pytest.mark.parametrize("kind", ["fpn", "context"])
def test_context_head_reads_neighbours_the_fpn_head_does_not(extractor, kind):
    """A change at one coarse voxel moves the logits only under it for ``fpn`` (pointwise, then trilinear
    upsampling), and also its neighbours' for ``context`` (3x3x3 blocks below the finest level)."""
    x0, guide = _inputs()
    with torch.no_grad():
        feats = extractor(x0, guide, [1, 2])
        torch.manual_seed(0)
        head = build_head(kind, extractor.feature_channels, 3, width=8).eval()
        delta = (head(_one_coarse_voxel_changed(feats), (8, 16, 16)) - head(feats, (8, 16, 16))).abs()
    moved = delta.amax(dim=(0, 1)) > 1e-5  # (z, y, x) of the output
    coarse_voxel = (8 // 4, 16 // 4, 16 // 4)  # dec2's stride is (2, 4, 4); its voxel 0 covers this corner
    # trilinear upsampling (align_corners=False) spreads one coarse voxel over at most 1.5 of its cells
    assert moved[: coarse_voxel[0] * 3 // 2, : coarse_voxel[1] * 3 // 2, : coarse_voxel[2] * 3 // 2].any()
    beyond = moved[coarse_voxel[0] * 2:, coarse_voxel[1] * 2:, coarse_voxel[2] * 2:].any()
    assert bool(beyond) == (kind == "context")
    finest = min(feats, key=lambda k: int(k[3:]))
    assert all(m.kernel_size == (1, 1, 1) for m in head.lateral[finest].modules() if isinstance(m, torch.nn.Conv3d))
    assert head(feats, (8, 16, 16)).shape == (2, 3, 8, 16, 16)


def test_context_head_loads_an_fpn_heads_names():
    """Same parameter names as ``fpn`` (only the coarse blocks' kernels differ): one probe format for both."""
    channels = {"dec0": 6, "dec1": 12}
    fpn, context = build_head("fpn", channels, 3), build_head("context", channels, 3)
    assert list(fpn.state_dict()) == list(context.state_dict())
    shapes = {k: v.shape for k, v in context.state_dict().items()}
    assert shapes["merge.dec0.conv.weight"][2:] == (1, 1, 1)
    assert shapes["lateral.dec1.2.conv.weight"][2:] == (3, 3, 3)


def test_head_training_loss_decreases(extractor):
    """A head fitted on fixed features of a fixed batch lowers CE + Dice within a few dozen steps."""
    _, guide = _inputs()
    zz, yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(16.0), torch.arange(16.0), indexing="ij")
    r2 = torch.stack([((zz - 4) / 2) ** 2 + ((yy - cy) / 4) ** 2 + ((xx - cx) / 4) ** 2 for cy, cx in ((6, 7), (9, 8))])
    seg = (r2 < 1).long() + (r2 < 0.3).long()  # a blob with a brighter core, two positions
    x0 = (-0.6 + 0.5 * seg.float())[:, None]
    with torch.no_grad():
        feats = extractor(x0, guide, [1, 2])
    torch.manual_seed(0)
    head = FPNHead(extractor.feature_channels, 3, width=8)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = segmentation_loss(head(feats, (8, 16, 16)), seg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


class _FakePatches:
    """Stands in for LabelledPatches: batch(i) depends on i alone."""

    batch_size = 2

    def __init__(self):
        self.calls = []

    def batch(self, i: int) -> dict:
        self.calls.append(i)
        g = torch.Generator().manual_seed(100 + i)
        image = torch.rand((2, 1, 8, 16, 16), generator=g) * 2 - 1
        return {"image": image, "guidance": torch.rand((2, 3, 8, 16, 16), generator=g),
                "seg": (image[:, 0] > 0).long(), "seeds": [1000 + 2 * i, 1001 + 2 * i]}


def test_feature_pool_is_deterministic_per_step_and_matches_the_extractor(extractor):
    from diffprobe.probe.feature_pool import FeaturePool, feature_bytes_per_patch, pool_size_for_budget

    def pool():
        src = _FakePatches()
        return FeaturePool(extractor, src, size=4, batch_size=3, refresh_every=5, seed=7, device="cpu"), src

    a, src_a = pool()
    run = [a.batch(s) for s in range(8)]
    assert src_a.calls == [0, 1, 2, 3]  # pool 0 from source batches 0-1, pool 1 (step 5) from 2-3
    b, src_b = pool()  # a resumed run: starts at step 6, inside pool 1
    for s in (6, 7):
        got = b.batch(s)
        torch.testing.assert_close(got["seg"], run[s]["seg"], atol=0, rtol=0)
        for k in got["features"]:
            torch.testing.assert_close(got["features"][k], run[s]["features"][k], atol=0, rtol=0)
    assert src_b.calls == [2, 3]
    # Entries are the extractor's features of the source patches (stored in float16).
    first = _FakePatches().batch(0)
    with torch.no_grad():
        direct = extractor(first["image"], first["guidance"], first["seeds"])
    whole = FeaturePool(extractor, _FakePatches(), size=2, batch_size=2, refresh_every=5, seed=0, device="cpu")
    drawn = whole.batch(0)["features"]  # both entries, in a random order: compare order-free sums
    for k, v in direct.items():
        torch.testing.assert_close(drawn[k].sum(0), v.half().float().sum(0), atol=2e-3, rtol=1e-3)
    nbytes = sum(v[:1].numel() * 2 for v in direct.values())
    assert feature_bytes_per_patch(extractor, [8, 16, 16]) == nbytes
    assert pool_size_for_budget(64, 2, nbytes, budget_gb=10 * nbytes / 1024**3) == 10
    assert pool_size_for_budget(64, 4, nbytes, budget_gb=3 * nbytes / 1024**3) == 0


def test_dice_per_class():
    pred = torch.tensor([0, 1, 1, 2, 0])
    ref = torch.tensor([0, 1, 0, 2, 2])
    d = dice_per_class(pred, ref, 4)
    assert d[0] == pytest.approx(2 / 3) and d[1] == pytest.approx(2 / 3) and d[2] != d[2]  # class 3: NaN


def test_splits_nnunet_style_and_user_splits(tmp_path):
    from diffprobe.probe.splits import fold_cases, load_or_create_splits
    from diffprobe.utils import write_json

    ids = [f"c{i}" for i in range(7)]
    splits, path = load_or_create_splits(tmp_path, ids)
    assert len(splits) == 5 and path.is_file()
    assert sorted(sum((s["val"] for s in splits), [])) == ids
    train, val = fold_cases(tmp_path, ids, "0")
    assert not set(train) & set(val) and set(train) | set(val) == set(ids)
    assert fold_cases(tmp_path, ids, "all") == (ids, ids)
    write_json(path, [{"train": ["c0", "c1"], "val": ["c2"]}])
    assert fold_cases(tmp_path, ids, "0") == (["c0", "c1"], ["c2"])
    with pytest.raises(DiffprobeError, match="fold '3' does not exist"):
        fold_cases(tmp_path, ids, "3")


@pytest.mark.parametrize("pool", [0, 4], ids=["per-step-features", "feature-pool"])
def test_probe_resume_equals_uninterrupted(use_trained_probe_roots, monkeypatch, pool):
    """Resume after the step-2 checkpoint; with the pool, a refresh (step 3) lies after the resume."""
    from diffprobe.training.checkpoint import load_checkpoint
    from diffprobe.training.trainer import Trainer
    from diffprobe.workflows.train_probe import train_probe

    settings = {"steps": 4, "checkpoint_every": 2, "validate_every": 0, "pool_patches": pool, "pool_refresh": 3}
    full = train_probe(1, "all", "tiny", overrides=settings, show_progress=False, final_validation=False,
                       configuration=f"resume_full{pool}")
    original_save = Trainer.save

    def save_then_die(self, path):  # interrupt right after the step-2 checkpoint, like Ctrl-C
        original_save(self, path)
        if self.step == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_probe(1, "all", "tiny", overrides=settings, show_progress=False, final_validation=False,
                        configuration=f"resume_split{pool}")
    split = train_probe(1, "all", "tiny", overrides=settings, resume=True, show_progress=False,
                        final_validation=False, configuration=f"resume_split{pool}")
    a = load_checkpoint(full.folder / "checkpoint_final.pt")["model"]
    b = load_checkpoint(split.folder / "checkpoint_final.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    with pytest.raises(DiffprobeError, match="already trained"):
        train_probe(1, "all", "tiny", overrides=settings, show_progress=False, configuration=f"resume_full{pool}")


def test_train_cli_writes_validation_summary(use_trained_probe_roots):
    from diffprobe.cli.app import main

    assert main(["train", "-d", "1", "-f", "0", "-m", "tiny", "--steps", "2", "--head", "linear"]) == 0
    folder = use_trained_probe_roots["results"] / "Dataset001_Phantoms" / "diffprobe" / "tiny__linear" / "fold_0"
    for name in ("probe.json", "checkpoint_final.pt", "loss_curve.png", "validation/summary.json",
                 "postprocessing.json"):
        assert (folder / name).is_file(), name
    decision = json.loads((folder / "postprocessing.json").read_text())
    assert decision["validation_cases"] and set(decision["classes"]) == {
        "liver", "spleen", "kidney_right", "kidney_left", "aorta", "adrenal_right"}
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert summary["postprocessing_largest_component"] == [
        name for name, c in decision["classes"].items() if c["class"] in decision["largest_component"]]
    # --val: the final validation again, no training step; the same decision from the same probe
    (folder / "postprocessing.json").unlink()
    mtime = (folder / "checkpoint_final.pt").stat().st_mtime_ns
    assert main(["train", "-d", "1", "-f", "0", "-m", "tiny", "--head", "linear", "--val"]) == 0
    assert json.loads((folder / "postprocessing.json").read_text()) == decision
    assert (folder / "checkpoint_final.pt").stat().st_mtime_ns == mtime
    assert main(["train", "-d", "1", "-f", "1", "-m", "tiny", "--head", "linear", "--val"]) == 1  # never trained


def test_train_cli_context_head_trains_and_predicts(use_trained_probe_roots, tmp_path):
    """``--head context``: its own configuration folder; predict rebuilds the head from probe.json."""
    from diffprobe.cli.app import main
    from diffprobe.probe.model import load_trained_probe, probe_dir

    assert main(["train", "-d", "1", "-f", "0", "-m", "tiny", "--steps", "2", "--head", "context"]) == 0
    folder = probe_dir(1, "tiny__context", "0")
    assert json.loads((folder / "probe.json").read_text())["head"] == "context"
    head = load_trained_probe(folder).model.head
    assert any(m.kernel_size == (3, 3, 3) for m in head.modules() if isinstance(m, torch.nn.Conv3d))
    images = use_trained_probe_roots["raw"] / "Dataset001_Phantoms" / "imagesTs"
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "segs"), "-d", "1", "-c", "tiny__context",
                 "-f", "0", "-device", "cpu"]) == 0
    assert len(list((tmp_path / "segs").glob("*.nii.gz"))) == len(list(images.glob("*_0000.nii.gz")))
