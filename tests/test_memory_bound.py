"""Prediction RAM: the documented bound, refusing inputs that exceed it, and a measured peak under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import body_volume, write_sitk

from diffprobe.cli.app import main
from diffprobe.predict.memory import FIXED_BYTES, available_bytes, estimate_predict_bytes

MODEL = ["-d", "1", "-c", "tiny__fpn", "-f", "all"]


def test_bound_of_a_large_ct_is_stated_per_phase() -> None:
    """512x512x600 at 0.8x0.8x1.5 mm, 7 classes, planned at ~3.1x0.8x0.8 mm."""
    est = estimate_predict_bytes((600, 512, 512), (1.5, 0.8, 0.8), (3.12, 0.8, 0.8), 7)
    assert est.raw_voxels == 600 * 512 * 512
    assert est.grid_voxels == 288 * 512 * 512
    assert est.window_bytes == pytest.approx(4 * est.grid_voxels * (2 + 3 + 7))
    assert est.total_bytes == FIXED_BYTES + max(est.read_bytes, est.window_bytes, est.write_bytes)
    ensemble = estimate_predict_bytes((600, 512, 512), (1.5, 0.8, 0.8), (3.12, 0.8, 0.8), 7, num_probes=5)
    probs = estimate_predict_bytes((600, 512, 512), (1.5, 0.8, 0.8), (3.12, 0.8, 0.8), 7, save_probabilities=True)
    assert ensemble.total_bytes > est.total_bytes and probs.total_bytes > est.total_bytes
    assert "window" in est.describe()


def test_memory_limit_override(monkeypatch) -> None:
    monkeypatch.setenv("DIFFPROBE_MEMORY_LIMIT_GB", "1.5")
    assert available_bytes() == 1.5e9


def test_refuses_an_input_larger_than_memory_allows(use_trained_probe_roots, tmp_path, monkeypatch, capfd) -> None:
    """Refused before any pixel is read: one message naming the file, exit 1, earlier outputs intact."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    img, _ = body_volume((20, 56, 64))
    big = write_sitk(img, inputs / "big_0000.nii.gz")
    out.mkdir()
    earlier = out / "earlier.nii.gz"
    earlier.write_bytes(b"an earlier prediction")
    monkeypatch.setenv("DIFFPROBE_MEMORY_LIMIT_GB", "0.05")
    code = main(["predict", "-i", str(inputs), "-o", str(out), *MODEL, "-device", "cpu"])
    err = capfd.readouterr().err
    assert code == 1
    assert str(big) in err and "needs about" in err and "DIFFPROBE_MEMORY_LIMIT_GB" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["earlier.nii.gz"]
    assert earlier.read_bytes() == b"an earlier prediction"


_MEASURE = r"""
import json, sys
import psutil, torch
torch.set_num_threads(1)
from diffprobe.predict.predictor import predict
args = json.loads(sys.argv[1])
predict(args["warm"], args["out_warm"], dataset=1, configuration="tiny__fpn", folds=["all"], device="cpu",
        show_progress=False)
base = psutil.Process().memory_info().rss
predict(args["big"], args["out_big"], dataset=1, configuration="tiny__fpn", folds=["all"], device="cpu",
        step_size=1.0, show_progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (here: pytest)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": peak}))
"""


def test_measured_peak_stays_under_the_bound(use_trained_probe_roots, tmp_path) -> None:
    """A volume large enough that its arrays, not the fixed cost, dominate: its RAM above the warmed-up
    process stays within the bound's data part (the bound minus FIXED_BYTES)."""
    pytest.importorskip("psutil")
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc for the process's peak RSS")
    from diffprobe.predict.memory import estimate_for_input
    from diffprobe.probe.model import probe_dir
    from diffprobe.utils import read_json

    shape, spacing = (96, 192, 208), (0.9, 0.9, 1.5)  # z, y, x  /  x, y, z (SimpleITK order)
    img, _ = body_volume(shape)
    big = write_sitk(img, tmp_path / "big" / "big_0000.nii.gz", spacing)
    small, _ = body_volume((20, 56, 64))
    write_sitk(small, tmp_path / "warm" / "warm_0000.nii.gz")
    args = {"big": str(tmp_path / "big"), "warm": str(tmp_path / "warm"),
            "out_big": str(tmp_path / "out_big"), "out_warm": str(tmp_path / "out_warm")}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    bound = estimate_for_input(big, read_json(probe_dir(1, "tiny__fpn", "all") / "probe.json"))
    data_part = bound.total_bytes - FIXED_BYTES
    assert bound.raw_voxels == int(np.prod(shape))
    assert measured["peak"] - measured["base"] <= data_part, (measured, bound.describe())
    assert (tmp_path / "out_big" / "big.nii.gz").is_file()


def _peak_pss(cmd: list[str], env: dict[str, str]) -> float:
    """Peak PSS (GB) summed over ``cmd``'s process tree, by the benchmarks' own sampler."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _measure import run_measured

    m = run_measured(cmd, env=env, pss=True)
    assert m.returncode == 0, m.output_tail
    return m.peak_pss_gb


def test_preprocessing_workers_do_not_multiply_ram(roots) -> None:
    """-np 2 holds about one case per worker: its peak PSS stays below twice the -np 1 peak
    (which already includes the interpreter and imports once)."""
    psutil = pytest.importorskip("psutil")
    if not hasattr(psutil.Process().memory_full_info(), "pss"):
        pytest.skip("PSS needs Linux smaps")
    from conftest import make_raw_dataset

    make_raw_dataset(roots["raw"], n_labelled=4, n_unlabelled=0, shape=(100, 256, 256), spacing=(0.8, 0.8, 2.0))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "diffprobe", "plan_and_preprocess", "-d", "5", "--clean"]
    one = _peak_pss([*base, "-np", "1"], env)
    two = _peak_pss([*base, "-np", "2"], env)
    assert two < 2 * one, (one, two)
