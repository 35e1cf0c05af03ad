"""Share a pretrained model between machines: ``export_model`` / ``install_model``.

The archive holds ``model.json`` (with the reference plans) and the final BPR and diffusion
checkpoints. Installing refuses members with absolute paths, ``..`` components or symlinks,
and checks that the checkpoints load with ``weights_only=True`` before the model appears
under its name (extraction goes to a temporary folder that is renamed at the end).
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrained_model import BPR_CKPT, DENOISER_CKPT, MODEL_FORMAT, PretrainedModel
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.utils import atomic_path, read_json

MEMBERS = ("model.json", BPR_CKPT, DENOISER_CKPT, "bpr_coordinates.png",
           "bpr/loss_curve.png", "diffusion/loss_curve.png")


def export_model(name: str, output: str | Path) -> Path:
    """Zip the pretrained model ``name`` into ``output`` (atomically); the name must be a plain folder name."""
    model = PretrainedModel(name)
    src = model.folder
    if not model.exists:
        raise DiffprobeError(f"no pretrained model named '{name}'", src, "see `ls` of results/pretrained")
    if not model.denoiser_checkpoint.is_file():
        raise DiffprobeError("the diffusion stage of this model has not finished", src,
                             "finish it with `diffprobe pretrain --name NAME --c`")
    output = Path(output)
    with atomic_path(output, ".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for member in MEMBERS:
            if (src / member).is_file():
                zf.write(src / member, member)
    return output


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    p = PurePosixPath(info.filename.replace("\\", "/"))  # a Windows-made archive may use backslashes
    mode = info.external_attr >> 16
    if p.is_absolute() or ".." in p.parts or ":" in info.filename:
        raise DiffprobeError(f"archive member '{info.filename}' points outside the model folder", archive,
                             "only install archives written by `diffprobe export_model`")
    if stat.S_ISLNK(mode):
        raise DiffprobeError(f"archive member '{info.filename}' is a symbolic link", archive,
                             "only install archives written by `diffprobe export_model`")


def install_model(archive: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Install ``archive`` under results/pretrained/<name or the archive's name>.

    Why so careful: the archive comes from elsewhere. Members that would land outside the
    model folder, symlinks, names that are not plain folder names and checkpoints that need
    pickle are refused before anything appears under the final name.
    """
    archive = Path(archive)
    if not zipfile.is_zipfile(archive):
        raise DiffprobeError("not a zip archive", archive, "pass a file written by `diffprobe export_model`")
    root = paths.results_root() / "pretrained"
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        paths.check_name(name)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(info, archive)
        if "model.json" not in zf.namelist():
            raise DiffprobeError("archive has no model.json", archive, "export the model again")
        if name is None:
            try:
                archive_name = json.loads(zf.read("model.json")).get("name")
            except (ValueError, AttributeError):
                archive_name = None
            name = paths.check_name(archive_name, "the archive's model name", archive)
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
            try:
                meta = read_json(tmp / "model.json")
            except ValueError as e:
                raise DiffprobeError(f"the archive's model.json is not valid JSON ({e})", archive,
                                     "export the model again") from None
            if not isinstance(meta, dict):
                raise DiffprobeError("the archive's model.json holds no JSON object", archive,
                                     "export the model again")
            for ckpt in (DENOISER_CKPT, BPR_CKPT):
                if (tmp / ckpt).is_file():
                    load_checkpoint(tmp / ckpt)  # weights_only=True: refuses pickled objects
            if meta.get("format") != MODEL_FORMAT:
                raise DiffprobeError(f"model format {meta.get('format')!r} is not supported by this version "
                                     f"(it reads format {MODEL_FORMAT})", archive,
                                     "export the model with the same diffprobe version, or pretrain it again")
            final = root / name
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
