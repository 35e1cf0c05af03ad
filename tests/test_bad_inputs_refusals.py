"""The bad-input matrix (docs/bad-inputs.md), issue 15's clean refusals: timesteps, folds, model.json
dataset names, install limits. Same contract as tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_inputs_support import (
    Roots,
    assert_clean_failure,
    probe,  # noqa: F401  (a fixture)
    probe_image,
    run_cli,
    tree_hashes,
)


# ---- clean refusals of issue 15 (timesteps, folds, model.json dataset names, install limits) ----
def _num_timesteps(probe: Roots) -> int:
    meta = json.loads((probe.base / "results" / "pretrained" / "tiny" / "model.json").read_text())
    return int(meta["plans"]["diffusion"]["num_timesteps"])


@pytest.mark.parametrize("command", [
    ["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--steps", "1", "-device", "cpu"],
    ["ablate", "timesteps", "-d", "1", "-f", "all", "-m", "tiny", "--steps", "1", "-device", "cpu"],
    ["tune_timesteps", "-d", "1", "-f", "all", "-m", "tiny", "--steps", "1", "-device", "cpu", "--dry_run"],
    ["features", "-i", "IMAGE", "-o", "OUT", "--pretrained", "tiny", "-device", "cpu"],
], ids=["train", "ablate_timesteps", "tune_timesteps", "features"])
def test_timestep_out_of_range(probe: Roots, tmp_path: Path, command: list[str],
                               capfd: pytest.CaptureFixture) -> None:
    """`--t 5000` of a model with T steps: one message naming the range from the model's plans, up front
    (nothing trained, no probe folder, no features file), not a ValueError of the feature extractor."""
    steps = _num_timesteps(probe)
    args = [str(probe_image(probe)) if a == "IMAGE" else str(tmp_path / "f.npz") if a == "OUT" else a
            for a in command]
    results = probe.base / "results"
    before = tree_hashes(results)
    code, text = run_cli([*args, "--t", "10", str(steps + 4000)], capfd)
    assert_clean_failure(code, text, "pretrained/tiny/model.json", f"--t {steps + 4000}: outside the diffusion "
                         f"steps of the pretrained model 'tiny', 0 to {steps - 1}", f"choose --t between 0 and "
                         f"{steps - 1}")
    assert tree_hashes(results) == before
    assert not (tmp_path / "f.npz").exists()


@pytest.fixture
def probe_own_splits(probe: Roots, trained_probe_roots: dict[str, Path], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> Roots:
    """``probe`` with a private copy of the preprocessed dataset: a fold run creates splits_final.json
    there, which must not land in the session's shared folder."""
    pre = tmp_path / "preprocessed"
    shutil.copytree(trained_probe_roots["preprocessed"], pre)
    monkeypatch.setenv("DIFFPROBE_PREPROCESSED", str(pre))
    return probe


FOLD_COMMANDS = {
    "train": ["train", "-d", "1", "--pretrained", "tiny", "--steps", "1", "-device", "cpu"],
    "ablate_timesteps": ["ablate", "timesteps", "-d", "1", "-m", "tiny", "--t", "10", "--steps", "1", "-device", "cpu"],
    "ablate_controls": ["ablate", "controls", "-d", "1", "--pretrained", "tiny", "--quick", "-device", "cpu"],
    "ablate_labels": ["ablate", "labels", "-d", "1", "--n", "1", "--pretrained", "tiny", "--quick", "-device", "cpu"],
    "tune_timesteps": ["tune_timesteps", "-d", "1", "-m", "tiny", "--t", "10", "--steps", "1", "-device", "cpu",
                       "--dry_run"],
}


@pytest.mark.parametrize("fold,message", [
    ("-1", "-f -1: fold '-1' does not exist, folds are numbered 0 to 2 (3 folds in splits_final.json); they do "
           "not count from the end (-1 is not the last fold)"),
    ("3", "-f 3: fold '3' does not exist, folds are numbered 0 to 2 (3 folds in splits_final.json)"),
    ("x", "-f x: fold 'x' does not exist, folds are numbered 0 to 2"),
], ids=["negative", "past_the_last", "not_a_number"])
@pytest.mark.parametrize("command", list(FOLD_COMMANDS))
def test_fold_that_does_not_exist(probe_own_splits: Roots, command: str, fold: str, message: str,
                                  capfd: pytest.CaptureFixture) -> None:
    """`-f -1` used to mean Python's "last split" (trained into fold_-1/); `-f 3` of 3 folds: refused up
    front, naming the splits file and the valid folds; nothing trained or pretrained."""
    results = probe_own_splits.base / "results"
    before = tree_hashes(results)
    code, text = run_cli([*FOLD_COMMANDS[command], "-f", fold], capfd)
    assert_clean_failure(code, text, "splits_final.json", message, "use -f 0..2 or -f all")
    assert tree_hashes(results) == before


def test_predict_fold_that_does_not_exist(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """predict checks -f against the trained folds (here only `all`): -1 is not 'the last one'."""
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), "-d", "1",
                          "-c", "tiny__fpn", "-f", "-1", "-device", "cpu"], capfd)
    assert_clean_failure(code, text, "tiny__fpn: fold(s) -1 of tiny__fpn are not trained (available: all)",
                         "choose existing folds with -f")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where,name", [
    ("datasets", "../../x"), ("datasets", "/abs"), ("datasets", "Dataset001_../../x"), ("plans", "../x"),
])
@pytest.mark.parametrize("command", [
    ["sample", "--name", "tiny", "-n", "1", "--steps", "1"],
    ["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--steps", "1", "-device", "cpu"],
], ids=["sample", "train"])
def test_model_json_dataset_name_with_path_parts(probe: Roots, where: str, name: str, command: list[str],
                                                 capfd: pytest.CaptureFixture) -> None:
    """A model.json naming its dataset '../../x' or '/abs' is refused, not followed into that folder."""
    model_json = probe.base / "results" / "pretrained" / "tiny" / "model.json"
    meta = json.loads(model_json.read_text())
    if where == "datasets":
        meta["datasets"] = [name]
    else:
        meta["plans"]["dataset"] = name
    model_json.write_text(json.dumps(meta))
    before = tree_hashes(probe.base / "results")
    code, text = run_cli(command, capfd)
    assert_clean_failure(code, text, f"{model_json}: model.json names dataset(s) {name!r} that are not plain "
                         "DatasetXXX_Name folder names", "pretrain the model again")
    assert tree_hashes(probe.base / "results") == before


def test_install_model_dataset_name_with_path_parts(probe: Roots, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture) -> None:
    archive = tmp_path / "tiny.zip"
    assert run_cli(["export_model", "tiny", str(archive)], capfd)[0] == 0
    _rewrite_zip(archive, lambda members: members.update(
        {"model.json": json.dumps({**json.loads(members["model.json"]), "datasets": ["../../x"]}).encode()}))
    code, text = run_cli(["install_model", str(archive), "--name", "other"], capfd)
    assert_clean_failure(code, text, f"{archive}: model.json names dataset(s) '../../x'")
    assert sorted(p.name for p in (probe.base / "results" / "pretrained").iterdir()) == ["tiny"]


def _rewrite_zip(archive: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)


# install_model limits: crafted archives, refused before anything is unpacked under results/pretrained
def _bomb(path: Path, members: dict[str, int], model_json: bytes | None = None) -> Path:
    """A zip of highly compressible members (name -> uncompressed bytes of zeros) and a model.json."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.json", model_json or json.dumps({"name": "bomb", "format": 2}).encode())
        for name, size in members.items():
            zf.writestr(name, bytes(size))
    return path


INSTALL_ROWS: dict[str, tuple[dict[str, int], str | None, str, str]] = {
    # row: (members, DIFFPROBE_INSTALL_MAX_GB, message, fix)
    "install_model_too_many_members": ({f"f{i}.png": 1 for i in range(70)}, None,
                                       "archive holds 71 members, more than the 64 a model archive may hold",
                                       "only install archives written by `diffprobe export_model`"),
    "install_model_member_too_large": ({"diffusion/checkpoint_final.pt": 3 << 20}, "0.001",
                                       "archive member 'diffusion/checkpoint_final.pt' unpacks to 3.0 MB, more than "
                                       "the 1.0 MB one member may", "set DIFFPROBE_INSTALL_MAX_GB (GB) above it"),
    "install_model_total_too_large": ({"bpr/checkpoint_final.pt": 700 << 10,
                                       "diffusion/checkpoint_final.pt": 700 << 10}, "0.001",
                                      "archive unpacks to 1.4 MB, more than the 1.0 MB a model may",
                                      "set DIFFPROBE_INSTALL_MAX_GB (GB) above it"),
}


@pytest.mark.parametrize("row", list(INSTALL_ROWS))
def test_install_model_limits(row: str, roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capfd: pytest.CaptureFixture) -> None:
    members, limit, message, fix = INSTALL_ROWS[row]
    if limit:
        monkeypatch.setenv("DIFFPROBE_INSTALL_MAX_GB", limit)
    archive = _bomb(tmp_path / "bomb.zip", members)
    code, text = run_cli(["install_model", str(archive), "--name", "bomb"], capfd)
    assert_clean_failure(code, text, f"{archive}: {message}", fix)
    assert list((roots["results"] / "pretrained").iterdir()) == []  # no temporary folder left either


def test_install_model_not_enough_disk(roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture) -> None:
    archive = _bomb(tmp_path / "big.zip", {"diffusion/checkpoint_final.pt": 2 << 20})
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    code, text = run_cli(["install_model", str(archive), "--name", "big"], capfd)
    assert_clean_failure(code, text, "archive unpacks to 2.0 MB, but", "has only 1.0 MB free", "free space on")
    assert list((roots["results"] / "pretrained").iterdir()) == []


def test_install_model_member_twice(roots: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    import warnings
    import zipfile

    archive = tmp_path / "twice.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(archive, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        zf.writestr("model.json", json.dumps({"name": "t", "format": 2}))
        zf.writestr("model.json", json.dumps({"name": "t", "format": 2, "datasets": ["/abs"]}))
    code, text = run_cli(["install_model", str(archive)], capfd)
    assert_clean_failure(code, text, f"{archive}: archive member 'model.json' appears twice")
    assert list((roots["results"] / "pretrained").iterdir()) == []


def test_install_model_header_understates_size(roots: dict[str, Path], tmp_path: Path,
                                               capfd: pytest.CaptureFixture) -> None:
    """A member whose central-directory size is smaller than what its stream inflates to (a lying
    header): unpacking stops at the declared size and the archive is refused, not trusted."""
    archive = _bomb(tmp_path / "liar.zip", {"diffusion/loss_curve.png": 1 << 20})
    data = bytearray(archive.read_bytes())
    entry = data.rindex(b"PK\x01\x02")  # the last central-directory entry: the png
    data[entry + 24:entry + 28] = (16).to_bytes(4, "little")  # uncompressed size: 16 bytes
    archive.write_bytes(bytes(data))
    code, text = run_cli(["install_model", str(archive), "--name", "liar"], capfd)
    assert_clean_failure(code, text, f"{archive}: archive member 'diffusion/loss_curve.png'",
                         "download or copy the archive again")
    assert list((roots["results"] / "pretrained").iterdir()) == []


def test_install_model_tar_archive(roots: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A .tar (even one holding ../ members) is refused as such; nothing is unpacked."""
    import io
    import tarfile

    archive = tmp_path / "model.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("model.json", "../../evil.txt"):
            data = json.dumps({"name": "t", "format": 2}).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    code, text = run_cli(["install_model", str(archive), "--name", "t"], capfd)
    assert_clean_failure(code, text, f"{archive}: not a zip archive", "pass the .zip file written by")
    assert not (roots["results"] / "pretrained").exists()
    assert not (tmp_path.parent / "evil.txt").exists()
