"""One B-scan: a class's tissue seen through a center's scanner, from a random stream of its own; and
the B-scans of one patient: one tissue scene, seen as neighbouring B-scans of a volume are (the same
structure, position, tilt and speckle, each slightly moved, deformed and re-speckled)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import cv2
import numpy as np

from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W, pixel_scale, smooth_field, uniform
from savlt.data.synth.scanner import (
    ScannerSignature,
    base_surface,
    column_gain_db,
    degrade_optics,
    display,
    scanner_signature,
    speckle,
    speckle_from,
)
from savlt.data.synth.tissue import STYLES, Tissue, tissue_for


def image_rng(seed: int, center: str, class_index: int, index: int) -> np.random.Generator:
    """Independent stream per image, so an image never depends on what else is generated or in which order."""
    entropy = [seed, zlib.crc32(center.encode("utf-8")), class_index, index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def patient_rng(seed: int, center: str, class_index: int, patient: int) -> np.random.Generator:
    """The stream of one patient's tissue, independent of every image's own stream."""
    entropy = [seed, zlib.crc32(center.encode("utf-8")), class_index, patient]
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(1,)))


def _warp_to_image(tissue: Tissue, base: np.ndarray) -> np.ndarray:
    """Hangs the flattened reflectivity map below the base surface (column-wise fractional shift)."""
    cv = tissue.canvas
    rows = np.arange(cv.height, dtype=np.float32)[:, None]
    map_y = (rows - base[None, :] + cv.margin).astype(np.float32)
    map_x = np.broadcast_to(np.arange(cv.width, dtype=np.float32)[None, :], map_y.shape).copy()
    return cv2.remap(tissue.reflectivity.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderValue=0.0)


@dataclass(frozen=True)
class Scene:
    """A class's tissue under a center's scanner before the image is formed (what the B-scans of one
    patient share)."""

    reflectivity: np.ndarray  # (H, W) linear reflectivity, the surface line included
    depth: np.ndarray  # (H, W) depth below the tissue surface in pixels, negative in the air
    attenuation_db: float  # attenuation per pixel of depth
    gain_db: np.ndarray  # (W,) per-A-scan gain: scanner jitter and shadows
    offset_db: float


def tissue_scene(
    center: str, class_name: str, rng: np.random.Generator, size: tuple[int, int] = (DEFAULT_H, DEFAULT_W)
) -> Scene:
    """The tissue of `class_name` hung below a tilted, curved surface under `center`'s scanner."""
    height, width = size
    sig, style = scanner_signature(center), STYLES[class_name]
    tissue = tissue_for(style, rng, height, width)
    base = base_surface(rng, sig, style.curvature, tissue.canvas.relief, height)
    surface = base - tissue.canvas.relief
    depth = np.arange(height, dtype=np.float32)[:, None] - surface[None, :]
    reflectivity = _warp_to_image(tissue, base)
    line_width = uniform(rng, 0.8, 2.0) * pixel_scale(height, width)
    surface_line = uniform(rng, 0.5, 1.0) * np.exp(-np.maximum(depth, 0.0) / line_width)
    reflectivity = np.maximum(reflectivity, surface_line)
    attenuation_db = uniform(rng, 20.0, 34.0) * sig.attenuation * style.attenuation / height
    gain_db = column_gain_db(rng, sig, width, pixel_scale(height, width))
    return Scene(reflectivity, depth, attenuation_db, gain_db, uniform(rng, -2.5, 2.5))


def form_image(
    scene: Scene, sig: ScannerSignature, speckle_field: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The B-scan of a scene: attenuated with depth, given the column gain and the speckle, blurred and
    resampled by the optics, then the noise floor and the log-compressed display. (image, tissue mask)."""
    mask = scene.depth >= 0.0
    signal_db = (
        10.0 * np.log10(scene.reflectivity + 1e-4)
        - scene.attenuation_db * np.maximum(scene.depth, 0.0)
        + scene.gain_db[None, :]
        + scene.offset_db
    )
    intensity = degrade_optics(10.0 ** (signal_db / 10.0) * speckle_field, sig) * mask
    return display(rng, intensity, sig).astype(np.float32), mask


def render_bscan(
    center: str, class_name: str, rng: np.random.Generator, size: tuple[int, int] = (DEFAULT_H, DEFAULT_W)
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic B-scan of `class_name` seen by `center`'s scanner: (image in [0, 1], tissue mask bool).

    The tissue's reflectivity is hung below a tilted, curved surface, attenuated exponentially with depth and
    given the column gain, speckle, optics and display of the scanner."""
    sig = scanner_signature(center)
    scene = tissue_scene(center, class_name, rng, size)
    return form_image(scene, sig, speckle(rng, size, sig), rng)


# How far apart neighbouring B-scans of one patient are: shift (fraction of the width / height),
# rotation (radians), smooth deformation (default-size pixels), gain and offset changes (dB), and the
# share of the speckle field they have in common (correlation).
NEIGHBOUR_SHIFT = (0.02, 0.015)
NEIGHBOUR_TILT = 0.01
NEIGHBOUR_WARP = 1.5
NEIGHBOUR_GAIN_DB = (0.5, 0.5)
SHARED_SPECKLE = 0.7


def _neighbour_maps(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of a neighbouring B-scan comes from: a small shift and rotation about the centre
    plus a smooth deformation (cv2.remap maps)."""
    height, width = size
    px = pixel_scale(height, width)
    dx = uniform(rng, -1.0, 1.0) * NEIGHBOUR_SHIFT[0] * width
    dy = uniform(rng, -1.0, 1.0) * NEIGHBOUR_SHIFT[1] * height
    angle = uniform(rng, -1.0, 1.0) * NEIGHBOUR_TILT
    cell = (height / 2.0, width / 3.0)
    warp_x, warp_y = (NEIGHBOUR_WARP * px * smooth_field(rng, size, cell) for _ in range(2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    u, v = xs - cx - dx, ys - cy - dy
    cos, sin = math.cos(angle), math.sin(angle)
    map_x = (cos * u + sin * v + cx + warp_x).astype(np.float32)
    map_y = (-sin * u + cos * v + cy + warp_y).astype(np.float32)
    return map_x, map_y


def _remap(values: np.ndarray, maps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return cv2.remap(values.astype(np.float32), *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def patient_bscans(
    center: str,
    class_name: str,
    patient: np.random.Generator,
    scans: list[np.random.Generator],
    size: tuple[int, int] = (DEFAULT_H, DEFAULT_W),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The B-scans of one patient (one per stream in `scans`): one tissue scene and speckle pattern from
    the `patient` stream, each B-scan slightly shifted, rotated and deformed, with its own gain wobble,
    part of its speckle and its own detector noise, as neighbouring B-scans of a volume are."""
    sig = scanner_signature(center)
    scene = tissue_scene(center, class_name, patient, size)
    shared = patient.standard_normal((2, *size)).astype(np.float32)
    own = math.sqrt(1.0 - SHARED_SPECKLE**2)
    columns = np.arange(size[1], dtype=np.float32)
    for rng in scans:
        maps = _neighbour_maps(rng, size)
        shift = float(maps[0][size[0] // 2].mean() - columns.mean())
        moved = replace(
            scene,
            reflectivity=_remap(scene.reflectivity, maps),
            depth=_remap(scene.depth, maps),
            gain_db=np.interp(columns + shift, columns, scene.gain_db).astype(np.float32)
            + NEIGHBOUR_GAIN_DB[0] * sig.column_jitter_db * rng.standard_normal(size[1]).astype(np.float32),
            offset_db=scene.offset_db + uniform(rng, -1.0, 1.0) * NEIGHBOUR_GAIN_DB[1],
        )
        field = SHARED_SPECKLE * np.stack([_remap(f, maps) for f in shared]) + own * rng.standard_normal(
            (2, *size)
        ).astype(np.float32)
        yield form_image(moved, sig, speckle_from(field, sig), rng)
