"""Share a pretrained model between machines: ``export_model`` / ``install_model``.

The archive holds ``model.json`` (with the reference plans) and the final BPR and diffusion
checkpoints. Installing refuses members with absolute paths, ``..`` components or symlinks,
archives over the size limits (members, bytes per member and in all, free disk space: a
zip bomb must not fill the disk), dataset names in model.json that are not plain folder names,
and checks that the checkpoints load with ``weights_only=True`` before the model appears under
its name (extraction goes to a temporary folder that is renamed at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from diffprobe import paths
from diffprobe.errors import DiffprobeError
from diffprobe.pretraining.pretrained_model import (
    BPR_CKPT,
    DENOISER_CKPT,
    MODEL_FORMAT,
    PretrainedModel,
    check_dataset_names,
)
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.utils import atomic_path, read_json

MEMBERS = ("model.json", BPR_CKPT, DENOISER_CKPT, "bpr_coordinates.png",
           "bpr/loss_curve.png", "diffusion/loss_curve.png")

# Limits on what install_model unpacks. export_model writes len(MEMBERS) files; a paper-size
# checkpoint is a few hundred MB to ~2 GB. The byte limits are what the central directory declares,
# and the copy stops at them too (a lying header cannot extract more).
MAX_MEMBERS = 64  # room for folder entries of a zip made by hand from a model folder
MAX_MEMBER_GB = 8.0  # one file
MAX_TOTAL_GB = 16.0  # the whole model unpacked
MAX_MODEL_JSON_BYTES = 16 << 20  # model.json (plans snapshot: kilobytes) is read into memory
LIMIT_ENV = "DIFFPROBE_INSTALL_MAX_GB"  # raises both byte limits for a model that really is bigger
_GB = 1 << 30
_ONLY_EXPORTED = "only install archives written by `diffprobe export_model`"


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
                             _ONLY_EXPORTED)
    if stat.S_ISLNK(mode):
        raise DiffprobeError(f"archive member '{info.filename}' is a symbolic link", archive, _ONLY_EXPORTED)
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded (writestr, MS-DOS)
        raise DiffprobeError(f"archive member '{info.filename}' is not a regular file or folder", archive,
                             _ONLY_EXPORTED)


def _size(n: float) -> str:
    """Bytes as a reader wants them: ``512 KB``, ``3.2 MB``, ``8.00 GB`` (a limit of 1 MB is not "0.00 GB")."""
    if n >= _GB:
        return f"{n / _GB:.2f} GB"
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n / 1024:.0f} KB"


def byte_limits() -> tuple[int, int]:
    """(bytes per member, bytes in all) install_model unpacks; ``DIFFPROBE_INSTALL_MAX_GB`` raises both."""
    value = os.environ.get(LIMIT_ENV)
    if not value:
        return int(MAX_MEMBER_GB * _GB), int(MAX_TOTAL_GB * _GB)
    try:
        limit = float(value)
        if not limit > 0:
            raise ValueError(value)
    except ValueError:
        raise DiffprobeError(f"{LIMIT_ENV}={value!r} is not a positive number of GB",
                             fix=f"set {LIMIT_ENV} to e.g. 32, or unset it") from None
    return int(limit * _GB), int(limit * _GB)


def _check_archive(infos: list[zipfile.ZipInfo], archive: Path, root: Path) -> None:
    """Every member safe, no name twice, and the archive within the count, size and disk-space limits.

    Why: the archive comes from elsewhere; a zip bomb (a few KB declaring many GB, or millions of
    members) would fill the disk or the inode table before a checkpoint is ever loaded.
    """
    if len(infos) > MAX_MEMBERS:
        raise DiffprobeError(f"archive holds {len(infos)} members, more than the {MAX_MEMBERS} a model archive "
                             f"may hold (export_model writes {len(MEMBERS)})", archive, _ONLY_EXPORTED)
    seen: set[str] = set()
    for info in infos:
        _check_member(info, archive)
        key = info.filename.replace("\\", "/").rstrip("/")
        if key in seen:
            raise DiffprobeError(f"archive member '{info.filename}' appears twice", archive, _ONLY_EXPORTED)
        seen.add(key)
    per_member, total_limit = byte_limits()
    raise_it = f"if the model really is this large, set {LIMIT_ENV} (GB) above it; else {_ONLY_EXPORTED}"
    for info in infos:
        limit = MAX_MODEL_JSON_BYTES if info.filename == "model.json" else per_member
        if info.file_size > limit:
            raise DiffprobeError(f"archive member '{info.filename}' unpacks to {_size(info.file_size)}, more than "
                                 f"the {_size(limit)} one member may", archive,
                                 _ONLY_EXPORTED if info.filename == "model.json" else raise_it)
    total = sum(i.file_size for i in infos)
    if total > total_limit:
        raise DiffprobeError(f"archive unpacks to {_size(total)}, more than the {_size(total_limit)} a model may",
                             archive, raise_it)
    free = shutil.disk_usage(root).free
    if total > free:
        raise DiffprobeError(f"archive unpacks to {_size(total)}, but {root} has only {_size(free)} free", archive,
                             f"free space on {root} (or its quota) and run install_model again")


def _unpack(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    """Copy one member, stopping at the size its header declared; a corrupt stream is a clean error."""
    written = 0
    try:
        with zf.open(info) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                written += len(block)
                if written > info.file_size:  # zipfile stops there itself; never trust one check alone
                    raise DiffprobeError(f"archive member '{info.filename}' unpacks to more than the "
                                         f"{info.file_size} bytes it declares", archive, _ONLY_EXPORTED)
                dst.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DiffprobeError(f"archive member '{info.filename}' cannot be unpacked ({e})", archive,
                             "download or copy the archive again (it is truncated or corrupt)") from None


def install_model(archive: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Install ``archive`` under results/pretrained/<name or the archive's name>.

    Why so careful: the archive comes from elsewhere. Members that would land outside the
    model folder, symlinks, archives over the limits (:func:`_check_archive`), model and dataset
    names that are not plain folder names and checkpoints that need pickle are refused before
    anything appears under the final name.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DiffprobeError("archive does not exist", archive,
                             "pass the .zip file written by `diffprobe export_model`")
    if not zipfile.is_zipfile(archive):
        raise DiffprobeError("not a zip archive (a .tar or other format is not accepted)", archive,
                             "pass the .zip file written by `diffprobe export_model`")
    root = paths.results_root() / "pretrained"
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        paths.check_name(name)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DiffprobeError(f"cannot be read as a zip archive ({e})", archive,
                             "download or copy the archive again (it is truncated or corrupt)") from None
    with zf:
        infos = zf.infolist()
        _check_archive(infos, archive, root)
        if "model.json" not in zf.namelist():
            raise DiffprobeError("archive has no model.json", archive, "export the model again")
        if name is None:
            try:
                archive_name = json.loads(zf.read("model.json")).get("name")
            except (ValueError, AttributeError, zipfile.BadZipFile, zlib.error):
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
                                         _ONLY_EXPORTED)
                target.parent.mkdir(parents=True, exist_ok=True)
                _unpack(zf, info, target, archive)
            try:
                meta = read_json(tmp / "model.json")
            except ValueError as e:
                raise DiffprobeError(f"the archive's model.json is not valid JSON ({e})", archive,
                                     "export the model again") from None
            if not isinstance(meta, dict):
                raise DiffprobeError("the archive's model.json holds no JSON object", archive,
                                     "export the model again")
            check_dataset_names(meta, archive)
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
