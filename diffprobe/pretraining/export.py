"""Share a pretrained model between machines: ``export_model`` / ``install_model``.

The archive holds ``model.json`` (with the reference plans) and the final BPR and diffusion
checkpoints. Installing refuses members with absolute paths, ``..`` components or symlinks,
and checks that the checkpoints load with ``weights_only=True`` before the model appears
under its name (extraction goes to a temporary folder that is renamed at the end).
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrain import model_dir
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.utils import atomic_path, read_json

MEMBERS = ("model.json", "bpr/checkpoint_final.pt", "diffusion/checkpoint_final.pt", "bpr_coordinates.png",
           "bpr/loss_curve.png", "diffusion/loss_curve.png")


def export_model(name: str, output: str | Path) -> Path:
    src = model_dir(name)
    if not (src / "model.json").is_file():
        raise DiffprobeError(f"no pretrained model named '{name}'", src, "see `ls` of results/pretrained")
    if not (src / "diffusion" / "checkpoint_final.pt").is_file():
        raise DiffprobeError("the diffusion stage of this model has not finished", src,
                             "finish it with `diffprobe pretrain --name NAME --c`")
    output = Path(output)
    with atomic_path(output, ".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for member in MEMBERS:
            if (src / member).is_file():
                zf.write(src / member, member)
    return output


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    p = PurePosixPath(info.filename)
    mode = info.external_attr >> 16
    if p.is_absolute() or info.filename.startswith(("/", "\\")) or ".." in p.parts or ":" in info.filename:
        raise DiffprobeError(f"archive member '{info.filename}' points outside the model folder", archive,
                             "only install archives written by `diffprobe export_model`")
    if stat.S_ISLNK(mode):
        raise DiffprobeError(f"archive member '{info.filename}' is a symbolic link", archive,
                             "only install archives written by `diffprobe export_model`")


def install_model(archive: str | Path, name: str | None = None, force: bool = False) -> Path:
    archive = Path(archive)
    if not zipfile.is_zipfile(archive):
        raise DiffprobeError("not a zip archive", archive, "pass a file written by `diffprobe export_model`")
    root = paths.results_root() / "pretrained"
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(info, archive)
        if "model.json" not in zf.namelist():
            raise DiffprobeError("archive has no model.json", archive, "export the model again")
        tmp = Path(tempfile.mkdtemp(prefix=".install_", dir=root))
        try:
            for info in infos:
                if info.is_dir():
                    continue
                target = (tmp / info.filename).resolve()
                if tmp.resolve() not in target.parents:
                    raise DiffprobeError(f"archive member '{info.filename}' escapes the target", archive,
                                         "only install archives written by `diffprobe export_model`")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            meta = read_json(tmp / "model.json")
            for ckpt in ("diffusion/checkpoint_final.pt", "bpr/checkpoint_final.pt"):
                if (tmp / ckpt).is_file():
                    load_checkpoint(tmp / ckpt)  # weights_only=True: refuses pickled objects
            final = root / (name or meta["name"])
            if final.exists():
                if not force:
                    raise DiffprobeError(f"a model named '{final.name}' is already installed", final,
                                         "pass --name OTHER or --force")
                shutil.rmtree(final)
            tmp.rename(final)
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
