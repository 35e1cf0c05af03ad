"""Helpers of the bad-input matrix (tests/test_bad_inputs*.py): run the CLI in-process, check a clean
refusal, hash a tree, and the ``probe`` fixture (a private copy of the session's trained probe)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dicom_series

from diffprobe.cli.app import main

DS = "Dataset005_Tiny"


# ---- helpers ------------------------------------------------------------------------------
def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha1} of every file under ``folder``: what 'nothing was damaged' compares.

    Left temporary files count (they would show up as new entries); lock files (``.lock``, which
    record the run holding them) do not.
    """
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def run_cli(args: list[str], capfd: pytest.CaptureFixture) -> tuple[int, str]:
    """``diffprobe ARGS`` in-process; (exit code, everything it printed)."""
    capfd.readouterr()  # drop earlier output (e.g. the log line of a previous call)
    code = main(args)
    out, err = capfd.readouterr()
    text = out + err
    print(f"$ diffprobe {' '.join(args)}\n{text}")  # shown with -rP: the messages of docs/bad-inputs.md
    return code, text


def assert_clean_failure(code: int, text: str, *expected: str) -> None:
    """Exit code 1, no traceback, a fix line, and every expected fragment (file names, reasons)."""
    assert code == 1, text
    assert "Traceback" not in text, text
    assert "fix:" in text, text
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


@dataclass
class Roots:
    base: Path
    raw: Path  # the raw dataset folder
    pre: Path  # its preprocessed diffprobe/ folder (plans.json, fingerprint, data/)


def set_dataset_json(folder: Path, **changes: object) -> None:
    ds = json.loads((folder / "dataset.json").read_text())
    ds.update(changes)
    (folder / "dataset.json").write_text(json.dumps(ds))


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def refuse_writes_in(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` non-writable: chmod, plus (root ignores modes) temp files refused in it."""
    folder.chmod(0o555)
    real = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object):
        if Path(str(kwargs.get("dir", ""))).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# ---- rows that need a trained probe (predict, train) ----------------------------------------
@pytest.fixture
def probe(trained_probe_roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    """A private copy of the session's trained probe results (raw and preprocessed are shared,
    read-only); torch on one thread."""
    results = tmp_path / "results"
    shutil.copytree(trained_probe_roots["results"], results,
                    ignore=shutil.ignore_patterns("bpr_maps", "*.png"))
    monkeypatch.setenv("DIFFPROBE_RAW", str(trained_probe_roots["raw"]))
    monkeypatch.setenv("DIFFPROBE_PREPROCESSED", str(trained_probe_roots["preprocessed"]))
    monkeypatch.setenv("DIFFPROBE_RESULTS", str(results))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Roots(tmp_path, trained_probe_roots["raw"] / "Dataset001_Phantoms",
                results / "Dataset001_Phantoms" / "diffprobe" / "tiny__fpn" / "fold_all")
    torch.set_num_threads(threads)


def probe_image(probe: Roots) -> Path:
    return sorted((probe.raw / "imagesTs").glob("*_0000.nii.gz"))[0]


PREDICT = ["-d", "1", "-c", "tiny__fpn", "-f", "all", "-device", "cpu"]


def write_dicom(array: np.ndarray, folder: Path, series_uid: str) -> list[Path]:
    """One series per call; two calls with other UIDs put two series in one folder."""
    return write_dicom_series(array, folder, series_uid=series_uid,
                              file_name=lambda k, n: f"{series_uid[-1]}_{k:03d}.dcm")

