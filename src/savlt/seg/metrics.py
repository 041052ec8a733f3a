"""Overlap scores of binary masks, per image (a batch at a time, no loop over images)."""

from __future__ import annotations

import torch


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU (B,) of bool masks (B, H, W); two empty masks agree perfectly (score 1)."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)  # (B, H*W)
    inter = (pred & target).sum(1).float()
    total = pred.sum(1).float() + target.sum(1).float()
    union = total - inter
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / total.clamp(min=1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp(min=1))
    return dice, iou
