"""Two processes on one output: predict parts never clobber; plan_and_preprocess runs refuse to overlap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conftest import body_volume, make_raw_dataset, write_sitk

from diffprobe.cli.app import main
from diffprobe.predict.predictor import predict


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def test_predict_parts_in_parallel_write_the_full_set(use_trained_probe_roots, tmp_path) -> None:
    """-num_parts 2 -part_id 0/1 at the same time into one folder: every case once, each equal to a
    single-process run's file byte for byte, no temporary files left."""
    inputs = tmp_path / "in"
    for i in range(4):
        img, _ = body_volume((16, 48, 56), seed=i)
        write_sitk(img, inputs / f"case{i}_0000.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffprobe", "predict", "-i", str(inputs), "-o", str(out), "-d", "1",
           "-c", "tiny__fpn", "-f", "all", "-device", "cpu", "-num_parts", "2"]
    procs = [subprocess.Popen([*cmd, "-part_id", str(k)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"case{i}.nii.gz" for i in range(4)], names
    reference = predict(inputs, tmp_path / "ref", dataset=1, configuration="tiny__fpn", folds=["all"],
                        device="cpu", show_progress=False)
    for ref in reference:
        assert (out / ref.name).read_bytes() == ref.read_bytes(), ref.name
        assert len(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / ref.name))))) >= 1


def _snapshot(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    return files | {"plans.json": (out / "plans.json").read_bytes()}


_HOLD_LOCK = """
import sys, time
from diffprobe.locking import folder_lock
with folder_lock(sys.argv[1], "plan_and_preprocess of Dataset005_Tiny"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_plan_and_preprocess_refuses_while_another_run_holds_the_dataset(roots, capfd) -> None:
    """A second run on one dataset says who holds it and exits 1; a SIGKILLed holder leaves no stale lock."""
    make_raw_dataset(roots["raw"])
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1"]) == 0
    out = roots["preprocessed"] / "Dataset005_Tiny" / "diffprobe"
    before = _snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capfd.readouterr()
        code = main(["plan_and_preprocess", "-d", "5", "-np", "1", "--clean"])
        err = capfd.readouterr().err
        assert code == 1
        assert "another plan_and_preprocess" in err and f"pid {holder.pid}" in err and "fix:" in err
        assert "Traceback" not in err
        assert _snapshot(out) == before  # the refused --clean run touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1"]) == 0  # the kernel dropped the killed holder's lock


def test_two_simultaneous_plan_and_preprocess_runs(roots) -> None:
    """Started together: the second either refuses (exit 1, clear message) or runs after the first
    finished; never both at once. The result equals a single run's."""
    make_raw_dataset(roots["raw"], n_labelled=3)
    cmd = [sys.executable, "-m", "diffprobe", "plan_and_preprocess", "-d", "5", "-np", "1"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 1]), outcomes
    for code, err in outcomes:
        if code == 1:
            assert "another plan_and_preprocess" in err and "Traceback" not in err
    out = roots["preprocessed"] / "Dataset005_Tiny" / "diffprobe"
    got = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    assert not [n for n in got if ".tmp" in n]
    import shutil

    shutil.rmtree(roots["preprocessed"] / "Dataset005_Tiny")
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == got


def test_rerun_removes_leftover_temp_files_of_a_killed_run(roots) -> None:
    """Under the lock no other run can be writing, so temporary files of killed writes are removed."""
    make_raw_dataset(roots["raw"])
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1"]) == 0
    out = roots["preprocessed"] / "Dataset005_Tiny" / "diffprobe"
    leftovers = [out / ".plans.json.k1ll3d.tmp.json", out / ".dataset_fingerprint.json.x.tmp.json"]
    for f in leftovers:
        f.write_text("{half")
    assert main(["plan_and_preprocess", "-d", "5", "-np", "1"]) == 0
    assert not any(f.exists() for f in leftovers)
