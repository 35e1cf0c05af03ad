"""Guidance modes (diffprobe.guidance) and the BPR map cache (diffprobe.pretraining.bpr_maps).

Every mode: the patch at start s equals the whole-volume guidance cropped at s (training patches and
predict tiles see the same thing); the random field depends on position only. BPR maps: computed
once, reused while nothing changed, recomputed when the BPR checkpoint or the preprocessed case did.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffprobe import guidance as gd
from diffprobe.errors import DiffprobeError
from diffprobe.preprocessing.storage import save_case
from diffprobe.preprocessing.volumes import VolumeRef, volume_refs

SHAPE = (10, 24, 28)
SPACING = (2.0, 1.3, 0.9)
CROP = [8, 16, 16]  # a multiple of the tiny BPR's total stride (4, 8, 8)
STARTS = [(0, 0, 0), (2, 5, 7), (4, 8, 12)]
SIZE = (6, 16, 16)


def write_case(data_dir: Path, identifier: str, seed: int = 0, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.uniform(-1, 1, size=(1, *shape)).astype(np.float32)
    seg = (rng.uniform(size=shape) > 0.7).astype(np.uint8)
    props = {"shape_after_resampling": list(shape), "target_spacing": list(spacing), "labelled": True,
             "preprocessing_hash": "test", "class_locations": {"1": [[1, 2, 3]]}}
    save_case(data_dir, identifier, data, seg, props, None)
    return data


@pytest.fixture
def case(tmp_path):
    data_dir = tmp_path / "preprocessed" / "Dataset009_Tiny" / "diffprobe" / "data"
    data = write_case(data_dir, "case0")
    return volume_refs(data_dir, ["case0"])[0], data


def tiny_bpr() -> torch.nn.Module:
    from diffprobe.bpr import BodyPartRegressor

    torch.manual_seed(0)
    return BodyPartRegressor(width=2).eval()


def crop_at(volume: torch.Tensor, start, size) -> np.ndarray:
    return volume[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, size))].numpy()


def test_registry_one_entry_per_mode():
    assert gd.GUIDANCE_MODES == ("bpr", "none", "random", "physical")
    assert {m: gd.guidance_channels(m) for m in gd.GUIDANCE_MODES} == {"bpr": 3, "none": 0, "random": 3,
                                                                         "physical": 3}
    assert all(gd.MODES[m].name == m for m in gd.GUIDANCE_MODES)
    with pytest.raises(ValueError, match="guidance must be one of"):
        gd.guidance_channels("coords")
    from diffprobe.pretraining import data as pdata

    assert pdata.GUIDANCE_MODES == gd.GUIDANCE_MODES and pdata.VolumeRef is VolumeRef


@pytest.mark.parametrize("mode", ["none", "random", "physical"])
def test_patch_equals_whole_volume_cropped(case, mode):
    ref, data = case
    whole = gd.volume_guidance(mode, data, SPACING)
    if mode == "none":
        assert whole is None and gd.patch_guidance(mode, ref, (0, 0, 0), SIZE) is None
        return
    assert whole.dtype == torch.float32 and tuple(whole.shape) == (gd.guidance_channels(mode), *SHAPE)
    for start in STARTS:
        patch = gd.patch_guidance(mode, ref, np.array(start), SIZE)
        assert patch.dtype == np.float32 and patch.shape == (3, *SIZE)
        assert np.array_equal(patch, crop_at(whole, start, SIZE)), start
    # a patch reaching outside the volume (pretraining's augmentation margin) agrees where it overlaps
    outside = gd.patch_guidance(mode, ref, np.array([-2, -3, -4]), SIZE)
    assert np.array_equal(outside[:, 2:, 3:, 4:], crop_at(whole, (0, 0, 0), (4, 13, 12)))


def test_random_guidance_depends_on_position_only(case, tmp_path):
    ref, data = case
    other_dir = tmp_path / "elsewhere" / "Dataset010_Other" / "diffprobe" / "data"
    other_data = write_case(other_dir, "a_different_name", seed=5, shape=(12, 30, 20), spacing=(3.0, 0.7, 0.7))
    other = volume_refs(other_dir, ["a_different_name"])[0]
    start = np.array([1, 2, 3])
    assert np.array_equal(gd.patch_guidance("random", ref, start, SIZE),
                          gd.patch_guidance("random", other, start, SIZE))
    a, b = gd.volume_guidance("random", data, SPACING), gd.volume_guidance("random", other_data, (3.0, 0.7, 0.7))
    assert torch.equal(a[:, :10, :24, :20], b[:, :10, :24, :20])
    g = a.numpy()
    assert g.min() >= -1 and g.max() < 1 and abs(g.mean()) < 0.05 and abs(g.std() - 3 ** -0.5) < 0.02
    assert abs(np.corrcoef(g[0, :, :, 1:].ravel(), g[0, :, :, :-1].ravel())[0, 1]) < 0.05
    assert not np.array_equal(g[0], g[1])


def test_physical_guidance_definition(case):
    ref, _ = case
    g = gd.patch_guidance("physical", ref, np.array([1, 2, 3]), SIZE)
    centre = (np.array(SHAPE) - 1) / 2
    z, y, x = 4, 5, 6  # patch voxel -> volume voxel (5, 7, 9)
    expected = [(9 - centre[2]) * SPACING[2], (7 - centre[1]) * SPACING[1], (5 - centre[0]) * SPACING[0]]
    assert np.allclose(g[:, z, y, x], np.array(expected) / gd.PHYSICAL_SCALE_MM)


def test_bpr_patch_equals_whole_volume_cropped(case, tmp_path):
    from diffprobe.pretraining.bpr_maps import write_bpr_maps

    ref, data = case
    model = tiny_bpr()
    with pytest.raises(ValueError, match="BPR stage"):
        gd.MODES["bpr"].check([ref])
    (mapped,) = write_bpr_maps(model, [ref], CROP, tmp_path / "model", torch.device("cpu"), bpr_checksum="abc")
    gd.MODES["bpr"].check([mapped])
    whole = gd.volume_guidance("bpr", data, SPACING, model, CROP)
    assert tuple(whole.shape) == (3, *SHAPE) and whole.dtype == torch.float32
    for start in STARTS:
        assert np.array_equal(gd.patch_guidance("bpr", mapped, np.array(start), SIZE), crop_at(whole, start, SIZE))


@pytest.mark.parametrize("mode", ["random", "physical", "bpr"])
def test_probe_patches_match_predict_guidance(case, tmp_path, mode):
    """The probe's training patch and predict's whole-volume guidance (predictor.volume_guidance) agree."""
    from diffprobe.predict.predictor import volume_guidance
    from diffprobe.probe.data import LabelledPatches, labelled_volumes

    ref, data = case
    model = tiny_bpr()
    if mode == "bpr":
        from diffprobe.pretraining.bpr_maps import write_bpr_maps

        (ref,) = write_bpr_maps(model, [ref], CROP, tmp_path / "model", torch.device("cpu"), bpr_checksum="abc")
    (vol,) = labelled_volumes([ref])
    patch = LabelledPatches([vol], list(SIZE), 1, mode).patch_at(vol, np.array([2, 5, 7]))["guidance"]
    probe = SimpleNamespace(meta={"guidance": mode}, bpr=model if mode == "bpr" else None,
                            bpr_crop=CROP if mode == "bpr" else None)
    whole = volume_guidance(probe, data, "ignored", list(SPACING), torch.device("cpu"))
    assert np.array_equal(patch, crop_at(whole, (2, 5, 7), SIZE))


# ---- the BPR map cache -----------------------------------------------------------------------
def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def _age(path: Path) -> None:
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # so a rewrite is seen whatever the clock's resolution


def test_bpr_maps_written_once_and_reused(case, tmp_path):
    from diffprobe.pretraining.bpr_maps import stamp_path, with_bpr_maps, write_bpr_maps

    ref, _ = case
    out, cpu, model = tmp_path / "model", torch.device("cpu"), tiny_bpr()
    (mapped,) = write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="abc")
    path = mapped.guidance_path
    assert path == out / "bpr_maps" / "Dataset009_Tiny" / "case0.b2nd" and path.is_file()
    assert stamp_path(path).is_file()
    _age(path)
    assert write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="abc") == [mapped]
    assert _mtime(path) == 1_000_000_000  # reused, not recomputed
    assert with_bpr_maps([ref], out, bpr_checksum="abc") == [mapped]


def test_bpr_maps_recomputed_when_bpr_changes(case, tmp_path):
    from diffprobe.pretraining.bpr_maps import with_bpr_maps, write_bpr_maps

    ref, _ = case
    out, cpu, model = tmp_path / "model", torch.device("cpu"), tiny_bpr()
    (mapped,) = write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="abc")
    _age(mapped.guidance_path)
    with pytest.raises(DiffprobeError, match="another BPR"):
        with_bpr_maps([ref], out, bpr_checksum="def")  # e.g. the BPR continued with --c --bpr_steps
    write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="def")
    assert _mtime(mapped.guidance_path) != 1_000_000_000
    assert with_bpr_maps([ref], out, bpr_checksum="def") == [mapped]
    with pytest.raises(DiffprobeError):
        with_bpr_maps([ref], out, bpr_checksum="abc")


def test_bpr_maps_recomputed_when_case_changes(case, tmp_path):
    from diffprobe.pretraining.bpr_maps import with_bpr_maps, write_bpr_maps

    ref, _ = case
    out, cpu, model = tmp_path / "model", torch.device("cpu"), tiny_bpr()
    (mapped,) = write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="abc")
    _age(mapped.guidance_path)
    # re-preprocessed at another spacing: new shape, new properties
    write_case(ref.data_dir, "case0", seed=1, shape=(12, 20, 28), spacing=(1.5, 1.3, 0.9))
    (new_ref,) = volume_refs(ref.data_dir, ["case0"])
    with pytest.raises(DiffprobeError, match="another preprocessing"):
        with_bpr_maps([new_ref], out, bpr_checksum="abc")
    (remapped,) = write_bpr_maps(model, [new_ref], CROP, out, cpu, bpr_checksum="abc")
    assert _mtime(remapped.guidance_path) != 1_000_000_000
    from diffprobe.preprocessing.storage import open_array

    assert open_array(remapped.guidance_path).shape == (3, 12, 20, 28)
    # same properties, data file rewritten (e.g. preprocessed again): recomputed too, never trusted
    _age(remapped.guidance_path)
    write_case(ref.data_dir, "case0", seed=2, shape=(12, 20, 28), spacing=(1.5, 1.3, 0.9))
    write_bpr_maps(model, [new_ref], CROP, out, cpu, bpr_checksum="abc")
    assert _mtime(remapped.guidance_path) != 1_000_000_000


def test_bpr_map_without_stamp_is_recomputed(case, tmp_path):
    """A write killed between the map and its stamp leaves a map that is never used."""
    from diffprobe.pretraining.bpr_maps import stamp_path, with_bpr_maps, write_bpr_maps

    ref, _ = case
    out, cpu, model = tmp_path / "model", torch.device("cpu"), tiny_bpr()
    (mapped,) = write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="abc")
    stamp_path(mapped.guidance_path).unlink()
    _age(mapped.guidance_path)
    with pytest.raises(DiffprobeError, match="missing"):
        with_bpr_maps([ref], out, bpr_checksum="abc")
    write_bpr_maps(model, [ref], CROP, out, cpu, bpr_checksum="abc")
    assert _mtime(mapped.guidance_path) != 1_000_000_000 and stamp_path(mapped.guidance_path).is_file()


def test_bpr_checksum_defaults_to_the_models_checkpoint(case, tmp_path):
    from diffprobe.pretraining.bpr_maps import with_bpr_maps, write_bpr_maps
    from diffprobe.pretraining.pretrained_model import BPR_CKPT, weights_checksum
    from diffprobe.training.checkpoint import save_checkpoint

    ref, _ = case
    out, cpu, model = tmp_path / "model", torch.device("cpu"), tiny_bpr()
    with pytest.raises(DiffprobeError, match="no trained BPR"):
        write_bpr_maps(model, [ref], CROP, out, cpu)
    ckpt = out / BPR_CKPT
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(ckpt, {"model": {"w": torch.ones(3)}})
    write_bpr_maps(model, [ref], CROP, out, cpu)
    assert with_bpr_maps([ref], out, bpr_checksum=weights_checksum({"w": torch.ones(3)}))[0].guidance_path.is_file()
    save_checkpoint(ckpt, {"model": {"w": torch.ones(3)}, "step": 7})  # rewritten, same weights: still current
    assert with_bpr_maps([ref], out)[0].guidance_path.is_file()
    save_checkpoint(ckpt, {"model": {"w": torch.full((3,), 2.0)}})  # the BPR trained further
    with pytest.raises(DiffprobeError, match="another BPR"):
        with_bpr_maps([ref], out)
