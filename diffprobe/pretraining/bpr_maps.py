"""BPR coordinate maps of every volume: a derived cache of ``<model>/bpr_maps/<dataset>/<case>.b2nd``.

Computed once per volume by the trained BPR on the whole preprocessed volume
(``diffprobe.guidance.bpr_coordinates``, the same definition predict uses), then read per patch by
pretraining and the probe.

Each map knows what produced it: ``<case>.json`` next to it holds the checksum of the BPR checkpoint
(``weights_checksum`` of the final BPR checkpoint's weights) and the identity of the preprocessed case
(hash of its properties JSON, size and mtime of its data file). The stamp is removed before and
written (atomically) after the map, so a map without a current stamp is never used: a BPR
continued with ``--c``, a re-preprocessed case or a killed write all mean "compute again".

Under DDP (pretraining, probe training) the maps are shared out: rank 0 lists the missing or stale
ones, every rank computes its share (balanced by voxel count) and all ranks meet before reading
them. Rank 0 alone would keep the others waiting for the whole dataset, past the collective
timeout on a large one; a failure in any rank's share stops every rank with its message. The
results folder must be shared by all nodes (it holds the checkpoints too).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.guidance import bpr_coordinates
from diffprobe.preprocessing.storage import load_array, save_array
from diffprobe.preprocessing.volumes import VolumeRef
from diffprobe.pretraining.pretrained_model import BPR_CKPT, weights_checksum
from diffprobe.training import distributed as dist_utils
from diffprobe.training.checkpoint import load_checkpoint
from diffprobe.utils import read_json, write_json

STAMP_FORMAT = 2  # 2: z padded by repeated slices (bpr.model.predict_coordinates)


def map_path(ref: VolumeRef, out: Path) -> Path:
    """``<model>/bpr_maps/<dataset>/<case>.b2nd`` (``out``: the pretrained model's folder)."""
    return out / "bpr_maps" / ref.data_dir.parent.parent.name / f"{ref.identifier}.b2nd"


def stamp_path(map_file: Path) -> Path:
    return map_file.with_suffix(".json")


def bpr_checkpoint_checksum(out: Path) -> str:
    """The checksum of the final BPR's weights, the ones the maps must come from.

    Of the weights, not the file: a checkpoint rewritten with the same weights (a resumed run
    writing its final checkpoint again) must not invalidate maps that are still right.
    """
    ckpt = out / BPR_CKPT
    if not ckpt.is_file():
        raise DiffprobeError("this pretrained model has no trained BPR", ckpt,
                             "run `diffprobe pretrain --stage bpr` for it first")
    return weights_checksum(load_checkpoint(ckpt)["model"])


def case_checksum(ref: VolumeRef) -> str:
    """Identity of the preprocessed case: its properties JSON's bytes, its data file's size and mtime."""
    h = hashlib.sha1(ref.properties_path.read_bytes())
    st = ref.data_path.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _expected_stamp(ref: VolumeRef, bpr_checksum: str) -> dict:
    return {"format": STAMP_FORMAT, "bpr_checksum": bpr_checksum, "case_checksum": case_checksum(ref)}


def is_current(ref: VolumeRef, map_file: Path, bpr_checksum: str) -> bool:
    """Whether ``map_file`` exists and was computed by this BPR from this preprocessed case."""
    stamp = stamp_path(map_file)
    if not map_file.is_file() or not stamp.is_file():
        return False
    try:
        found = read_json(stamp)
    except (ValueError, OSError):
        return False
    expected = _expected_stamp(ref, bpr_checksum)
    return {k: found.get(k) for k in expected} == expected


def with_bpr_maps(volumes: list[VolumeRef], out: Path, bpr_checksum: str | None = None) -> list[VolumeRef]:
    """The volumes with their BPR map paths, every map checked to be current.

    ``bpr_checksum``: of the BPR checkpoint the maps must come from (default: ``out``'s final BPR
    checkpoint). Raises DiffprobeError naming the first missing or stale map (compute them with
    :func:`write_bpr_maps`).
    """
    bpr_checksum = bpr_checksum or bpr_checkpoint_checksum(out)
    refs = []
    for v in volumes:
        path = map_path(v, out)
        if not is_current(v, path, bpr_checksum):
            raise DiffprobeError(f"the BPR map of case {v.identifier} is missing or was computed by another BPR "
                                 "checkpoint or from another preprocessing of the case", path,
                                 "recompute the maps (`diffprobe pretrain --stage diffusion --c` writes them)")
        refs.append(dataclasses.replace(v, guidance_path=path))
    return refs


def write_bpr_maps(model: torch.nn.Module, volumes: list[VolumeRef], crop: list[int], out: Path,
                   device: torch.device, bpr_checksum: str | None = None) -> list[VolumeRef]:
    """The volumes with their BPR maps, computing every map that is missing or stale (see module doc).

    ``bpr_checksum``: of the checkpoint ``model`` was loaded from (default: ``out``'s final BPR checkpoint).
    Under DDP every rank calls it with the same volumes and computes its share.
    """
    bpr_checksum = bpr_checksum or bpr_checkpoint_checksum(out)
    # decided by rank 0 alone: ranks checking while others already write could see different lists
    with dist_utils.together("BPR maps: checking which maps are current"):
        stale = ([i for i, v in enumerate(volumes) if not is_current(v, map_path(v, out), bpr_checksum)]
                 if dist_utils.is_main_process() else None)
    stale = dist_utils.main_process_value(stale)
    share = dist_utils.balanced_shares([float(np.prod(volumes[i].shape)) for i in stale])[dist_utils.rank()]
    model = model.to(device).eval()
    with dist_utils.together("BPR maps"):
        for k in share:
            write_bpr_map(model, volumes[stale[k]], crop, out, bpr_checksum)
    return with_bpr_maps(volumes, out, bpr_checksum)


def write_bpr_map(model: torch.nn.Module, ref: VolumeRef, crop: list[int], out: Path, bpr_checksum: str) -> Path:
    """Compute and store one volume's map and then its stamp (``model``: on its device, in eval mode)."""
    path = map_path(ref, out)
    stamp = stamp_path(path)
    stamp.unlink(missing_ok=True)  # invalidate first: the stamp is the completion marker
    expected = _expected_stamp(ref, bpr_checksum)  # before reading: a case rewritten meanwhile stays stale
    coords = bpr_coordinates(model, load_array(ref.data_path), crop)
    save_array(coords.cpu().numpy(), path, None)
    write_json(stamp, expected | {"crop": [int(c) for c in crop]})
    return path
