"""bench_predict's volumes and its report helpers: the inputs both tools predict (made once, cached in
the work folder), a killed run's time extrapolated from its progress, and the table's cells.

Top-level imports stay minimal: nnU-Net's "spawn" worker processes re-import bench_predict, and this.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

DATASET_ID = 902
DATASET_NAME = f"Dataset{DATASET_ID}_BenchPredict"
CT_VOLUMES = {  # name -> (shape (z, y, x), spacing (z, y, x) mm)
    "ct256": ((128, 256, 256), (3.0, 1.5, 1.5)),
    "ct512": ((300, 512, 512), (1.5, 0.8, 0.8)),
    "ct600": ((600, 512, 512), (1.5, 0.8, 0.8)),  # the reliability issue's RAM-bound volume
}
TIMEOUT_CODES = (124, 137)  # coreutils timeout: TERM sent / KILL needed
_TILES_RE = re.compile(r"\[bench\] tiles (\d+)/(\d+) at ([\d.]+) s, window from ([\d.]+) s")


def ensure_volume(name: str, work: Path) -> tuple[Path, dict]:
    """Input folder holding ``<name>_0000.nii.gz``, and the volume's shape and spacing (z, y, x)."""
    import SimpleITK as sitk

    from diffprobe.utils import atomic_path

    folder = work / "inputs" / name
    target = folder / f"{name}_0000.nii.gz"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if name == "phantom":
            shutil.copyfile(work / "raw" / DATASET_NAME / "imagesTs" / "phantom_100_0000.nii.gz", target)
        else:
            from diffprobe.phantoms import PhantomConfig, generate_case

            (nz, ny, nx), (sz, sy, sx) = CT_VOLUMES[name]
            print(f"generating {name} ({nx}x{ny}x{nz} at {sx}x{sy}x{sz} mm)", flush=True)
            cfg = PhantomConfig(seed=1234, fov_mm=nx * sx, spacing_inplane=(sx, sx), spacing_slice=(sz, sz),
                                scan_length_mm=(nz * sz, nz * sz))
            case = generate_case(cfg, 0)
            assert case.image.shape == (nz, ny, nx), case.image.shape
            image, _ = case.to_sitk()
            del case
            with atomic_path(target, ".nii.gz") as tmp:
                sitk.WriteImage(image, str(tmp), useCompression=True)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(target))
    reader.ReadImageInformation()
    return folder, {"shape_zyx": list(reader.GetSize())[::-1],
                    "spacing_zyx_mm": [round(s, 3) for s in reader.GetSpacing()][::-1]}


def first_images(raw: Path, folder: Path, cases: int) -> Path:
    """``folder`` holding copies of the first ``cases`` images of a raw dataset (imagesTr, then imagesTs).

    Rebuilt when it holds another number of images, so a run with another ``--cases`` never predicts
    a stale set.
    """
    images = sorted((raw / "imagesTr").glob("*_0000.nii.gz")) + sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    if not folder.is_dir() or len(list(folder.iterdir())) != min(cases, len(images)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for img in images[:cases]:
            shutil.copyfile(img, folder / img.name)
    return folder


def estimate_seconds(output: str) -> dict:
    """A killed run's time, extrapolated from its last progress line: time to the sliding window +
    window time so far x total tiles / tiles done (the resampling and writing after it are left out);
    none when the window had finished (what remained is not known) or not started."""
    tiles = _TILES_RE.findall(output)
    if not tiles or not 0 < int(tiles[-1][0]) < int(tiles[-1][1]):
        return {}
    done, total, now, start = tiles[-1]
    start = float(start)
    return {"window_start_s": start, "tiles_done": int(done), "tiles_total": int(total),
            "estimated_seconds": round(start + (float(now) - start) * int(total) / int(done), 1)}


def fmt_seconds(r: dict) -> str:
    if r["failed"]:
        return "failed"
    if r["seconds"] is None:
        return "not run"
    if r["timed_out"]:
        est = f", ~{r['estimated_seconds']:.0f} est." if r.get("estimated_seconds") else ""
        return f">{r['seconds']:.0f} ({'not run' if r.get('skipped') else 'killed'}{est})"
    return f"{r['seconds']:.1f}"


def fmt_ram(r: dict) -> str:
    if r["failed"] or r["peak_rss_gb"] is None:
        return "-"
    return f"≥{r['peak_rss_gb']:.2f}" if r["timed_out"] else f"{r['peak_rss_gb']:.2f}"


def fmt_ratio(r: dict, base: dict | None, key: str) -> str:
    """value / baseline; a killed run's value is a lower bound, so the ratio may be one too."""
    if base is None or r["failed"] or base["failed"] or r[key] is None or base[key] is None:
        return "-"
    if r is base:
        return "1.00"
    up, down = (">", "<") if key == "seconds" else ("≥", "≤")
    if key == "seconds" and (r["timed_out"] or base["timed_out"]):
        est_r = r.get("estimated_seconds") if r["timed_out"] else r[key]
        est_b = base.get("estimated_seconds") if base["timed_out"] else base[key]
        if est_r and est_b:
            return f"~{est_r / est_b:.2f}"
    if r["timed_out"] and base["timed_out"]:
        return "?"
    ratio = r[key] / base[key]
    return f"{up}{ratio:.2f}" if r["timed_out"] else f"{down}{ratio:.2f}" if base["timed_out"] else f"{ratio:.2f}"
