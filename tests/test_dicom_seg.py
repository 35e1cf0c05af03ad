"""``predict --output_type dicom_seg``: DICOM Segmentation objects referencing the input series.

The SEG is checked independently of the writer's own slice mapping: each source file's truth comes
from what the test wrote into that file (or, for the real series, from matching its pixels), and the
SEG's frames are looked up by the SOP Instance UID they reference, plus their plane positions.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import SHARED_REAL_CT, body_volume, write_dicom_series, write_sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from diffprobe.cli.app import main
from diffprobe.errors import DiffprobeError
from diffprobe.io.dicom_codes import ANATOMICAL_STRUCTURE, GENERIC, LEFT, RIGHT, TISSUE, segment_codes
from diffprobe.io.dicom_seg import slice_indices, write_dicom_seg
from diffprobe.io.geometry import Geometry, reorient_onto
from diffprobe.io.image_io import read_image, read_label

MODEL = ["-d", "1", "-c", "tiny__fpn"]
PHANTOM_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "aorta": 5,
                  "adrenal_right": 6}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


# ---- helpers ------------------------------------------------------------------------------------
def write_ct_series(folder: Path, hu: np.ndarray, row_dir, col_dir, spacing=(0.8, 0.7, 2.5),
                    origin=(-20.0, 15.0, 40.0), step_sign: float = 1.0) -> list[tuple[Path, str, int]]:
    """A CT series with pydicom: slice k of ``hu`` (k, rows, cols) at ``origin + k * step_sign * dz * normal``.

    Realistic CT tags (rescale intercept -1024, patient/study/frame of reference), file names in random
    order. Returns (file, SOPInstanceUID, k) per slice.
    """
    folder.mkdir(parents=True)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    names = [f"{generate_uid()[-12:]}.dcm" for _ in range(len(hu))]
    random.Random(0).shuffle(names)
    for k, plane in enumerate(hu):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "TestScanner", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Dicom", "DSEG1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, k + 1
        ds.PositionReferenceIndicator, ds.KVP, ds.BodyPartExamined = "", 120, "ABDOMEN"
        position = np.asarray(origin) + k * step_sign * spacing[2] * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing (between rows), column spacing
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = (plane.astype(np.int16) + 1024).astype(np.int16).tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        out.append((path, ds.SOPInstanceUID, k))
    return out


def seg_frames(path: Path) -> tuple[pydicom.Dataset, dict[tuple[str, int], np.ndarray]]:
    """The SEG and its frames keyed by (referenced source SOPInstanceUID, segment number), read with
    pydicom only; every frame's plane position must be its source slice's position."""
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    frames = {}
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert (uid, number) not in frames
        frames[(uid, number)] = (frame, [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    return seg, frames


def assert_seg_matches(seg_path: Path, sources: list[tuple[Path, str, int]], truth: np.ndarray,
                       labels: dict[str, int]) -> pydicom.Dataset:
    """Segment n (label id v, in id order) referencing source file k holds ``truth[k] == v``."""
    seg, frames = seg_frames(seg_path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    ids = sorted(v for v in labels.values() if v)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [n for v in ids for n, i in labels.items() if i == v]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(ids) + 1))
    first = pydicom.dcmread(sources[0][0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in first.ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in first.PixelSpacing], atol=1e-6)
    for path, uid, k in sources:
        position = [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]
        for number, value in enumerate(ids, start=1):
            frame, frame_position = frames.get((uid, number), (None, position))
            expected = truth[k] == value
            got = np.zeros_like(expected) if frame is None else frame.astype(bool)
            assert np.array_equal(got, expected), f"segment {number} on source slice {k} ({path.name})"
            np.testing.assert_allclose(frame_position, position, atol=1e-4)
    return seg


def truth_volume(n: int = 8, rows: int = 32, cols: int = 24) -> np.ndarray:
    """Labels 1, 2, 3 in blocks that differ from slice to slice (a misplaced frame shows)."""
    lab = np.zeros((n, rows, cols), np.uint8)
    for k in range(n):
        lab[k, 2 + k:10 + k, 3:9] = 1
        lab[k, 20:28, 2 + 2 * k:6 + 2 * k] = 3 if k % 3 else 0
    lab[1:3, 14:17, 15:20] = 2
    return lab


# ---- the codes table ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, value, modifier", [
    ("spleen", "78961009", None), ("kidney_right", "64033007", RIGHT), ("Right Kidney", "64033007", RIGHT),
    ("left_kidney", "64033007", LEFT), ("gallbladder", "28231008", None), ("gall_bladder", "28231008", None),
    ("esophagus", "32849002", None), ("liver", "10200004", None), ("stomach", "69695003", None),
    ("aorta", "15825003", None), ("inferior_vena_cava", "64131007", None), ("IVC", "64131007", None),
    ("portal_and_splenic_vein", "110765007", None), ("portal_vein_and_splenic_vein", "110765007", None),
    ("pancreas", "15776009", None), ("right_adrenal_gland", "23451007", RIGHT),
    ("adrenal_right", "23451007", RIGHT), ("adrenal_gland_left", "23451007", LEFT), ("duodenum", "38848004", None),
])
def test_known_names_get_sct_codes(name, value, modifier):
    codes = segment_codes(name)
    assert codes.category == ANATOMICAL_STRUCTURE and codes.type.value == value and codes.type.scheme == "SCT"
    assert codes.modifier == modifier


def test_phantom_labels_all_have_codes():
    assert all(not segment_codes(name).generic for name in PHANTOM_LABELS if name != "background")


@pytest.mark.parametrize("name", ["tumor", "liver_left", "kidney_left_right", "lesion 1", ""])
def test_unknown_names_get_the_generic_tissue_concept(name):
    assert segment_codes(name) == GENERIC and GENERIC.category == GENERIC.type == TISSUE


def test_table_codes_agree_with_pydicom_where_it_has_them():
    """Every concept in the table whose code pydicom's DICOM code dictionary knows has its meaning there."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from diffprobe.io import dicom_codes

    known: dict[str, set[str]] = {}
    for attr in dir(codes.SCT):
        code = getattr(codes.SCT, attr, None) if attr[:1].isupper() else None
        if isinstance(code, Code):
            known.setdefault(code.value, set()).add(code.meaning.lower())
    concepts = [c for c, _, _ in dicom_codes._STRUCTURES] + [ANATOMICAL_STRUCTURE, TISSUE, RIGHT, LEFT]
    checked = [c for c in concepts if c.value in known]
    assert [c.value for c in concepts if c not in checked] == ["110765007"]  # in TotalSegmentator's mapping
    for c in checked:  # the same concept: its meaning shares a word with pydicom's ("Urinary bladder"/"Bladder")
        words = set(c.meaning.lower().split())
        assert any(words & set(m.split()) for m in known[c.value]), (c, known[c.value])


# ---- the writer ---------------------------------------------------------------------------------
def test_seg_frames_follow_slice_positions_on_an_oblique_reversed_series(tmp_path):
    """Oblique rows, columns pointing to the feet, slices numbered against the normal, file names
    shuffled, rows != columns: every frame must still land on its source slice."""
    truth = truth_volume()
    a = np.deg2rad(25)
    sources = write_ct_series(tmp_path / "series", truth.astype(np.int16) * 100, (np.cos(a), np.sin(a), 0),
                              (0, 0, -1), step_sign=-1.0)
    volume = read_image(tmp_path / "series")
    label_map = np.rint(volume.array / 100).astype(np.uint8)  # from the pixels alone: no position logic
    assert sorted(np.unique(label_map)) == [0, 1, 2, 3]
    labels = {"background": 0, "liver": 1, "unused organ": 2, "kidney_right": 3}
    seg = assert_seg_matches(write_dicom_seg(label_map, volume.geometry, tmp_path / "series", labels,
                                             tmp_path / "out.dcm", "test model"), sources, truth, labels)
    kidney = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == RIGHT.value
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == TISSUE.value
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "diffprobe" and algorithm.AlgorithmVersion
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_highdicom_reads_the_seg_back(tmp_path):
    import highdicom as hd

    truth = truth_volume(6, 20, 20)
    sources = write_ct_series(tmp_path / "series", truth.astype(np.int16) * 100, (1, 0, 0), (0, 1, 0))
    volume = read_image(tmp_path / "series")
    labels = {"background": 0, "liver": 1, "spleen": 2, "aorta": 3}
    seg = hd.seg.segread(write_dicom_seg(np.rint(volume.array / 100).astype(np.uint8), volume.geometry,
                                         tmp_path / "series", labels, tmp_path / "out.dcm"))
    assert seg.number_of_segments == 3
    assert [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()] == ["liver", "spleen",
                                                                                                  "aorta"]
    for _, uid, k in sources:
        got = seg.get_pixels_by_source_instance([uid], combine_segments=True, relabel=False)[0]
        np.testing.assert_array_equal(got, truth[k])


def test_slice_mapping_ignores_file_order_and_refuses_foreign_grids(tmp_path):
    truth = truth_volume(6, 16, 16)
    sources = write_ct_series(tmp_path / "series", truth.astype(np.int16), (1, 0, 0), (0, 1, 0), step_sign=-1.0)
    volume = read_image(tmp_path / "series")
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p, _, _ in sources]
    random.Random(1).shuffle(datasets)
    indices = slice_indices(volume.geometry, datasets, tmp_path / "series")
    for ds, k in zip(datasets, indices):
        np.testing.assert_array_equal(np.rint(volume.array[k]), truth[int(ds.InstanceNumber) - 1])
    g = volume.geometry
    shifted = Geometry(g.shape_xyz, g.spacing, (g.origin[0], g.origin[1], g.origin[2] + g.spacing[2] / 2), g.direction)
    with pytest.raises(DiffprobeError, match="not a slice of the segmentation's grid"):
        slice_indices(shifted, datasets, tmp_path / "series")
    other = Geometry((g.shape_xyz[0] + 2, *g.shape_xyz[1:]), g.spacing, g.origin, g.direction)  # 2 more columns
    with pytest.raises(DiffprobeError, match="not a slice"):
        write_dicom_seg(np.zeros(other.shape_zyx, np.uint8), other, tmp_path / "series", {"background": 0, "a": 1},
                        tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


# ---- predict --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_predict_writes_a_seg_equal_to_the_nifti(use_trained_probe_roots, tmp_path):
    """``--output_type both``: the SEG's frames are the NIfTI label map's slices, per source file;
    ``dicom_seg`` alone writes only the .dcm, and ``--continue_prediction`` redoes a missing SEG."""
    img, _ = body_volume((12, 40, 48), seed=6)
    series = tmp_path / "in" / "scan"
    files = write_dicom_series(img, series, (0.75, 0.8, 2.5), (-30.5, -12.25, 100.0))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(series), "-o", str(out), *MODEL, "--output_type", "both"]) == 0
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan.nii.gz")))
    assert nifti.max() > 0  # the fixture's head predicts organs: the comparison below is not trivial
    # conftest's series: slice k of ``img`` has SOPInstanceUID <series>.4.<k+1>, file IM{7k % n}
    sources = [(f, pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID, k) for k, f in enumerate(files)]
    assert all(uid.endswith(f".4.{k + 1}") for _, uid, k in sources)
    assert_seg_matches(out / "scan.dcm", sources, nifti, PHANTOM_LABELS)

    (out / "scan.dcm").unlink()
    stamp = (out / "scan.nii.gz").stat().st_mtime_ns
    assert main(["predict", "-i", str(series), "-o", str(out), *MODEL, "--output_type", "both",
                 "--continue_prediction"]) == 0
    assert (out / "scan.dcm").is_file() and (out / "scan.nii.gz").stat().st_mtime_ns != stamp

    only = tmp_path / "only"
    assert main(["predict", "-i", str(series), "-o", str(only), *MODEL, "--output_type", "dicom_seg"]) == 0
    assert sorted(p.name for p in only.iterdir()) == ["scan.dcm"]
    assert_seg_matches(only / "scan.dcm", sources, nifti, PHANTOM_LABELS)


def test_dicom_seg_is_refused_for_non_dicom_input(roots, tmp_path, capsys):
    img, _ = body_volume((6, 20, 24))
    nifti = write_sitk(img, tmp_path / "in" / "case_0000.nii.gz")
    for source in (tmp_path / "in", nifti):
        assert main(["predict", "-i", str(source), "-o", str(tmp_path / "out"), "--output_type", "dicom_seg"]) == 1
        err = capsys.readouterr().err
        assert str(source) in err and "needs a DICOM series" in err and "fix:" in err and "Traceback" not in err
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--output_type", "rtstruct"]) == 1
    assert "nifti, dicom_seg, both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any model is looked for or anything written


# ---- the real series -------------------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED_REAL_CT / "dicom").is_dir(), reason="../shared/data/real-ct not present")
def test_real_ct_series_labels_as_seg(tmp_path):
    """The real 512x512x20 series with its 13 BTCV labels (the label file's y axis is flipped: it is
    reoriented onto the series' grid first). Each source file's slice is found by its pixels."""
    import json

    folder = SHARED_REAL_CT / "dicom"
    labels = json.loads((SHARED_REAL_CT / "labels.json").read_text())["labels"]
    image = read_image(folder)
    label = read_label(SHARED_REAL_CT / "abdomen_dicom_label.nii.gz")
    label_map, _ = reorient_onto(label.array, label.geometry, image.geometry)
    assert label_map.shape == image.array.shape
    seg_path = write_dicom_seg(label_map, image.geometry, folder, labels, tmp_path / "abdomen.dcm", "real")
    sources = []
    for f in sorted(folder.iterdir()):  # JPEG 2000 files: their pixels decoded by GDCM, one file at a time
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[0]
        (k,) = [k for k in range(len(image.array)) if np.array_equal(image.array[k], hu)]
        # the dataset's SOPInstanceUID is blank in these files: the file meta keeps it
        sop_uid = pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
        sources.append((f, sop_uid, k))
    assert sorted(k for _, _, k in sources) == list(range(20))
    seg = assert_seg_matches(seg_path, sources, label_map, labels)
    assert len(seg.SegmentSequence) == 13
    assert all(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == ANATOMICAL_STRUCTURE.value
               for s in seg.SegmentSequence)  # every BTCV organ has a code in the table
