"""The demo end to end at reduced size (the README's main job, shrunk for CI)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def no_root_env(monkeypatch):
    for var in ("DIFFPROBE_RAW", "DIFFPROBE_PREPROCESSED", "DIFFPROBE_RESULTS"):
        monkeypatch.delenv(var, raising=False)


def test_demo_quick_runs_end_to_end_and_resumes(tmp_path, capsys, no_root_env):
    import torch

    from diffprobe.cli.app import main

    torch.set_num_threads(1)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out), "--compare-random"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "pretrained" in text and "random init" in text
    for model in ("demo", "demo_random_init"):
        summary = json.loads((out / "predictions" / model / "summary.json").read_text())
        assert summary["num_cases"] == 1 and set(summary["labels"]) >= {"liver", "aorta"}
    assert (out / "overlay.png").stat().st_size > 1000
    ckpt = out / "results" / "pretrained" / "demo" / "diffusion" / "checkpoint_final.pt"
    seg = next((out / "predictions" / "demo").glob("*.nii.gz"))
    stamps = (ckpt.stat().st_mtime_ns, seg.stat().st_mtime_ns)
    assert main(["demo", "--quick", "-o", str(out)]) == 0  # rerun: every stage is found finished
    assert (ckpt.stat().st_mtime_ns, seg.stat().st_mtime_ns) == stamps
