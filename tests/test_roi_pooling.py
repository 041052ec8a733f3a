"""Structure prior and ROI attention pooling: the batched code equals the formula, looped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference import roi_pool_reference

from savlt.data.masks import MaskStore, classical_tissue_mask
from savlt.models.pooling import RoiAttentionPool
from savlt.models.roi import patches_in_boxes, roi_boxes


def naive_roi_box(mask: np.ndarray, top_fraction: float) -> tuple[float, ...]:
    """The ROI rule written out row by row, for one mask."""
    height = mask.shape[0]
    for row in range(height):
        if row >= top_fraction * height and mask[row].all():
            return (0.0, row / height, 1.0, 1.0)
    return (0.0, 0.0, 1.0, 1.0)


def test_roi_boxes_follow_the_rule_on_a_batch() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 50, 40), dtype=bool)
    surfaces = [3, 12, 30, 49, 0, 20]
    for i, top in enumerate(surfaces):
        masks[i, top:] = True
    masks[3, 49, 5] = False  # no full row at all -> fallback
    masks[5, 20, 7] = False  # a hole in the surface row: the first full row moves down to 21
    masks[4] = rng.random((50, 40)) > 0.5  # noise: no full row
    masks[4, 2:] = True  # full from row 2, but the ROI starts at or below 10 % (row 5)
    boxes, fallback = roi_boxes(torch.from_numpy(masks), top_fraction=0.1)
    expected = [naive_roi_box(m, 0.1) for m in masks]
    assert torch.allclose(boxes, torch.tensor(expected))
    assert fallback.tolist() == [False, False, False, True, False, False]
    assert float(boxes[0, 1]) == pytest.approx(5 / 50, abs=1e-6) and float(boxes[5, 1]) == pytest.approx(
        21 / 50, abs=1e-6
    )


def test_patches_inside_a_box_are_the_whole_ones() -> None:
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0], [0.0, 0.51, 1.0, 1.0], [0.0, 0.99, 1.0, 1.0]]
    )
    keep, empty = patches_in_boxes(boxes, grid=4)
    keep = keep.reshape(4, 4, 4)
    assert empty.tolist() == [False, False, False, True]
    assert keep[0].all()
    assert keep[1, 2:].all() and not keep[1, :2].any()  # rows 2 and 3 lie wholly below y = 0.5
    assert keep[2, 3].all() and not keep[2, :3].any()  # row 2 starts at 0.5 < 0.51: not whole
    assert keep[3].all()  # no whole patch in the box: fall back to all patches


def test_batched_pooling_equals_the_naive_loop() -> None:
    torch.manual_seed(0)
    pool = RoiAttentionPool(dim=32, heads=4)
    with torch.no_grad():
        pool.proj.weight.normal_(0, 0.2)  # leave the identity start, so proj is exercised
        pool.queries.normal_(0, 1.0)
    tokens = torch.randn(5, 16, 32)
    boxes = torch.tensor([[0, y, 1, 1] for y in (0.0, 0.25, 0.5, 0.75, 0.9)], dtype=torch.float32)
    keep, _ = patches_in_boxes(boxes, grid=4)
    fast, weights = pool(tokens, keep)
    assert torch.allclose(fast, roi_pool_reference(pool, tokens, keep), atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(5, 4))
    assert (weights[~keep[:, None, :].expand_as(weights)] == 0).all()  # nothing outside the ROI


def test_pooling_rejects_a_width_the_heads_do_not_divide() -> None:
    with pytest.raises(ValueError, match="must divide"):
        RoiAttentionPool(dim=30, heads=4)


def test_classical_mask_finds_the_tissue_below_a_tilted_surface() -> None:
    rng = np.random.default_rng(0)
    height, width = 120, 160
    surface = (30 + 0.1 * np.arange(width)).astype(int)
    rows = np.arange(height)[:, None]
    truth = rows >= surface[None, :]
    tissue = 180 * np.exp(-(rows - surface) / 60.0) * rng.gamma(4, 1 / 4, (height, width))
    image = np.where(truth, tissue, 0) + rng.normal(10, 4, (height, width))
    image = np.clip(image, 0, 255).astype(np.uint8)
    mask = classical_tissue_mask(np.repeat(image[:, :, None], 3, axis=2))
    assert mask.shape == (height, width)
    assert (mask == truth).mean() > 0.97
    box, _ = roi_boxes(torch.from_numpy(mask)[None], 0.1)
    assert box[0, 1] * height == pytest.approx(surface.max(), abs=4)


def test_mask_store_round_trips_bit_packed_masks() -> None:
    store = MaskStore()
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    store.add(Path("a.png"), mask)
    assert np.array_equal(store[Path("a.png")], mask) and len(store) == 1
