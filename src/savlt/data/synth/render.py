"""One B-scan: a class's tissue seen through a center's scanner, from a random stream of its own."""

from __future__ import annotations

import zlib

import cv2
import numpy as np

from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W, pixel_scale, uniform
from savlt.data.synth.scanner import (
    base_surface,
    column_gain_db,
    degrade_optics,
    display,
    scanner_signature,
    speckle,
)
from savlt.data.synth.tissue import STYLES, Tissue, tissue_for


def image_rng(seed: int, center: str, class_index: int, index: int) -> np.random.Generator:
    """Independent stream per image, so an image never depends on what else is generated or in which order."""
    entropy = [seed, zlib.crc32(center.encode("utf-8")), class_index, index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _warp_to_image(tissue: Tissue, base: np.ndarray) -> np.ndarray:
    """Hangs the flattened reflectivity map below the base surface (column-wise fractional shift)."""
    cv = tissue.canvas
    rows = np.arange(cv.height, dtype=np.float32)[:, None]
    map_y = (rows - base[None, :] + cv.margin).astype(np.float32)
    map_x = np.broadcast_to(np.arange(cv.width, dtype=np.float32)[None, :], map_y.shape).copy()
    return cv2.remap(tissue.reflectivity.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderValue=0.0)


def render_bscan(
    center: str, class_name: str, rng: np.random.Generator, size: tuple[int, int] = (DEFAULT_H, DEFAULT_W)
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic B-scan of `class_name` seen by `center`'s scanner: (image in [0, 1], tissue mask bool).

    The tissue's reflectivity is hung below a tilted, curved surface, attenuated exponentially with depth and
    given the column gain, speckle, optics and display of the scanner."""
    height, width = size
    sig, style = scanner_signature(center), STYLES[class_name]
    tissue = tissue_for(style, rng, height, width)
    base = base_surface(rng, sig, style.curvature, tissue.canvas.relief, height)
    surface = base - tissue.canvas.relief
    depth = np.arange(height, dtype=np.float32)[:, None] - surface[None, :]
    mask = depth >= 0.0

    reflectivity = _warp_to_image(tissue, base)
    line_width = uniform(rng, 0.8, 2.0) * pixel_scale(height, width)
    surface_line = uniform(rng, 0.5, 1.0) * np.exp(-np.maximum(depth, 0.0) / line_width)
    reflectivity = np.maximum(reflectivity, surface_line)
    attenuation_db = uniform(rng, 20.0, 34.0) * sig.attenuation * style.attenuation / height
    signal_db = (
        10.0 * np.log10(reflectivity + 1e-4)
        - attenuation_db * np.maximum(depth, 0.0)
        + column_gain_db(rng, sig, width, pixel_scale(height, width))[None, :]
        + uniform(rng, -2.5, 2.5)
    )
    intensity = degrade_optics(10.0 ** (signal_db / 10.0) * speckle(rng, size, sig), sig) * mask
    return display(rng, intensity, sig).astype(np.float32), mask
