"""The structure prior as tensors: ROI boxes from tissue masks, and the patches inside them.

ROI rule (the published code's): the ROI is the horizontal band from the first row y >=
int(top_fraction · H) whose pixels are all tissue, down to the bottom, i.e. the box (0, y/H, 1, 1)
in normalised x0, y0, x1, y1. When no row qualifies the ROI is the whole image (the published code
crashes there). A patch is in the ROI when it lies wholly inside the box, compared with a 1e-6
tolerance (``roi.patch_rule=savlt``); the published code compares float64 values exactly and so
drops the patch row that starts exactly on the box edge at a few heights (at 224 pixels: y = 80,
144 and 160; from y = 208 on it finds no patch and stops with an error): ``published`` reproduces
that comparison. Either way a box without a whole patch falls back to every patch, and is flagged.
Everything here works on whole batches; there is no loop over samples or rows.
"""

from __future__ import annotations

import torch


def roi_boxes(masks: torch.Tensor, top_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, 4) in normalised x0, y0, x1, y1 from masks (B, H, W), and a fallback flag (B,).

    A fallback box (no all-tissue row at or below the top fraction) is the whole image.
    """
    batch, height, _ = masks.shape
    full_rows = masks.bool().all(dim=2)  # (B, H): rows that are tissue from edge to edge
    start = int(top_fraction * height)
    full_rows[:, :start] = False
    found = full_rows.any(dim=1)  # (B,)
    first = full_rows.to(torch.uint8).argmax(dim=1)  # index of the first True row (0 when none)
    y0 = torch.where(found, first.to(torch.float32) / height, torch.zeros_like(first, dtype=torch.float32))
    boxes = torch.zeros(batch, 4, dtype=torch.float32, device=masks.device)
    boxes[:, 1] = y0
    boxes[:, 2:] = 1.0
    return boxes, ~found


def patches_in_boxes(
    boxes: torch.Tensor, grid: int, rule: str = "savlt", height: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, grid*grid) bool: patches lying wholly inside each box, row-major like ViT tokens, and
    (B,) bool: the box holds no whole patch, so every patch is kept (a whole-image fallback).

    rule "savlt" compares with a 1e-6 tolerance; "published" compares as the published code does,
    exactly, in float64, the box's top y0 = row / height (the row recovered from the float32 box of
    a `height`-pixel mask) with patch edges r · (1 / grid) and (r + 1) · (1 / grid).
    """
    if rule == "published":
        step = 1.0 / grid
        index = torch.arange(grid, device=boxes.device, dtype=torch.float64)
        starts, ends = index * step, (index + 1) * step  # (g,) as the published loop computes them
        exact = boxes.double()
        exact[:, 1] = torch.round(exact[:, 1] * height) / height
        x0, y0, x1, y1 = (exact[:, i, None] for i in range(4))  # each (B, 1)
        cols = (x0 <= starts) & (ends <= x1)  # (B, g)
        rows = (y0 <= starts) & (ends <= y1)  # (B, g)
    else:
        eps = 1e-6
        edges = torch.arange(grid, device=boxes.device, dtype=torch.float32) / grid  # (g,) patch starts
        x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))  # each (B, 1)
        cols = (edges >= x0 - eps) & (edges + 1 / grid <= x1 + eps)  # (B, g)
        rows = (edges >= y0 - eps) & (edges + 1 / grid <= y1 + eps)  # (B, g)
    inside = (rows[:, :, None] & cols[:, None, :]).flatten(1)  # (B, g*g)
    empty = ~inside.any(dim=1)
    return inside | empty[:, None], empty
