"""`diffprobe features`: voxel embeddings with the documented shapes, deterministic, tiles stitched right."""

import numpy as np
import torch

from diffprobe.cli.app import main


def _input(roots):
    return sorted((roots["raw"] / "Dataset001_Phantoms" / "imagesTs").glob("*_0000.nii.gz"))[0]


def test_features_shape_and_determinism(use_trained_probe_roots, tmp_path):
    from diffprobe.pretraining.pretrained_model import PretrainedModel

    image = _input(use_trained_probe_roots)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["features", "-i", str(image), "-o", str(a), "--pretrained", "tiny", "-device", "cpu"]) == 0
    assert main(["features", "-i", str(image), "-o", str(b), "--pretrained", "tiny", "-device", "cpu",
                 "--levels", "1", "2"]) == 0
    fa, fb = np.load(a), np.load(b)
    plans = PretrainedModel("tiny").plans
    shape = fa["image"].shape[1:]
    levels = list(fa["levels"])
    assert levels == list(range(len(plans.levels))) and list(fb["levels"]) == [1, 2]
    t = len(plans.feature_timesteps)
    for lv in levels:
        f, stride = fa[f"dec{lv}"], fa[f"dec{lv}_stride"]
        assert f.dtype == np.float16
        assert f.shape[0] == t * plans.levels[lv]["channels"]
        assert list(f.shape[1:]) == [-(-s // k) for s, k in zip(shape, stride)]
        assert np.isfinite(f).all() and f.astype(np.float32).std() > 0
    # same input, same output; a subset of levels gives the same arrays for those levels
    for lv in (1, 2):
        np.testing.assert_array_equal(fa[f"dec{lv}"], fb[f"dec{lv}"])
    c = tmp_path / "c.npz"
    assert main(["features", "-i", str(image), "-o", str(c), "--pretrained", "tiny", "-device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(c)["dec0"], fa["dec0"])


def test_stitching_equals_extractor_on_one_tile():
    """A volume the size of one patch: the stitched features are the extractor's output itself."""
    from diffprobe.diffusion import GaussianDiffusion
    from diffprobe.models import DiffusionUNet
    from diffprobe.planning import planner
    from diffprobe.predict.embeddings import tile_starts, volume_features
    from diffprobe.probe.features import FeatureExtractor, patch_seed

    levels = planner.topology([8, 16, 16], [2.0, 1.0, 1.0], 3, 8, 16)
    torch.manual_seed(0)
    net = DiffusionUNet(1, 0, levels, 1, "planned").eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    plans = {"diffusion": {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}}
    ext = FeatureExtractor(net, GaussianDiffusion.from_plans(plans), [10, 60])
    data = np.random.default_rng(0).uniform(-1, 1, (1, 8, 16, 16)).astype(np.float32)
    stitched = volume_features(ext, data, None, [8, 16, 16])
    direct = ext(torch.from_numpy(data)[None], None, [patch_seed("features", (0, 0, 0))])
    for k, v in direct.items():
        np.testing.assert_allclose(stitched[k], v[0].numpy(), atol=1e-6)
    # tiles overlap by half and start on every level's stride
    starts = tile_starts((8, 40, 40), [8, 16, 16], [[1, 1, 1], [2, 2, 2], [2, 4, 4]])
    assert all(s[1] % 4 == 0 and s[2] % 4 == 0 for s in starts) and len({s[2] for s in starts}) >= 3


def test_features_refuses_bad_level(use_trained_probe_roots, tmp_path, capfd):
    image = _input(use_trained_probe_roots)
    code = main(["features", "-i", str(image), "-o", str(tmp_path / "x.npz"), "--pretrained", "tiny",
                 "-device", "cpu", "--levels", "9"])
    out = capfd.readouterr()
    assert code == 1 and "Traceback" not in out.out + out.err and "fix:" in out.out + out.err


def test_batch_noise_is_the_same_bits_drawn_in_threads_or_one_by_one():
    """The GPU path draws each (tile, timestep) row in a thread pool into page-locked memory; the rows are
    the draws of their own generators, so the noise (and the features) equal the sequential draw's."""
    from diffprobe.probe.features import batch_noise

    shape, seeds, ts = (5, 12, 10), [3, 77, 123456], [10, 30, 60]
    one_by_one = torch.cat([torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s * 1009 + t))
                                         for t in ts]) for s in seeds])
    assert torch.equal(batch_noise(shape, seeds, ts), one_by_one)
    assert torch.equal(batch_noise(shape, seeds, ts, threads=True), one_by_one)
    assert torch.equal(batch_noise(shape, [77], ts), one_by_one[3:6])
