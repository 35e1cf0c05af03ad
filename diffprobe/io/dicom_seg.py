"""A label map as a DICOM Segmentation object (SEG) referencing the DICOM series it was predicted on.

Why: a hospital viewer or PACS (3D Slicer, OHIF, ...) shows a segmentation over its CT only when it
is a DICOM object that references the CT's instances; a NIfTI file next to a DICOM series needs a
conversion step that loses the link. The SEG is written with highdicom: segmentation type BINARY,
one segment per dataset.json label except background (named as in dataset.json, coded with
:mod:`diffprobe.io.dicom_codes`), the algorithm identified as diffprobe and its version.

Frames are matched to the source slices *by position*: every source file's ImagePositionPatient is
mapped through the label map's geometry to a slice index, and the SEG frame for that file is that
slice. Nothing assumes that the file order, the instance numbers or the array order agree; a file
whose plane does not coincide with a slice of the label map (other orientation, other grid) is
refused instead of being paired with the nearest slice.

pydicom and highdicom are imported inside the functions: ``diffprobe predict`` without
``--output_type dicom_seg`` never pays for importing them.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffprobe import __version__
from diffprobe.errors import DiffprobeError
from diffprobe.io.dicom_codes import Concept, SegmentCodes, segment_codes
from diffprobe.io.geometry import Geometry
from diffprobe.utils import atomic_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# A slice position may differ from the label map's grid by DICOM decimal-string rounding, not more.
POSITION_TOL_VOXELS = 0.05
ORIENTATION_TOL = 1e-3
SERIES_NUMBER_OFFSET = 1000  # the SEG series sorts after its source series in viewers' series lists
_LO_MAX = 64  # DICOM LO (SegmentLabel) maximum length


def series_files(folder: str | Path) -> list[str]:
    """The files of the single DICOM series in ``folder``, as SimpleITK's series reader lists them.

    The same listing as :func:`diffprobe.io.image_io.read_sitk` uses, so the SEG references exactly
    the instances the prediction was made from (other files in the folder are ignored).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder)) if folder.is_dir() else ()
    if len(series) != 1:
        raise DiffprobeError(
            "a DICOM SEG needs one DICOM series as input" + (f" (found {len(series)})" if series else ""),
            folder, "pass the folder of the one series that was segmented with -i")
    return list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))


def read_source_datasets(folder: str | Path) -> list[Dataset]:
    """The series' headers (pydicom, pixel data not read: the SEG only references the instances)."""
    import pydicom

    out = []
    for f in series_files(folder):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - pydicom raises several types for unreadable headers
            raise DiffprobeError(f"cannot read the DICOM header ({type(e).__name__}: {str(e)[:160]})", f,
                                 "re-export the series; this file is corrupt") from None
        _fill_sop_identity(ds, f)
        out.append(ds)
    return out


def _fill_sop_identity(ds: Dataset, file: str | Path) -> None:
    """Take an empty SOP Class/Instance UID from the file meta header, where the standard keeps a copy.

    Why: some anonymisers blank (0008,0016)/(0008,0018) in the dataset but leave the file meta's
    Media Storage SOP Class/Instance UID (the real series in the tests is such a case); the SEG
    references instances by this UID, so it must be the one the file is stored under.
    """
    meta = getattr(ds, "file_meta", None)
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(ds.get(keyword, "") or ""):
            value = str(meta.get(meta_keyword, "") or "") if meta is not None else ""
            if not value:
                raise DiffprobeError(f"DICOM file has no {keyword}", file,
                                     "a DICOM SEG references each slice by its UIDs: export the series with its "
                                     "UIDs kept, or write --output_type nifti")
            setattr(ds, keyword, value)


def _floats(ds: Dataset, keyword: str, n: int, folder: Path) -> np.ndarray:
    value = getattr(ds, keyword, None)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size != n:
        raise DiffprobeError(f"DICOM file {Path(getattr(ds, 'filename', '') or '?').name} lacks a valid {keyword}",
                             folder, "a DICOM SEG needs positioned slices; write --output_type nifti instead")
    return arr


def slice_indices(geometry: Geometry, datasets: list[Dataset], folder: str | Path) -> list[int]:
    """For each source dataset, the z index (numpy axis 0) of the label map slice in its plane.

    Why by position: ITK sorts slices along the normal and may flip axes; DICOM file order and
    InstanceNumber are arbitrary. A dataset whose plane is not exactly one of the grid's slices
    (rows/columns, in-plane directions, origin within rounding) is refused: pairing it with the
    nearest slice would put the segmentation at the wrong place.
    """
    folder = Path(folder)
    nx, ny, nz = geometry.shape_xyz
    direction = geometry.direction_matrix
    to_index = np.linalg.inv(geometry.index_to_world)
    origin = np.asarray(geometry.origin, dtype=np.float64)
    out = []
    for ds in datasets:
        name = Path(getattr(ds, "filename", "") or "?").name
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise DiffprobeError(f"{name} is a multi-frame DICOM image", folder,
                                 "convert the series to single-frame slices, or write --output_type nifti")
        position = _floats(ds, "ImagePositionPatient", 3, folder)
        orientation = _floats(ds, "ImageOrientationPatient", 6, folder)
        index = to_index @ (position - origin)
        k = int(round(float(index[2])))
        aligned = (int(ds.Rows) == ny and int(ds.Columns) == nx
                   and np.allclose(orientation[:3], direction[:, 0], atol=ORIENTATION_TOL)
                   and np.allclose(orientation[3:], direction[:, 1], atol=ORIENTATION_TOL)
                   and np.all(np.abs(index - [0, 0, k]) <= POSITION_TOL_VOXELS) and 0 <= k < nz)
        if not aligned:
            raise DiffprobeError(
                f"slice {name} (position {position.round(3).tolist()}, {ds.Rows}x{ds.Columns}) is not a slice of "
                f"the segmentation's grid (size {nx}x{ny}x{nz}, origin {np.round(origin, 3).tolist()})",
                folder, "segment the series itself (-i the series folder) so the label map has its geometry")
        out.append(k)
    if len(set(out)) != len(out):
        raise DiffprobeError("several DICOM files lie at the same slice position", folder,
                             "export the series again (one file per slice position)")
    return out


def _coded(concept: Concept):
    from highdicom.sr import CodedConcept

    return CodedConcept(concept.value, concept.scheme, concept.meaning)


def _color(k: int):
    """Distinct, evenly spaced hues: viewers need a recommended colour to tell segments apart."""
    from highdicom.color import CIELabColor

    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.9)
    return CIELabColor.from_rgb(int(r * 255), int(g * 255), int(b * 255))


def segment_descriptions(labels: dict[str, int], model: str = "") -> list:
    """highdicom segment descriptions, numbered 1..N in label-id order (background excluded).

    Segment numbers must run 1..N in a SEG; dataset.json ids need not (1, 2, 5 is valid), so the
    mapping id -> segment number is kept in the SegmentDescription's tracking id ("label <id>").
    """
    from highdicom import UID, AlgorithmIdentificationSequence
    from highdicom.seg import SegmentDescription
    from pydicom.sr.codedict import codes

    algorithm = AlgorithmIdentificationSequence(
        name="diffprobe", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"model": model[:_LO_MAX]} if model else None)
    named = sorted((v, k) for k, v in labels.items() if v != 0)
    out = []
    for number, (value, name) in enumerate(named, start=1):
        codes_: SegmentCodes = segment_codes(name)
        desc = SegmentDescription(
            segment_number=number, segment_label=name[:_LO_MAX], segmented_property_category=_coded(codes_.category),
            segmented_property_type=_coded(codes_.type), algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, tracking_uid=UID(), tracking_id=f"label {value}",
            display_color=_color(number - 1))
        if codes_.modifier is not None:
            from pydicom.dataset import Dataset

            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = codes_.modifier.value, codes_.modifier.scheme
            item.CodeMeaning = codes_.modifier.meaning
            # highdicom has no argument for it: the modifier goes into the type's code item (PS3.3 C.8.20.2)
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [item]
        out.append(desc)
    return out


def segment_frames(label_map: np.ndarray, labels: dict[str, int], indices: list[int]) -> np.ndarray:
    """Frames (one per source dataset, in their order) holding segment numbers instead of label ids."""
    lut = np.zeros(max(int(label_map.max(initial=0)), max(labels.values(), default=0)) + 1, dtype=np.uint16)
    for number, value in enumerate(sorted(v for v in labels.values() if v != 0), start=1):
        lut[value] = number
    return lut[label_map[np.asarray(indices, dtype=np.intp)]]


def write_dicom_seg(label_map: np.ndarray, geometry: Geometry, series_folder: str | Path, labels: dict[str, int],
                    path: str | Path, model: str = "") -> Path:
    """Write ``label_map`` (z, y, x on ``geometry``: the series' own grid) as a DICOM SEG, atomically.

    ``labels``: dataset.json's {name: id}; every label but background becomes a segment, empty or
    not (a viewer then lists what the model can find). Label ids not in ``labels`` are dropped.
    ``model`` names the trained configuration in the algorithm identification.
    """
    import highdicom as hd

    path = Path(path)
    sources = read_source_datasets(series_folder)
    indices = slice_indices(geometry, sources, series_folder)
    frames = segment_frames(np.asarray(label_map), labels, indices)
    descriptions = segment_descriptions(labels, model)
    if not descriptions:
        raise DiffprobeError("dataset.json declares no label besides background", series_folder,
                             "a DICOM SEG needs at least one segment; write --output_type nifti")
    try:
        number = int(getattr(sources[0], "SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER_OFFSET + number, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="diffprobe", manufacturer_model_name=(model or "diffprobe")[:_LO_MAX],
            software_versions=__version__, device_serial_number="none",
            series_description="diffprobe segmentation", content_label="DIFFPROBE",
            content_description="Automatic segmentation by diffprobe",
            omit_empty_frames=bool(frames.any()))  # all empty: highdicom keeps every frame (and warns)
    except (ValueError, AttributeError, TypeError, KeyError) as e:  # source headers highdicom cannot use
        raise DiffprobeError(f"cannot build a DICOM SEG on this series ({type(e).__name__}: {str(e)[:200]})",
                             series_folder, "check that the series has complete CT headers (study, frame of "
                             "reference, pixel spacing); otherwise write --output_type nifti") from None
    with atomic_path(path, ".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
