"""benchmarks/gpu_suite.sh: the CPU dry run goes through every section's code path and writes a complete report.

Why: the suite exists for the day a GPU is lent, when there is no time to debug it; without a GPU
the dry run (same code, tiny sizes, CPU against itself, ``torch.compile`` with the eager backend,
DDP with gloo) is the only check that it works end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


@pytest.mark.slow
def test_dry_run_covers_every_section(tmp_path: Path) -> None:
    report_path = tmp_path / "suite.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFPROBE_", "nnUNet_"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run([str(SUITE), "--device", "cpu", "--dry-run", "--ddp-on-cpu", "--workdir",
                           str(tmp_path / "work"), "--json", str(report_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert set(sections) == {"setup", "agreement", "peak", "pretrain", "profile", "predict", "compile", "ddp"}
    assert not [name for name, s in sections.items() if "error" in s or "skipped" in s]

    agree = sections["agreement"]  # the CPU against itself: identical
    assert agree["denoiser_fp32"]["max_abs_diff"] == 0 and agree["probe_logits_fp32"]["argmax_agreement"] == 1
    assert agree["small_predict"]["label_agreement"] == 1
    # the step's FLOPs, counted by FlopCounterMode, agree with the hook-based forward count x 3 within 10 %
    pre = sections["pretrain"]
    assert pre["step_flops"] == pytest.approx(pre["step_flops_3x_forward_flops"], rel=0.1)
    rows = pre["rows"] + sections["compile"]["rows"]
    assert {(r["channels_last"], r["compile"]) for r in rows} == {(a, b) for a in (False, True) for b in (False, True)}
    assert all(r["patches_per_s"] > 0 and r["of_peak"] > 0 for r in rows)
    assert sections["predict"]["runs"][0]["seconds"] > 0 and "window_s" in sections["predict"]["runs"][0]["phases_s"]
    for key in ("train_step", "inference_forward_batch2"):  # the profile: per-step time and the top CPU operators
        prof = sections["profile"][key]
        assert prof["wall_ms_per_step"] > 0 and prof["cpu_ops_per_step"] > 10
        assert any("conv" in r["name"] for r in prof["top_cpu"]) and "device_busy_share" not in prof
    assert sections["ddp"]["world_size"] == 2 and sections["ddp"]["patches_per_s"] > 0
    assert "| measure | value | goal |" in done.stdout


@pytest.mark.slow
def test_gpu_graphs_dry_run_writes_every_section(tmp_path: Path) -> None:
    """benchmarks/gpu_graphs.py (GPU day 2's measurements) through its CPU dry run: every section runs,
    the tile function's timings and the training rows are in the report."""
    script = SUITE.with_name("gpu_graphs.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFPROBE_", "nnUNet_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(SUITE.parents[1]))
    report_path = tmp_path / "graphs.json"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--dry-run", "--workdir",
                           str(tmp_path / "work"), "--json", str(report_path)],
                          cwd=SUITE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    sections = json.loads(report_path.read_text())["sections"]
    assert set(sections) == {"setup", "window", "train", "predict"}
    assert [r["tile_batch"] for r in sections["window"]["rows"]] == [2, 4]
    assert all(r["ms_per_tile"] > 0 and r["noise_host_ms_per_batch"] > 0 for r in sections["window"]["rows"])
    assert [r["batch"] for r in sections["train"]["rows"]] == [1, 2]
    assert all(r["patches_per_s"] > 0 for r in sections["train"]["rows"])
    assert sections["predict"]["rows"][0]["best_s"] > 0


def test_gpu_trainer_graphs_dry_run_compares_the_two_trainers(tmp_path: Path) -> None:
    """benchmarks/gpu_trainer_graphs.py (the trainer eager vs --cuda_graphs) through its CPU dry run: both
    runs train, and on a CPU (no capture there) they are the same run, bit for bit."""
    script = SUITE.with_name("gpu_trainer_graphs.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFPROBE_", "nnUNet_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(SUITE.parents[1]))
    report_path = tmp_path / "trainer_graphs.json"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--dry-run", "--json", str(report_path)],
                          cwd=SUITE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    assert report["eager"]["ms_per_step"] > 0 and report["cuda_graphs"]["ms_per_step"] > 0
    assert len(report["eager"]["losses"]) == report["steps"] == len(report["cuda_graphs"]["losses"])
    for name in ("cuda_graphs", "cuda_graphs_native_norm"):
        assert report[name]["capture"] is None  # no graph on a CPU: the same run as eager, bit for bit
        assert report["comparison"][name]["loss_max_rel_diff"] == 0
        assert report["comparison"][name]["weights_max_diff_rel_to_scale"] == 0
