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
                                                      "z_extent_mm": 0.0}
