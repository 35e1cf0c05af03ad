"""Segmentation loss: cross-entropy + soft Dice (nnU-Net's default pairing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """1 - mean soft Dice over foreground classes, computed over the whole batch (batch Dice).

    Batch Dice (sums over all patches) keeps the loss defined when a patch lacks a class, the
    usual situation for small organs.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice[1:].mean()


def segmentation_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
    ce = F.cross_entropy(logits.float(), target)
    dice = soft_dice_loss(logits, target)
    return ce + dice, {"ce": float(ce.detach()), "dice_loss": float(dice.detach())}


@torch.no_grad()
def dice_per_class(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Hard Dice per foreground class over everything given (NaN where a class is absent in both)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        out.append(float("nan") if denom == 0 else 2 * int((p & t).sum()) / denom)
    return out
