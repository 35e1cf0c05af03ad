"""BPR quality after a short training through ``pretrain``: monotone cranio-caudal coordinate per scan,
the quality report and figures next to ``bpr_consistency.json``, and tiles that agree.

The real-CT criterion (Spearman rho >= 0.95 on every scan, docs/bpr.md) is measured by
``benchmarks/bench_bpr.py``; this test is the fast guard on small phantoms (about 30 s on 2 cores).
"""

from __future__ import annotations

import numpy as np
import torch

from diffprobe.bpr.evaluate import tile_disagreement
from diffprobe.preprocessing.storage import load_array
from diffprobe.pretraining.pretrain import BPR_SCALE_PER_MM, collect_volumes, pretrain
from diffprobe.pretraining.pretrained_model import PretrainedModel
from diffprobe.utils import read_json

BPR_STEPS = 300


def test_short_bpr_training_gives_monotone_consistent_coordinates_and_a_report(use_phantom_roots):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: OpenMP synchronisation costs more than it saves
    try:
        pretrain(["1"], name="bpr_quality", stage="all", device="cpu", show_progress=False,
                 overrides={"bpr_steps": BPR_STEPS, "diffusion_steps": 1, "num_workers": 0})
        model = PretrainedModel("bpr_quality")
        bpr, crop = model.load_bpr("cpu")
        volumes, _, _ = collect_volumes(["1"])
        # Two crops must give the same voxel the same coordinate wherever the scan sits in them. These
        # phantoms fit one tile in-plane, so the forced shift moves the body from the crop's low end
        # (where inference puts it) to its high end; a crop-relative model is off by the whole shift.
        agree = [tile_disagreement(bpr, load_array(v.data_path), tuple(crop), BPR_SCALE_PER_MM, max_pairs=4,
                                   axes=[1, 2]) for v in volumes]
    finally:
        torch.set_num_threads(threads)

    folder = model.folder
    quality = read_json(folder / "bpr_quality.json")
    assert (folder / "bpr_consistency.json").is_file() and (folder / "bpr_profiles.png").is_file()
    assert sorted(quality["scans"]) == sorted(f"Dataset001_Phantoms/{v.identifier}" for v in volumes)
    for key, scan in quality["scans"].items():
        name = key.split("/")[1]
        assert (folder / "bpr_figures" / "Dataset001_Phantoms" / f"bpr_coordinates_{name}.png").is_file()
        # monotone along every scan; 0.9 rather than the real-CT 0.95: 20-35 slices, 300 steps
        assert scan["spearman_cc"] >= 0.9, (key, scan["spearman_cc"])
        # it spans the scan (not the flat map of the bug: ~5 % of the extent)
        assert scan["range_mm"]["CC"] >= 0.5 * scan["extent_mm"]["CC"], (key, scan["range_mm"], scan["extent_mm"])
    assert quality["summary"]["min_spearman_cc"] >= 0.9
    for v, a in zip(volumes, agree, strict=True):
        shift_x, shift_y = a["shift_voxels"]["x"] * v.spacing[2], a["shift_voxels"]["y"] * v.spacing[1]
        lr, ap = a["mm"]["LR"], a["mm"]["AP"]
        print(f"{v.identifier}: tile disagreement LR {lr:.1f} mm (shift {shift_x:.0f}), AP {ap:.1f} mm "
              f"(shift {shift_y:.0f})")
        assert lr < 0.5 * shift_x and ap < 0.5 * shift_y  # measured: 0.02-0.4 of the shift; crop-relative: 1
    assert np.isfinite(quality["summary"]["consistency_ratio"]["Dataset001_Phantoms"])
