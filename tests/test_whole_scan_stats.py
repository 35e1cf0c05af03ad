"""The label-free organ statistics of ``benchmarks/real_ct_whole_scans.py`` (volume, pieces, z extent)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_organ_stats_count_pieces_volume_and_extent():
    from real_ct_whole_scans import organ_stats

    seg = np.zeros((10, 20, 20), np.uint8)
    seg[2:6, 2:10, 2:10] = 3  # 4 x 8 x 8 = 256 voxels
    seg[8, 15, 15] = 3  # a stray voxel, not touching (26-connectivity)
    seg[6, 10, 10] = 3  # touches the corner voxel (5, 9, 9) diagonally: the same piece
    stats = organ_stats(seg, (3.0, 1.5, 1.5), 3)
    assert stats["components"] == 2
    assert stats["ml"] == round(258 * 3.0 * 1.5 * 1.5 / 1000, 1)
    assert stats["largest_share"] == round(257 / 258, 3)
    assert stats["z_extent_mm"] == (8 - 2 + 1) * 3.0
    assert organ_stats(seg, (3.0, 1.5, 1.5), 5) == {"ml": 0.0, "components": 0, "largest_share": 0.0,
                                                      "z_extent_mm": 0.0, "outside_body_ml": 0.0}


def test_outside_the_body_is_air_and_table_not_lungs():
    from real_ct_whole_scans import organ_stats

    from diffprobe.preprocessing.cropping import filled_body

    image = np.full((4, 40, 40), -1000.0)
    image[:, 5:30, 5:35] = 40.0  # the body
    image[:, 10:20, 10:20] = -850.0  # a lung inside it: in the filled body
    image[:, 34:37, 2:38] = 200.0  # the table, a separate piece below the body
    body = filled_body(image)
    assert body[:, 15, 15].all() and not body[:, 35, 20].any() and not body[:, 2, 2].any()
    seg = np.zeros(image.shape, np.uint8)
    seg[:, 12:14, 12:14] = 1  # in the lung: inside
    seg[0, 35, 20:22] = 1  # two voxels on the table
    seg[1, 1, 1] = 1  # one in the air
    stats = organ_stats(seg, (2.0, 1.0, 1.0), 1, body)
    assert stats["outside_body_ml"] == round(3 * 2.0 / 1000, 2)


def test_selected_inputs_hold_exactly_the_scans_asked_for(tmp_path):
    """``--scans pancreas001`` after a run on three scans predicts one scan, not the whole copy cache
    (it did: the seconds of three scans were read as one's)."""
    from real_ct_whole_scans import selected_inputs

    cache = tmp_path / "whole_scans" / "img"
    cache.mkdir(parents=True)
    for scan in ("crlm1004", "crlm1006", "pancreas001"):
        (cache / f"{scan}_0000.nii.gz").write_bytes(scan.encode())
    assert sorted(p.name for p in selected_inputs(cache, ["crlm1004", "crlm1006"]).iterdir()) == \
        ["crlm1004_0000.nii.gz", "crlm1006_0000.nii.gz"]
    selected = selected_inputs(cache, ["pancreas001"])
    assert [p.name for p in selected.iterdir()] == ["pancreas001_0000.nii.gz"]
    assert (selected / "pancreas001_0000.nii.gz").read_bytes() == b"pancreas001"


def test_placement_offset_in_the_bpr_frame():
    """``real_ct_placement``: an organ predicted 4 voxels (6 mm) posterior of the labelled one, inside its
    cranio-caudal band, is 6 mm off; its voxels outside the band do not move the centroid; an organ not
    predicted in the band has no offset."""
    from real_ct_placement import organ_placement, reference_placement

    shape = (12, 30, 30)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    coords = np.stack([x * 0.015, y * 0.015, z * 0.03])  # LR, AP, CC; 1.5 mm in-plane, 3 mm slices
    hu = np.full(shape, 40.0)
    seg = np.zeros(shape, np.uint8)
    seg[2:4, 10:14, 10:14] = 8
    hu[2:4, 10:14, 10:14] = 150.0
    ref = reference_placement(seg, coords, hu, 8)
    assert ref["median_hu"] == 150.0 and np.allclose(ref["band"], [0.06 - 0.05, 0.09 + 0.05])
    pred = np.zeros(shape, np.uint8)
    pred[2:4, 14:18, 10:14] = 8  # 4 voxels posterior
    pred[10:12, 0:3, 0:3] = 8  # far outside the band (z 10-11: CC 0.30-0.33)
    out = organ_placement(pred, coords, hu, 8, ref, voxel_ml=0.00675)
    assert out["ap_mm"] == 6.0 and out["offset_mm"] == 6.0
    assert out["band_ml"] == round(32 * 0.00675, 1) and out["median_hu"] == 40.0
    assert reference_placement(seg, coords, hu, 5) is None
    none = organ_placement(np.zeros(shape, np.uint8), coords, hu, 8, ref, voxel_ml=0.00675)
    assert none["offset_mm"] is None and none["median_hu"] is None and none["ml"] == 0.0


def test_guidance_shift_offsets_only_inside_the_context(monkeypatch):
    """``real_ct_guidance_shift``: the BPR guidance predict computes is offset per channel (LR, AP, CC) inside
    the context and restored after it; the relabelled share counts voxels foreground in either map."""
    import torch
    from real_ct_guidance_shift import label_change, shifted_guidance

    from diffprobe import guidance

    monkeypatch.setattr(guidance, "bpr_coordinates", lambda model, data, crop: torch.zeros(3, 2, 2, 2).half())
    mode = guidance.BprGuidance()
    with shifted_guidance((0.1, -0.3, 1.0)):
        shifted = mode.volume(np.zeros((1, 2, 2, 2)), (3.0, 1.5, 1.5), bpr=object(), bpr_crop=(1, 1, 1))
    assert torch.allclose(shifted[:, 1, 1, 1], torch.tensor([0.1, -0.3, 1.0]))
    assert torch.equal(mode.volume(np.zeros((1, 2, 2, 2)), (3.0, 1.5, 1.5), bpr=object(), bpr_crop=(1, 1, 1)),
                       torch.zeros(3, 2, 2, 2))
    ref = np.array([0, 0, 1, 1, 2, 2])
    new = np.array([0, 3, 1, 2, 2, 0])  # 5 voxels foreground in either map, 3 of them changed
    assert label_change(ref, new) == 3 / 5 and label_change(ref, ref) == 0.0
