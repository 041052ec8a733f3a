"""Random fields and the size scale shared by the tissue and scanner models."""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_H, DEFAULT_W = 256, 320


def pixel_scale(height: int, width: int) -> float:
    """Pixels per default-size pixel: structure sizes scale with the image, so any size shows the same field."""
    return float(np.sqrt(height * width / (DEFAULT_H * DEFAULT_W)))


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std random field with features about `cell` (rows, cols) pixels large."""
    h, w = shape
    coarse_h = max(2, int(np.ceil(h / cell[0])) + 1)
    coarse_w = max(2, int(np.ceil(w / cell[1])) + 1)
    coarse = rng.standard_normal((coarse_h, coarse_w)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def smooth_curve(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std random 1-D curve with wiggles about `cell` samples long."""
    return smooth_field(rng, (1, n), (1.0, cell))[0]
