"""``diffprobe predict`` with a tiny trained probe: exact output geometry, determinism, resuming,
partitioning, probabilities, single files, DICOM series and the CLI short form."""

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_REAL_CT, body_volume, write_dicom_series, write_sitk

from diffprobe.cli.app import main
from diffprobe.errors import DiffprobeError
from diffprobe.io.geometry import reorient_onto
from diffprobe.io.image_io import geometry_of, read_image
from diffprobe.predict.predictor import predict

LABELS = set(range(7))  # the phantom dataset's background + 6 organs
# The fixture's probe, named in full: other tests train more configurations into the same session roots.
MODEL = {"dataset": 1, "configuration": "tiny__fpn"}
SHAPE = (20, 56, 64)  # z, y, x: 50-60 mm across at ~1 mm, like the training phantoms (fov 60 mm)
SMALL = (12, 40, 48)


def rotation(axis: int, degrees: float) -> tuple[float, ...]:
    """Row-major 3x3 rotation about world axis ``axis`` (0=x, 1=y, 2=z) as a SimpleITK direction."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return tuple(m.reshape(-1))


def write_case(folder: Path, name: str, shape=SHAPE, seed: int = 0, ending: str = ".nii.gz", **geometry) -> Path:
    img, _ = body_volume(shape, seed=seed)
    return write_sitk(img, folder / f"{name}_0000{ending}", **geometry)


def sitk_geometry(path: Path) -> dict[str, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return {"size": np.array(img.GetSize()), "spacing": np.array(img.GetSpacing()),
            "origin": np.array(img.GetOrigin()), "direction": np.array(img.GetDirection())}


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_same_geometry(out: Path, ref: Path) -> None:
    a, b = sitk_geometry(out), sitk_geometry(ref)
    assert np.array_equal(a["size"], b["size"]), f"{out.name}: size {a['size']} vs input {b['size']}"
    for key in ("spacing", "origin", "direction"):
        assert np.allclose(a[key], b[key], rtol=0, atol=1e-6), f"{out.name}: {key} {a[key]} vs input {b[key]}"


# ---- geometry --------------------------------------------------------------------------------
GEOMETRIES = {  # name: (file ending, geometry)
    "aniso": (".nii.gz", {"spacing": (0.7, 0.9, 2.5)}),
    "oblique": (".nii.gz", {"spacing": (0.8, 0.85, 2.0), "origin": (12.5, -40.0, 7.25),
                            "direction": rotation(1, 20)}),  # about y: mixes the fine x and the coarse z axis
    "obliquemha": (".mha", {"spacing": (1.1, 0.9, 2.2), "origin": (-3.0, 5.5, -60.0),
                            "direction": rotation(0, -25)}),
    "flipped": (".nrrd", {"spacing": (1.2, 1.0, 3.0), "origin": (-120.5, 33.25, 400.0),
                          "direction": (-1, 0, 0, 0, 1, 0, 0, 0, -1)}),
    "permuted": (".nii", {"spacing": (1.0, 1.3, 2.0), "origin": (5.0, 6.0, -7.0),
                          "direction": (0, 0, 1, 1, 0, 0, 0, 1, 0)}),  # index x->world y, y->z, z->x
}


def test_output_keeps_exact_input_geometry(use_trained_probe_roots, tmp_path):
    inputs = tmp_path / "in"
    for seed, (name, (ending, geometry)) in enumerate(GEOMETRIES.items()):
        write_case(inputs, name, seed=seed, ending=ending, **geometry)
    written = predict(inputs, tmp_path / "out", **MODEL, show_progress=False)
    assert sorted(p.name for p in written) == sorted(name + ending for name, (ending, _) in GEOMETRIES.items())
    for name, (ending, geometry) in GEOMETRIES.items():
        out, src = tmp_path / "out" / f"{name}{ending}", inputs / f"{name}_0000{ending}"
        assert_same_geometry(out, src)
        # and what was asked for (NIfTI stores float32, hence the looser tolerance)
        g = sitk_geometry(out)
        assert np.allclose(g["spacing"], geometry["spacing"], atol=1e-5)
        assert np.allclose(g["origin"], geometry.get("origin", (0, 0, 0)), atol=1e-4)
        assert np.allclose(g["direction"], geometry.get("direction", np.eye(3).reshape(-1)), atol=1e-5)
        img = sitk.ReadImage(str(out))
        assert img.GetPixelID() == sitk.sitkUInt8, name
        values = set(np.unique(sitk.GetArrayFromImage(img)).tolist())
        assert values <= LABELS and len(values) > 1, (name, values)


def test_output_follows_the_input_voxel_layout(use_trained_probe_roots, tmp_path):
    """The same physical scan stored flipped or with x/y swapped gives the same segmentation, voxel for
    voxel, once the outputs are brought onto one grid: orientation is undone, not only declared."""
    img, _ = body_volume(SHAPE, seed=4)
    spacing, origin = (0.9, 1.1, 2.5), (-20.0, 10.0, 30.0)
    nz, _, nx = SHAPE
    variants = {
        "plain": (img, {"spacing": spacing, "origin": origin}),
        "flipped": (img[::-1, :, ::-1], {"spacing": spacing, "direction": (-1, 0, 0, 0, 1, 0, 0, 0, -1),
                                          "origin": (origin[0] + (nx - 1) * spacing[0], origin[1],
                                                     origin[2] + (nz - 1) * spacing[2])}),
        "swapped": (img.transpose(0, 2, 1), {"spacing": (spacing[1], spacing[0], spacing[2]), "origin": origin,
                                             "direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}),
    }
    outs = {}
    for name, (array, geometry) in variants.items():
        write_sitk(np.ascontiguousarray(array), tmp_path / name / "case_0000.nii.gz", **geometry)
        (out,) = predict(tmp_path / name, tmp_path / f"out_{name}", **MODEL, show_progress=False)
        outs[name] = read_image(out, dtype=np.uint8)
    ref = outs["plain"]
    for name in ("flipped", "swapped"):
        moved, rel = reorient_onto(outs[name].array, outs[name].geometry, ref.geometry)
        assert rel.kind == "reoriented", name
        np.testing.assert_array_equal(moved, ref.array, err_msg=name)
    assert len(np.unique(ref.array)) > 1


# ---- determinism, resuming, partitioning --------------------------------------------------------------
def test_two_runs_are_byte_identical(use_trained_probe_roots, tmp_path):
    write_case(tmp_path / "in", "a", seed=1, spacing=(0.8, 0.8, 2.5))
    write_case(tmp_path / "in", "b", shape=SMALL, seed=2, ending=".mha", direction=rotation(2, 15))
    runs = [predict(tmp_path / "in", tmp_path / f"out{r}", **MODEL, save_probabilities=True,
                    show_progress=False) for r in range(2)]
    for first, second in zip(*runs):
        assert first.name == second.name
        np.testing.assert_array_equal(read_array(first), read_array(second))
        # SimpleITK writes no timestamp (gzip header mtime 0, MetaImage has none): the files are identical
        assert first.read_bytes() == second.read_bytes(), first.name
        # .npz files are zip archives with member timestamps, so only their arrays are compared
        case = first.name.split(".")[0]
        with np.load(first.parent / f"{case}.npz") as p1, np.load(second.parent / f"{case}.npz") as p2:
            np.testing.assert_array_equal(p1["probabilities"], p2["probabilities"])


def test_continue_prediction_skips_existing_outputs(use_trained_probe_roots, tmp_path):
    for i in range(2):
        write_case(tmp_path / "in", f"c{i}", shape=SMALL, seed=i)
    out = tmp_path / "out"
    first = predict(tmp_path / "in", out, **MODEL, show_progress=False)
    old = 1_000_000_000
    for f in first:
        os.utime(f, (old, old))
    (out / "c1.nii.gz").unlink()
    again = predict(tmp_path / "in", out, **MODEL, continue_prediction=True, show_progress=False)
    assert [p.name for p in again] == ["c0.nii.gz", "c1.nii.gz"]
    assert (out / "c0.nii.gz").stat().st_mtime == old  # skipped
    assert (out / "c1.nii.gz").is_file() and (out / "c1.nii.gz").stat().st_mtime > old  # predicted again
    # without --continue_prediction everything is predicted again
    predict(tmp_path / "in", out, **MODEL, show_progress=False)
    assert (out / "c0.nii.gz").stat().st_mtime > old
    # an output written without probabilities is not "done" for a run that asks for them
    os.utime(out / "c0.nii.gz", (old, old))
    predict(tmp_path / "in", out, **MODEL, continue_prediction=True, save_probabilities=True, show_progress=False)
    assert (out / "c0.npz").is_file() and (out / "c1.npz").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_parts_partition_the_cases(use_trained_probe_roots, tmp_path):
    names = [f"p{i}" for i in range(3)]
    for i, name in enumerate(names):
        write_case(tmp_path / "in", name, shape=SMALL, seed=i)
    parts = [{p.name for p in predict(tmp_path / "in", tmp_path / f"out{k}", **MODEL, num_parts=2, part_id=k,
                                      show_progress=False)} for k in range(2)]
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"{n}.nii.gz" for n in names}
    for k in range(2):
        assert {p.name for p in (tmp_path / f"out{k}").iterdir()} == parts[k]
    with pytest.raises(DiffprobeError, match="part_id"):
        predict(tmp_path / "in", tmp_path / "out", **MODEL, num_parts=2, part_id=2, show_progress=False)


# ---- probabilities ---------------------------------------------------------------------------------
def test_save_probabilities(use_trained_probe_roots, tmp_path):
    write_case(tmp_path / "in", "prob", seed=5, spacing=(0.7, 0.9, 2.5), direction=rotation(2, 20))
    (seg_path,) = predict(tmp_path / "in", tmp_path / "out", **MODEL, save_probabilities=True,
                          show_progress=False)
    seg = read_array(seg_path)
    with np.load(tmp_path / "out" / "prob.npz") as f:
        saved = f["probabilities"]
    assert saved.dtype == np.float16 and saved.shape == (len(LABELS), *seg.shape)
    probs = saved.astype(np.float32)
    # Linear resampling of a softmax is a convex combination: probabilities stay probabilities. Each of
    # the K float16 values is within half an ulp (<= 2**-12 below 1) of its float32 value.
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert np.abs(probs.sum(0) - 1.0).max() <= len(LABELS) * 2.0**-12 + 1e-6
    # The label file is the argmax of exactly these saved values, everywhere (ties: the lower class).
    np.testing.assert_array_equal(saved.argmax(0), seg)
    assert len(np.unique(seg)) > 1 and (probs.max(0) < 0.99).any()  # a real test: classes and doubt
    # Outside the body crop: one-hot background.
    assert (probs[0] == 1.0).any()
    # Asking for probabilities does not change the segmentation.
    (plain,) = predict(tmp_path / "in", tmp_path / "out_plain", **MODEL, show_progress=False)
    assert plain.read_bytes() == seg_path.read_bytes()


# ---- input kinds --------------------------------------------------------------------------------------
def test_single_image_file_input(use_trained_probe_roots, tmp_path):
    path = write_case(tmp_path / "in", "single", shape=SMALL, spacing=(0.9, 0.9, 2.5))
    assert predict(path, tmp_path / "out", **MODEL, show_progress=False) == [tmp_path / "out" / "single.nii.gz"]
    assert_same_geometry(tmp_path / "out" / "single.nii.gz", path)
    # a name without the channel suffix is the case name; the ending is kept
    img, _ = body_volume(SMALL, seed=1)
    plain = write_sitk(img, tmp_path / "in" / "scan.mha", spacing=(1.0, 1.0, 2.0))
    assert predict(plain, tmp_path / "out", **MODEL, show_progress=False) == [tmp_path / "out" / "scan.mha"]
    assert_same_geometry(tmp_path / "out" / "scan.mha", plain)


def test_detached_header_input_gives_single_file_output(use_trained_probe_roots, tmp_path):
    """.mhd/.nhdr are two files; written atomically under a temporary name the header would point to a
    hidden temporary data file, so their segmentations are written as .mha/.nrrd."""
    img, _ = body_volume(SMALL, seed=2)
    mhd = write_sitk(img, tmp_path / "in" / "scan.mhd", spacing=(0.9, 1.0, 2.5), origin=(1.0, 2.0, 3.0))
    nhdr = write_sitk(img, tmp_path / "in" / "other.nhdr", spacing=(0.9, 1.0, 2.5), direction=rotation(2, 10))
    out = tmp_path / "out"
    assert predict(mhd, out, **MODEL, show_progress=False) == [out / "scan.mha"]
    assert predict(nhdr, out, **MODEL, show_progress=False) == [out / "other.nrrd"]
    assert sorted(p.name for p in out.iterdir()) == ["other.nrrd", "scan.mha"]
    assert_same_geometry(out / "scan.mha", mhd)
    assert_same_geometry(out / "other.nrrd", nhdr)


def test_dicom_series_folder_equals_nifti(use_trained_probe_roots, tmp_path, monkeypatch):
    img, _ = body_volume(SHAPE, seed=6)
    spacing, origin = (0.75, 0.75, 2.5), (-30.5, -12.25, 100.0)
    dicom = tmp_path / "dicom_in" / "scan"
    write_dicom_series(img, dicom, spacing, origin)
    nifti = write_sitk(img, tmp_path / "nifti_in" / "scan_0000.nii.gz", spacing, origin)
    series = read_image(dicom)
    assert series.geometry == geometry_of(sitk.ReadImage(str(nifti)))
    np.testing.assert_array_equal(series.array, img)

    (from_dicom,) = predict(dicom, tmp_path / "out_dicom", **MODEL, show_progress=False)
    (from_nifti,) = predict(nifti.parent, tmp_path / "out_nifti", **MODEL, show_progress=False)
    assert from_dicom.name == from_nifti.name == "scan.nii.gz"  # DICOM: the folder name, written as NIfTI
    assert_same_geometry(from_dicom, nifti)
    np.testing.assert_array_equal(read_array(from_dicom), read_array(from_nifti))
    # "-i ." inside the series folder names the case after the folder too (not a hidden ".nii.gz")
    monkeypatch.chdir(dicom)
    (here,) = predict(".", tmp_path / "out_here", **MODEL, show_progress=False)
    assert here.name == "scan.nii.gz"
    assert here.read_bytes() == from_dicom.read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_REAL_CT / "dicom").is_dir(), reason="../shared/data/real-ct not present")
def test_real_ct_dicom_equals_nifti(use_trained_probe_roots, tmp_path):
    """The real 512x512x20 series: its DICOM folder and its NIfTI export segment identically.

    Both inputs are linked under one case name (for the output names: the features' noise is seeded by
    tile position alone); step 1.0 (no tile overlap) keeps each prediction near 15 s on 2 CPU cores
    instead of ~45 s."""
    (tmp_path / "dicom_in").mkdir()
    (tmp_path / "nifti_in").mkdir()
    dicom = tmp_path / "dicom_in" / "abdomen"
    dicom.symlink_to(SHARED_REAL_CT / "dicom", target_is_directory=True)
    nifti = tmp_path / "nifti_in" / "abdomen_0000.nii.gz"
    nifti.symlink_to(SHARED_REAL_CT / "abdomen_dicom_0000.nii.gz")
    (a,) = predict(dicom, tmp_path / "out_dicom", **MODEL, step_size=1.0, show_progress=False)
    (b,) = predict(nifti, tmp_path / "out_nifti", **MODEL, step_size=1.0, show_progress=False)
    assert a.name == b.name == "abdomen.nii.gz"
    seg_a, seg_b = read_array(a), read_array(b)
    assert seg_a.shape == (20, 512, 512)
    np.testing.assert_array_equal(seg_a, seg_b)
    ga, gb = sitk_geometry(a), sitk_geometry(b)
    assert np.array_equal(ga["size"], gb["size"])
    np.testing.assert_allclose(ga["spacing"], gb["spacing"], atol=1e-4)  # DICOM decimal strings vs float32
    np.testing.assert_allclose(ga["origin"], gb["origin"], atol=1e-3)
    np.testing.assert_allclose(ga["direction"], gb["direction"], atol=1e-6)


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_short_form_and_missing_input(use_trained_probe_roots, tmp_path, capsys, monkeypatch):
    # a results root holding only the fixture's probe (links), whatever other tests trained meanwhile
    results = tmp_path / "results"
    config = results / "Dataset001_Phantoms" / "diffprobe" / "tiny__fpn"
    config.parent.mkdir(parents=True)
    config.symlink_to(use_trained_probe_roots["results"] / "Dataset001_Phantoms" / "diffprobe" / "tiny__fpn")
    (results / "pretrained").symlink_to(use_trained_probe_roots["results"] / "pretrained")
    monkeypatch.setenv("DIFFPROBE_RESULTS", str(results))
    path = write_case(tmp_path / "in", "cli", shape=SMALL, seed=3)
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 0  # no -d: the only model
    assert_same_geometry(tmp_path / "out" / "cli.nii.gz", path)
    capsys.readouterr()
    missing = tmp_path / "no_such_folder"
    assert main(["predict", "-i", str(missing), "-o", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists()


def test_postprocessing_clears_outside_the_body_and_npp_turns_it_off(use_trained_probe_roots, tmp_path):
    from diffprobe.preprocessing.cropping import filled_body

    write_case(tmp_path / "in", "pp", seed=6, spacing=(0.9, 0.9, 2.5))
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "post"), "-d", "1",
                 "-c", "tiny__fpn"]) == 0
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "plain"), "-d", "1",
                 "-c", "tiny__fpn", "-npp"]) == 0
    post, plain = read_array(tmp_path / "post" / "pp.nii.gz"), read_array(tmp_path / "plain" / "pp.nii.gz")
    body = filled_body(read_array(tmp_path / "in" / "pp_0000.nii.gz"))  # raw layout, as the outputs
    assert (plain[~body] != 0).any(), "the near-initial head labels air: something for the body mask to clear"
    assert not post[~body].any()
    np.testing.assert_array_equal(post[body], plain[body])  # this probe chose no largest-component removal


def test_probability_cast_is_numpys_float16_bit_for_bit():
    """The export's float16 cast (torch's, fast for values subnormal in float16) gives numpy's bits."""
    from diffprobe.predict.cases import to_probability_dtype

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random(200_000) ** 12, rng.random(1000), [0.0, 1.0, 6.1e-5, 5.96e-8, 2.98e-8,
                                                                         2.99e-8, 1e-9, 0.5]]).astype(np.float32)
    cast = to_probability_dtype(values.reshape(8, -1)[:, ::2])  # a strided view, as a plane may be
    assert cast.dtype == np.float16
    assert np.array_equal(cast.view(np.uint16), values.reshape(8, -1)[:, ::2].astype(np.float16).view(np.uint16))
