"""export_model / install_model round trip; unsafe archives are refused."""

import stat
import zipfile

import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.export import export_model, install_model
from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint
from diffprobe.utils import write_json


@pytest.fixture
def fake_model(roots):
    out = roots["results"] / "pretrained" / "m1"
    write_json(out / "model.json", {"name": "m1", "format": 1})
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
