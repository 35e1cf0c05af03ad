"""Start a fine-tune from a trained frozen probe: the head's weights, not a fresh head.

Why: fine-tuning the denoiser together with a freshly initialised head at the denoiser's small
learning rate (1e-4) leaves the head under-trained, and the random head's gradients disturb the
pretrained features before the head means anything (on the phantoms that fine-tune lost to the
frozen probe it starts from, and never found the spleen). The usual remedy is to fit the head on
the frozen features first and then train everything (linear-probe-then-fine-tune, Kumar et al.,
ICLR 2022): the fine-tune then starts exactly where the method's probe ended.

The source must be a finished frozen probe of the same dataset on the same pretrained weights,
head, width, levels, timesteps and classes; anything else would not fit or would start from other
features, and is refused with the folder named.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.probe.model import ProbeFolder, ProbeModel
from diffprobe.training.checkpoint import load_checkpoint, load_state_checked

# probe.json keys that must agree between the frozen source and the fine-tune it starts
_MUST_MATCH = ("dataset", "pretrained_checksum", "head", "timesteps", "levels", "num_classes", "patch_size")


def warm_start_head(probe: ProbeModel, source: Path, meta: dict, device: str | torch.device = "cpu") -> None:
    """Load the head of the finished frozen probe in ``source`` into ``probe.head``.

    ``meta`` is the probe.json the fine-tune is about to write (same keys as the source's).
    """
    folder = ProbeFolder(source)
    if not folder.finished:
        raise DiffprobeError("the probe to start the fine-tune from has not finished training", source,
                             "train it first (diffprobe train, without --finetune)")
    found = folder.read_meta()
    if found["finetune"] or found.get("extractor", "denoiser") != "denoiser" or found.get("init") not in (
            None, "pretrained"):
        raise DiffprobeError("the probe to start the fine-tune from is not a frozen probe on pretrained weights",
                             folder.meta_path, "name the method's frozen probe (diffprobe train without --finetune)")
    changed = [k for k in _MUST_MATCH if found.get(k) != meta.get(k)]
    for key, default in (("width", None), ("with_input", False)):
        if found["config"].get(key, default) != meta["config"].get(key, default):
            changed.append(key)
    if changed:
        raise DiffprobeError(f"the probe to start the fine-tune from differs in {', '.join(changed)}",
                             folder.meta_path, "start from a frozen probe trained with the same settings")
    ckpt = load_checkpoint(folder.checkpoint, device)
    load_state_checked(probe.head, ckpt.get("model"), folder.checkpoint, "diffprobe train")
