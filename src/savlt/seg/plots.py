"""Figures of the segmenter: training curves per fold, and mask overlays to eyeball predictions.

Figures are drawn on a bare matplotlib Figure (no pyplot), so no GUI backend or global state is
involved and this works on a headless server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

TISSUE_TINT = np.array([0.1, 0.9, 0.3])  # green overlay on tissue
OVERLAY_ALPHA = 0.35


def plot_curves(histories: Sequence[Sequence[dict[str, Any]]], path: Path) -> Path:
    """Train/val loss, val Dice and val IoU per epoch, one line per fold."""
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    panels = fig.subplots(1, 3)
    for fold, history in enumerate(histories):
        epochs = [h["epoch"] for h in history]
        line = panels[0].plot(epochs, [h["train_loss"] for h in history], label=f"fold {fold} train")[0]
        panels[0].plot(
            epochs, [h["val_loss"] for h in history], "--", color=line.get_color(), label=f"fold {fold} val"
        )
        panels[1].plot(epochs, [h["val_dice"] for h in history], color=line.get_color(), label=f"fold {fold}")
        panels[2].plot(epochs, [h["val_iou"] for h in history], color=line.get_color(), label=f"fold {fold}")
    for ax, title in zip(panels, ("Dice loss", "validation Dice", "validation IoU"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 with the tissue tinted and the surface (mask edge) drawn in red."""
    base = image.astype(np.float32) / 255.0
    tinted = np.where(mask[..., None], (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * TISSUE_TINT, base)
    edge = mask & ~np.roll(mask, 1, axis=0)  # first tissue pixel of each run down a column
    edge[0] = False
    tinted[edge] = (1.0, 0.1, 0.1)
    return (tinted * 255).round().astype(np.uint8)


def overlay_sheet(items: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, columns: int = 4) -> Path:
    """A grid of (title, uint8 image, bool mask) overlays, written as PNG."""
    rows = max(1, -(-len(items) // columns))
    cols = min(columns, max(1, len(items)))
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (title, image, mask) in zip(axes, items, strict=False):
        ax.imshow(overlay(image, mask))
        ax.set_title(title, fontsize=7)
    fig.savefig(path, dpi=100)
    return path
