"""export_model / install_model round trip; unsafe archives are refused."""

import json
import stat
import zipfile

import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.export import export_model, install_model
from diffprobe.pretraining.pretrained_model import MODEL_FORMAT
from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint
from diffprobe.utils import write_json


@pytest.fixture
def fake_model(roots):
    out = roots["results"] / "pretrained" / "m1"
    write_json(out / "model.json", {"name": "m1", "format": MODEL_FORMAT})
    save_checkpoint(out / "diffusion" / "checkpoint_final.pt", {"step": 3, "model": {"w": torch.ones(2)}})
    save_checkpoint(out / "bpr" / "checkpoint_final.pt", {"step": 2, "model": {"w": torch.zeros(2)}})
    return out


def test_export_install_roundtrip(fake_model, tmp_path, roots):
    z = export_model("m1", tmp_path / "m1.zip")
    dst = install_model(z, name="copy")
    assert dst == roots["results"] / "pretrained" / "copy"
    assert load_checkpoint(dst / "diffusion" / "checkpoint_final.pt")["step"] == 3
    with pytest.raises(DiffprobeError, match="already installed"):
        install_model(z, name="copy")
    install_model(z, name="copy", force=True)


def _zip_with(path, name, data=b"x", mode=None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model.json", '{"name": "evil"}')
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize("member,mode,match", [
    ("/etc/evil", None, "outside"),
    ("../../evil.txt", None, "outside"),
    ("diffusion/../../../evil", None, "outside"),
    ("link", stat.S_IFLNK | 0o777, "symbolic link"),
])
def test_unsafe_archives_refused(roots, tmp_path, member, mode, match):
    z = _zip_with(tmp_path / "evil.zip", member, b"/etc/passwd", mode)
    with pytest.raises(DiffprobeError, match=match):
        install_model(z)
    assert not (roots["results"] / "pretrained" / "evil").exists()
    assert not (tmp_path.parent / "evil.txt").exists()


def test_pickled_checkpoint_in_archive_refused(roots, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ck = tmp_path / "c.pt"
    torch.save({"format": 1, "x": Evil()}, ck)
    z = tmp_path / "p.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("model.json", '{"name": "p"}')
        zf.write(ck, "diffusion/checkpoint_final.pt")
    with pytest.raises(DiffprobeError, match="cannot be loaded safely"):
        install_model(z)
    assert not (roots["results"] / "pretrained" / "p").exists()


@pytest.mark.parametrize("member", ["..\\..\\evil.txt", "diffusion\\..\\..\\evil", "C:/evil.txt", "\\evil.txt"])
def test_windows_style_escapes_refused(roots, tmp_path, member):
    z = _zip_with(tmp_path / "evil.zip", member)
    with pytest.raises(DiffprobeError, match="outside the model folder"):
        install_model(z)
    assert not (roots["results"] / "pretrained" / "evil").exists()


def test_symlink_to_a_file_inside_refused_too(roots, tmp_path):
    """Every symlink member is refused, not only those whose target leaves the folder (the target
    could be replaced later)."""
    z = _zip_with(tmp_path / "link.zip", "diffusion/checkpoint_final.pt", b"../model.json", stat.S_IFLNK | 0o777)
    with pytest.raises(DiffprobeError, match="symbolic link"):
        install_model(z)
    assert not (roots["results"] / "pretrained" / "evil").exists()


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a/b", ".hidden", "", "..", "evil\\..\\x"])
def test_install_name_must_stay_in_pretrained(fake_model, tmp_path, roots, name):
    z = export_model("m1", tmp_path / "m1.zip")
    with pytest.raises(DiffprobeError, match="not a plain folder name") as exc:
        install_model(z, name=name)
    assert "--name" in exc.value.fix
    assert sorted(p.name for p in (roots["results"] / "pretrained").iterdir()) == ["m1"]
    assert not (roots["results"] / "evil").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", 3, None])
def test_archive_model_name_must_stay_in_pretrained(roots, tmp_path, name):
    """Without --name the archive's own model.json name is used: it is untrusted too."""
    z = tmp_path / "named.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("model.json", json.dumps({"name": name, "format": MODEL_FORMAT}))
    with pytest.raises(DiffprobeError, match="the archive's model name .* is not a plain folder name") as exc:
        install_model(z)
    assert exc.value.file == str(z)
    assert list((roots["results"] / "pretrained").iterdir()) == []
    assert not (roots["results"] / "evil").exists()


@pytest.mark.parametrize("name", ["../m1", "/etc", "pretrained/../m1"])
def test_export_name_must_stay_in_pretrained(fake_model, tmp_path, name):
    with pytest.raises(DiffprobeError, match="not a plain folder name"):
        export_model(name, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_archive_of_another_model_format_refused(fake_model, tmp_path, roots):
    write_json(fake_model / "model.json", {"name": "m1", "format": 99})
    z = export_model("m1", tmp_path / "m1.zip")
    with pytest.raises(DiffprobeError, match="model format 99 is not supported"):
        install_model(z, name="copy")
    assert not (roots["results"] / "pretrained" / "copy").exists()
