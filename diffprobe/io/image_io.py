"""Reading and writing volumes with SimpleITK, with user-facing error messages.

Supported: ``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd`` files and DICOM series
folders (one series per folder). Arrays are numpy (z, y, x) as SimpleITK returns them;
geometry is kept separately (:class:`~diffprobe.io.geometry.Geometry`).

nnU-Net's ``SimpleITKIO`` is not used for reading because it asserts (traceback) on the
very problems diffprobe must report as clean messages; writing needs atomic renames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffprobe.errors import DiffprobeError
from diffprobe.io.geometry import Geometry
from diffprobe.utils import atomic_path

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


@dataclass
class Volume:
    """A 3D array (z, y, x) with its physical geometry."""

    array: np.ndarray
    geometry: Geometry


def geometry_of(img: sitk.Image) -> Geometry:
    return Geometry(
        tuple(int(v) for v in img.GetSize()),  # type: ignore[arg-type]
        tuple(float(v) for v in img.GetSpacing()),  # type: ignore[arg-type]
        tuple(float(v) for v in img.GetOrigin()),  # type: ignore[arg-type]
        tuple(float(v) for v in img.GetDirection()),
    )


def file_ending(path: str | Path) -> str:
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(path).suffix


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DiffprobeError("folder holds no DICOM series", folder, "point to a folder of DICOM slices")
    if len(series) > 1:
        raise DiffprobeError(
            f"folder holds {len(series)} DICOM series ({', '.join(series)})",
            folder,
            "put each series in its own folder",
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    _check_slice_spacing(files, folder)
    reader.SetFileNames(files)
    return reader.Execute()


def _slice_positions(files: tuple[str, ...] | list[str]) -> list[tuple[float, str]] | None:
    """(position along the slice normal in mm, file) per slice, or None when the headers lack it."""
    out = []
    info = sitk.ImageFileReader()
    info.SetImageIO("GDCMImageIO")
    for f in files:
        info.SetFileName(f)
        info.ReadImageInformation()
        if not (info.HasMetaDataKey("0020|0032") and info.HasMetaDataKey("0020|0037")):
            return None
        try:
            pos = np.array([float(v) for v in info.GetMetaData("0020|0032").split("\\")])
            ori = np.array([float(v) for v in info.GetMetaData("0020|0037").split("\\")])
        except ValueError:
            return None
        if pos.size != 3 or ori.size != 6:
            return None
        normal = np.cross(ori[:3], ori[3:])
        out.append((float(pos @ normal), f))
    return sorted(out)


def _check_slice_spacing(files: tuple[str, ...] | list[str], folder: Path) -> None:
    """Refuse a series with a missing (or duplicated) slice.

    Why: ITK only warns about non-uniform slice positions and then reads the remaining slices
    onto a uniform grid with the *average* spacing, so every slice after the gap lands at the
    wrong place: a segmentation of it would be silently misplaced.
    """
    if len(files) < 3:
        return
    pos = _slice_positions(files)
    if pos is None:
        return
    z = np.array([p for p, _ in pos])
    gaps = np.diff(z)
    step = float(np.median(gaps))
    tol = max(1e-3, 0.01 * abs(step))
    bad = np.flatnonzero(np.abs(gaps - step) > tol)
    if step <= tol:
        raise DiffprobeError("DICOM series has several slices at the same position", folder,
                             "export the series again (one file per slice position)")
    if bad.size:
        k = int(bad[0])
        a, b = Path(pos[k][1]).name, Path(pos[k + 1][1]).name
        kind = "missing" if gaps[k] > step else "duplicated or misplaced"
        raise DiffprobeError(
            f"DICOM series has {kind} slice(s): {gaps[k]:g} mm between {a} and {b} (z = {z[k]:g} and "
            f"{z[k + 1]:g} mm), the other slices are {step:g} mm apart", folder,
            "copy the complete series (every slice file) into the folder, or export it as one .nii.gz")


def read_sitk(path: str | Path) -> sitk.Image:
    """Read an image file or DICOM series folder; user errors become DiffprobeError."""
    path = Path(path)
    if not path.exists():
        raise DiffprobeError("file does not exist", path, "check the path")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        return sitk.ReadImage(str(path))
    except DiffprobeError:
        raise
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # ITK's "sitk::ERROR: ..." line says what is wrong; the "Exception thrown in ..." line only
        # names a C++ source location.
        reason = next((ln for ln in lines if "ERROR" in ln),
                      next((ln for ln in lines if "Exception" in ln), lines[0] if lines else ""))
        reason = reason.split("ERROR:", 1)[-1].strip().replace(f'"{path}"', "the file")
        raise DiffprobeError(
            f"cannot be read as an image ({reason.strip()[:200]})",
            path,
            "re-export the file (it may be truncated or corrupt) as .nii.gz, .mha or .nrrd",
        ) from None


def _verify_nifti(path: Path) -> None:
    """Catch what ITK's NIfTI reader hides: truncated files (zero-filled) and NaNs (read as 0).

    nibabel reads the raw voxel block and raises on a short file; its values are checked for
    non-finite entries.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for short/corrupt files
        raise DiffprobeError(
            f"file is truncated or corrupt ({type(e).__name__}: {str(e)[:160]})", path,
            "re-export or re-download the file; the copy on disk is incomplete") from None
    _refuse_non_finite(data, path)


def _refuse_non_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DiffprobeError(f"image contains {bad} NaN/inf voxels", path,
                             "replace non-finite voxels (e.g. with the minimum HU) before export")


def _check_3d(img: sitk.Image, path: Path) -> None:
    if img.GetDimension() != 3:
        raise DiffprobeError(
            f"image is {img.GetDimension()}D (size {img.GetSize()}), diffprobe needs 3D volumes",
            path,
            "export the whole scan (all slices) as one 3D volume" if img.GetDimension() < 3 else
            "export one 3D volume per file; split 4D series into one file per channel (_0000, _0001, ...)",
        )
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DiffprobeError(
            f"image has {img.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector image)",
            path,
            "save one scalar channel per file",
        )


def _read_3d(path: Path) -> sitk.Image:
    """Read, refuse non-3D/vector images, and re-check NIfTI files for what ITK hides."""
    img = read_sitk(path)
    _check_3d(img, path)
    if file_ending(path) in (".nii", ".nii.gz"):
        _verify_nifti(path)
    return img


def read_image(path: str | Path, dtype: type = np.float32) -> Volume:
    """Read one 3D scalar image as a :class:`Volume`; refuse non-3D and non-finite data."""
    path = Path(path)
    img = _read_3d(path)
    array = sitk.GetArrayFromImage(img).astype(dtype, copy=False)
    _refuse_non_finite(array, path)
    return Volume(array, geometry_of(img))


def read_label(path: str | Path) -> Volume:
    """Read a label map; values must be non-negative integers."""
    path = Path(path)
    img = _read_3d(path)
    array = sitk.GetArrayFromImage(img)
    if np.issubdtype(array.dtype, np.floating) and (
            not np.isfinite(array).all() or not np.all(np.equal(np.mod(array, 1), 0))):
        raise DiffprobeError(
                "label map holds non-integer values", path, "save labels as integer ids (uint8/uint16)"
            )
    if array.size and array.min() < 0:
        raise DiffprobeError("label map holds negative values", path, "use ids 0..N as in dataset.json")
    top = int(array.max()) if array.size else 0
    if top > MAX_LABEL_ID:
        raise DiffprobeError(f"label map holds id {top}, above {MAX_LABEL_ID} (uint16)", path,
                             f"renumber the classes to ids 0..{MAX_LABEL_ID} here and in dataset.json")
    return Volume(array.astype(label_dtype(top), copy=False), geometry_of(img))


MAX_LABEL_ID = 65535  # label maps are stored as uint8 or uint16: a larger id would wrap silently


def label_dtype(max_id: int) -> type[np.unsignedinteger]:
    """The narrowest storage type for label ids up to ``max_id``: uint8 up to 255, else uint16.

    One rule for preprocessed storage, predicted label maps and evaluation, so an id never wraps
    (300 stored as uint8 would read back as 44). Ids above ``MAX_LABEL_ID`` are refused (ValueError);
    dataset.json and label files are checked before any array gets here.
    """
    if not 0 <= int(max_id) <= MAX_LABEL_ID:
        raise ValueError(f"label id {max_id} does not fit in uint16")
    return np.uint8 if int(max_id) <= 255 else np.uint16


def to_sitk(array_zyx: np.ndarray, geometry: Geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def write_image(array_zyx: np.ndarray, geometry: Geometry, path: str | Path, compress: bool = True) -> None:
    """Write atomically; the output opens in 3D Slicer / ITK-SNAP with ``geometry``."""
    path = Path(path)
    img = to_sitk(array_zyx, geometry)
    with atomic_path(path, file_ending(path)) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=compress)
        except RuntimeError as e:
            raise DiffprobeError(f"cannot write image ({str(e).strip()[:200]})", path,
                                 "check that the folder is writable and the disk is not full") from None
