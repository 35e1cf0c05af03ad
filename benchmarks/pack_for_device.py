"""Pack what a lent GPU machine needs for the real-CT run and the GPU suite into ``.device/``.

A GPU day (``device`` tool) ships the checkout and at most 64 MiB of ignored paths; ``../shared``
does not travel and nothing can be installed there from a registry. This writes, under ``OUT``
(default ``.device/``, listed in ``.git/info/exclude``):

- ``whl/``: the wheels of the run-time dependencies that the GPU image lacks (nnunetv2, batchgenerators,
  acvl_utils, dynamic_network_architectures, blosc2 and its needs, nibabel), for CPython 3.12;
- ``sitk.tar.xz``: SimpleITK unpacked and xz-compressed (its 53 MB wheel is 28 MB this way);
- ``data/real-ct`` and ``data/real-ct-unlabelled``: the shared real CTs resampled in-plane to
  ``--inplane`` mm (default 1.5, the CPU run's spacing) with z kept; the label is resampled
  (nearest) onto the resampled image's grid. 49 MB of 0.8-1.1 mm scans would not fit beside the
  wheels; at 1.5 mm the GPU run and the CPU-budget run see the same in-plane resolution.

On the GPU machine::

    mkdir -p /tmp/site && tar xJf .device/sitk.tar.xz -C /tmp/site && python3 -m pip install -q --no-index \\
        --no-deps --target /tmp/site .device/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    DIFFPROBE_SHARED_DATA=.device/data python3 benchmarks/real_ct.py --work /tmp/rc --device cuda ...

Usage: ``python benchmarks/pack_for_device.py [--out .device] [--inplane 1.5] [--skip-wheels]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WHEELS = ["nnunetv2==2.8.1", "batchgenerators==0.25.5", "dynamic_network_architectures==0.4.4", "blosc2==4.14.1",
          "msgpack==1.2.4", "ndindex==1.10.1", "numexpr==2.14.2", "nibabel==5.4.2"]
SDIST_ONLY = ["acvl_utils==0.2.6"]  # pure Python, published as a source archive: built into a wheel here
SIMPLEITK = "SimpleITK==2.5.3"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def download(spec: str, dest: Path) -> None:
    """One binary wheel for CPython 3.12 on x86-64 Linux, without its dependencies."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), spec],
                   check=True)


def pack_wheels(out: Path) -> None:
    whl = out / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS:
        download(spec, whl)
    for spec in SDIST_ONLY:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl), spec], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        download(SIMPLEITK, Path(tmp))
        wheel = next(Path(tmp).glob("*.whl"))
        unpacked = Path(tmp) / "site"
        zipfile.ZipFile(wheel).extractall(unpacked)
        with tarfile.open(out / "sitk.tar.xz", "w:xz", preset=9) as tar:
            for item in sorted(unpacked.iterdir()):
                tar.add(item, arcname=item.name)


def resample_inplane(image, inplane: float, reference=None, nearest: bool = False):
    """``image`` on a grid of ``inplane`` mm in x and y (z unchanged) covering the same extent."""
    import SimpleITK as sitk

    if reference is None:
        spacing = image.GetSpacing()
        new_spacing = (max(inplane, spacing[0]), max(inplane, spacing[1]), spacing[2])
        size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), spacing, new_spacing)]
        reference = sitk.Image(size, sitk.sitkInt16)
        reference.SetSpacing(new_spacing)
        reference.SetOrigin(image.GetOrigin())
        reference.SetDirection(image.GetDirection())
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    default = 0 if nearest else -1024
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def pack_data(out: Path, inplane: float) -> None:
    import SimpleITK as sitk

    labelled, unlabelled = out / "data" / "real-ct", out / "data" / "real-ct-unlabelled"
    labelled.mkdir(parents=True, exist_ok=True)
    unlabelled.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(SHARED / "real-ct" / "abdomen_dicom_0000.nii.gz"))
    small = resample_inplane(image, inplane)
    sitk.WriteImage(small, str(labelled / "abdomen_dicom_0000.nii.gz"), useCompression=True)
    label = sitk.ReadImage(str(SHARED / "real-ct" / "abdomen_dicom_label.nii.gz"))
    sitk.WriteImage(resample_inplane(label, inplane, reference=small, nearest=True),
                    str(labelled / "abdomen_dicom_label.nii.gz"), useCompression=True)
    shutil.copy(SHARED / "real-ct" / "labels.json", labelled / "labels.json")
    for f in sorted((SHARED / "real-ct-unlabelled").glob("*_0000.nii.gz")):
        sitk.WriteImage(resample_inplane(sitk.ReadImage(str(f)), inplane), str(unlabelled / f.name),
                        useCompression=True)
    (out / "data" / "PACKED.json").write_text(json.dumps({"inplane_mm": inplane, "source": str(SHARED)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / ".device")
    ap.add_argument("--inplane", type=float, default=1.5)
    ap.add_argument("--skip-wheels", action="store_true")
    args = ap.parse_args()
    if not (SHARED / "real-ct" / "abdomen_dicom_0000.nii.gz").is_file():
        sys.exit(f"{SHARED / 'real-ct'} not found: the shared real CTs are needed")
    if not args.skip_wheels:
        pack_wheels(args.out)
    pack_data(args.out, args.inplane)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"packed {args.out}: {total / 2**20:.1f} MiB (the device tool carries at most 64 MiB with the checkout)")


if __name__ == "__main__":
    main()
