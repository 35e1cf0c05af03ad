"""The bad-input matrix (docs/bad-inputs.md), rows that need a trained probe: predict, train, checkpoints
from elsewhere, model names and resume checkpoints. Same contract as tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from bad_inputs_support import (
    PREDICT,
    Roots,
    assert_clean_failure,
    enospc,
    probe,  # noqa: F401  (a fixture)
    probe_image,
    refuse_writes_in,
    run_cli,
    tree_hashes,
    write_dicom,
)
from conftest import body_volume


def test_dicom_two_series(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    img, _ = body_volume((6, 24, 28))
    folder = tmp_path / "dicom"
    write_dicom(img, folder, "1.2.3.4.1")
    write_dicom(img, folder, "1.2.3.4.2")
    code, text = run_cli(["predict", "-i", str(folder), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, f"{folder}: folder holds 2 DICOM series (1.2.3.4.1, 1.2.3.4.2)",
                         "put each series in its own folder")
    assert not any((tmp_path / "out").glob("*"))


def test_dicom_missing_slice(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    img, _ = body_volume((6, 24, 28))
    folder = tmp_path / "dicom"
    files = write_dicom(img, folder, "1.2.3.4.1")
    files[3].unlink()
    code, text = run_cli(["predict", "-i", str(folder), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, f"{folder}: DICOM series has missing slice(s): 5 mm between 1_002.dcm and "
                         "1_004.dcm", "other slices are 2.5 mm apart", "copy the complete series")
    assert not any((tmp_path / "out").glob("*"))


def test_predict_output_below_a_file(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "segs"
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(out), *PREDICT], capfd)
    assert_clean_failure(code, text, f"{out}: cannot create the output folder", "choose a writable output folder")
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.fixture
def previous_prediction(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> Path:
    """An output folder holding a finished prediction of the test image."""
    out = tmp_path / "segs"
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(out), *PREDICT], capfd)
    assert code == 0, text
    return out


def test_predict_output_not_writable(probe: Roots, previous_prediction: Path, monkeypatch: pytest.MonkeyPatch,
                                     capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(previous_prediction)
    refuse_writes_in(monkeypatch, previous_prediction)
    try:
        code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(previous_prediction), *PREDICT],
                             capfd)
    finally:
        previous_prediction.chmod(0o755)
    name = probe_image(probe).name.replace("_0000", "")
    assert_clean_failure(code, text, f"{previous_prediction / name}: cannot write this file (Permission denied) "
                         "(its previous version is unchanged)", "writable or choose another output folder")
    assert tree_hashes(previous_prediction) == before


def test_disk_full_writing_prediction(probe: Roots, previous_prediction: Path, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(previous_prediction)
    monkeypatch.setattr(sitk, "WriteImage", enospc)
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(previous_prediction), *PREDICT], capfd)
    name = probe_image(probe).name.replace("_0000", "")
    assert_clean_failure(code, text, f"{previous_prediction / name}: disk full while writing this file (its "
                         "previous version is unchanged)")
    assert tree_hashes(previous_prediction) == before  # no temp file left either


def test_disk_full_writing_checkpoint(probe: Roots, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture) -> None:
    before = tree_hashes(probe.pre)
    monkeypatch.setattr(torch, "save", enospc)
    code, text = run_cli(["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--c", "--steps", "4",
                          "-device", "cpu"], capfd)
    assert_clean_failure(code, text, "fold_all/checkpoint_", "disk full while writing this file (its previous "
                         "version is unchanged)")
    assert {k: v for k, v in tree_hashes(probe.pre).items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}


# ---- checkpoints from elsewhere -------------------------------------------------------------
def test_probe_from_another_dataset(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A trained probe folder copied under another dataset's results is refused, not used."""
    other = probe.pre.parents[3] / "Dataset002_Other" / "diffprobe" / "tiny__fpn" / "fold_all"
    shutil.copytree(probe.pre, other)
    (probe.raw.parent / "Dataset002_Other").mkdir(exist_ok=True)
    try:
        code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), "-d", "2",
                              "-device", "cpu"], capfd)
    finally:
        (probe.raw.parent / "Dataset002_Other").rmdir()  # the raw root is the shared session fixture's
    assert_clean_failure(code, text, f"{other / 'probe.json'}: this probe was trained on Dataset001_Phantoms, "
                         "but lies in the results of Dataset002_Other", "train a probe for Dataset002_Other")
    assert not (tmp_path / "out").exists()


def test_probe_checkpoint_of_another_network(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A head checkpoint whose tensors do not fit (another dataset's class count) is refused."""
    from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(probe.pre / "checkpoint_final.pt")
    key = next(k for k, v in reversed(ckpt["model"].items()) if v.ndim >= 1)
    ckpt["model"][key] = torch.zeros(ckpt["model"][key].shape[0] + 3, *ckpt["model"][key].shape[1:])
    ckpt.pop("format")
    save_checkpoint(probe.pre / "checkpoint_final.pt", ckpt)
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "fold_all/checkpoint_final.pt: checkpoint does not fit this network",
                         "size mismatch", "rerun `diffprobe train`")


def test_checkpoint_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    ckpt = torch.load(probe.pre / "checkpoint_final.pt", weights_only=True)
    ckpt["format"] = 99
    torch.save(ckpt, probe.pre / "checkpoint_final.pt")
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "fold_all/checkpoint_final.pt: checkpoint has an unknown format/version",
                         "retrain with this diffprobe version")


def test_probe_json_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    meta = json.loads((probe.pre / "probe.json").read_text())
    meta["format"] = 1  # the per-patch GroupNorm heads
    (probe.pre / "probe.json").write_text(json.dumps(meta))
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "fold_all/probe.json: probe format 1 is not supported by this version",
                         "retrain the probe")


def test_pretrained_model_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model_json = probe.base / "results" / "pretrained" / "tiny" / "model.json"
    meta = json.loads(model_json.read_text())
    meta["format"] = 7
    model_json.write_text(json.dumps(meta))
    code, text = run_cli(["predict", "-i", str(probe_image(probe)), "-o", str(tmp_path / "out"), *PREDICT], capfd)
    assert_clean_failure(code, text, "pretrained/tiny/model.json: pretrained model format 7 is not supported",
                         "install a model made by this diffprobe version")


def test_install_model_of_another_version(probe: Roots, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    archive = tmp_path / "tiny.zip"
    assert run_cli(["export_model", "tiny", str(archive)], capfd)[0] == 0
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["model.json"])
    meta["format"] = 7
    members["model.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(archive, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    code, text = run_cli(["install_model", str(archive), "--name", "other"], capfd)
    assert_clean_failure(code, text, f"{archive}: model format 7 is not supported by this version",
                         "export the model with the same diffprobe version")
    assert not (probe.base / "results" / "pretrained" / "other").exists()


# ---- rows closed after the first matrix (model names, resume checkpoints, memory) ---------------
@pytest.mark.parametrize("name", ["../escape", "/abs/model", "a/b"])
def test_pretrain_name_escaping_results(probe: Roots, name: str, capfd: pytest.CaptureFixture) -> None:
    """`pretrain --name` becomes a folder under results/pretrained: path-like names are refused."""
    before = tree_hashes(probe.base)
    code, text = run_cli(["pretrain", "-d", "1", "--name", name, "--bpr_steps", "1",
                          "--diffusion_steps", "1", "-device", "cpu"], capfd)
    assert_clean_failure(code, text, name)
    assert tree_hashes(probe.base) == before


def test_resume_from_checkpoint_of_another_network(probe: Roots, capfd: pytest.CaptureFixture) -> None:
    """`train --c` with a checkpoint_latest.pt whose tensors do not fit the head: one message, not
    PyTorch's key list; the checkpoint itself is left as it was."""
    from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint

    latest = probe.pre / "checkpoint_latest.pt"
    ckpt = load_checkpoint(latest)
    ckpt["model"] = {k: torch.zeros(3, 1) for k in ckpt["model"]}
    save_checkpoint(latest, {k: v for k, v in ckpt.items() if k != "format"})
    before = tree_hashes(probe.pre)
    code, text = run_cli(["train", "-d", "1", "-f", "all", "--pretrained", "tiny", "--c", "--steps", "4",
                          "-device", "cpu"], capfd)
    assert_clean_failure(code, text, "checkpoint_latest.pt")
    assert {k: v for k, v in tree_hashes(probe.pre).items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}

