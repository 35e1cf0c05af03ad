"""Preprocessed case storage: blosc2 arrays + a JSON properties file per case.

Layout (like nnU-Net's blosc2 layout, but properties in JSON, never pickle):
``data/<case>.b2nd`` (C, z, y, x) float32, ``data/<case>_seg.b2nd`` (1, z, y, x) uint8, or
uint16 when the case holds a label id above 255 (never narrowed: an id would wrap), for labelled
cases, ``data/<case>.json`` properties. The JSON is written last and names
the preprocessing hash: a case counts as finished only when its JSON exists with the
current hash, so a killed run never leaves a case that a rerun trusts.
"""

from __future__ import annotations

from pathlib import Path

import blosc2
import numpy as np

from diffprobe.io.image_io import label_dtype
from diffprobe.utils import atomic_path, read_json, write_json


def _chunks(shape: tuple[int, ...], patch_size: list[int] | None, itemsize: int) -> dict:
    if patch_size is None:
        return {}
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    blocks, chunks = comp_blosc2_params(shape, patch_size, itemsize)
    return {"chunks": chunks, "blocks": blocks}


def save_array(array: np.ndarray, path: Path, patch_size: list[int] | None = None) -> None:
    """Write one array atomically as .b2nd, chunked for patch reads."""
    blosc2.set_nthreads(1)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 8}
    with atomic_path(path, ".b2nd") as tmp:
        tmp.unlink()  # blosc2 refuses to overwrite without mode="w" on some versions
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", cparams=cparams,
                       **_chunks(array.shape, patch_size, array.itemsize))


def open_array(path: Path, mmap: bool = True):
    """Open a .b2nd lazily (slicing decompresses only the chunks needed)."""
    kwargs = {"mmap_mode": "r"} if mmap else {}
    return blosc2.open(urlpath=str(path), mode="r", **kwargs)


def load_array(path: Path) -> np.ndarray:
    return open_array(path)[...]


def case_paths(folder: Path, identifier: str) -> dict[str, Path]:
    return {
        "data": folder / f"{identifier}.b2nd",
        "seg": folder / f"{identifier}_seg.b2nd",
        "properties": folder / f"{identifier}.json",
    }


def is_finished(folder: Path, identifier: str, preprocessing_hash: str) -> bool:
    paths = case_paths(folder, identifier)
    if not paths["properties"].is_file() or not paths["data"].is_file():
        return False
    try:
        props = read_json(paths["properties"])
    except (ValueError, OSError):
        return False
    if props.get("preprocessing_hash") != preprocessing_hash:
        return False
    return not props.get("labelled") or paths["seg"].is_file()


def _seg_dtype(seg: np.ndarray) -> type[np.unsignedinteger]:
    """uint8 when every id fits, else uint16; refuses what neither holds instead of wrapping."""
    if seg.size and (not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0):
        raise ValueError(f"a label map must hold non-negative integer ids, got {seg.dtype}, min {seg.min()}")
    return label_dtype(int(seg.max()) if seg.size else 0)


def save_case(folder: Path, identifier: str, data: np.ndarray, seg: np.ndarray | None, properties: dict,
              patch_size: list[int] | None) -> None:
    paths = case_paths(folder, identifier)
    paths["properties"].unlink(missing_ok=True)  # invalidate first: JSON is the completion marker
    save_array(data.astype(np.float32, copy=False), paths["data"], patch_size)
    if seg is not None:
        save_array(seg[None].astype(_seg_dtype(seg), copy=False), paths["seg"], patch_size)
    else:
        paths["seg"].unlink(missing_ok=True)
    write_json(paths["properties"], properties)


def load_case(folder: Path, identifier: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    paths = case_paths(folder, identifier)
    props = read_json(paths["properties"])
    seg = load_array(paths["seg"])[0] if props.get("labelled") else None
    return load_array(paths["data"]), seg, props
