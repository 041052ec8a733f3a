"""Synthetic multi-center cervical OCT B-scans, so the pipeline can be run and tested without patient data.

Every image is rendered the way an OCT B-scan is formed: a reflectivity map of the tissue (carrying the
structure the class description names) is hung below a tilted, curved tissue surface, attenuated
exponentially with depth, multiplied by correlated speckle, blurred by the scanner's optics, buried in a
noise floor and log-compressed for display. Each center is a different "scanner": its own gain, display
dynamic range and gamma, speckle strength and grain, resolution, noise floor, surface tilt, air band and
file format, so a model trained on one center meets a real domain shift on the others.

File formats per center: ``mixed`` writes 8-bit PNG, ``xiangya`` 16-bit grayscale TIFF (uint16 using only
part of the range, roughly 600..40000, so readers must rescale by the image's own range), ``huaxi`` 8-bit
JPEG (quality 90); any other center name writes 8-bit PNG with a scanner signature derived from
``zlib.crc32`` of its name. Masks are always 8-bit PNG, 255 at and below the tissue surface, 0 in the air.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from savlt.data.classes import DEFAULT_CLASSES

DEFAULT_H, DEFAULT_W = 256, 320
MIN_SIZE = 64
MAX_SIZE = 4096
DEFAULT_CENTERS: tuple[str, ...] = ("mixed", "xiangya", "huaxi")

# Short class names used in file names and on the contact sheet.
CLASS_SHORT_NAMES: dict[str, str] = {
    "mild_inflammation": "inflam",
    "cyst": "cyst",
    "ectropion": "ectropion",
    "high-grade_squamous_intraepithelial_lesion": "hsil",
    "cancer": "cancer",
}

_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_CENTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UINT16_PEDESTAL, _UINT16_PEAK = 600, 40000
_JPEG_QUALITY = 90
_PREVIEW_EXAMPLES = 3
_PREVIEW_THUMB_H = 120


@dataclass(frozen=True)
class ScannerSignature:
    """How one center's scanner turns tissue into pixels (the source of the domain shift)."""

    gain_db: float
    dynamic_range_db: float
    gamma: float
    speckle_contrast: float  # exponent on the speckle field: larger = grainier
    speckle_grain: tuple[float, float]  # speckle correlation sigma (rows, cols), default-size pixels
    psf_sigma: float  # optical blur, default-size pixels
    resolution: float  # render scale before upsampling (1 = native)
    noise_floor_db: float
    attenuation: float  # multiplier of the depth attenuation
    tilt_max: float  # largest |slope| of the tissue surface, rows per column
    air_band: tuple[float, float]  # range of the minimum air depth, fraction of the height
    column_jitter_db: float  # A-scan to A-scan gain wobble (vertical stripes)
    file_format: str  # "png", "tif16" or "jpg"

    @property
    def suffix(self) -> str:
        return {"png": ".png", "tif16": ".tif", "jpg": ".jpg"}[self.file_format]


_KNOWN_SIGNATURES: dict[str, ScannerSignature] = {
    "mixed": ScannerSignature(
        gain_db=-3.0,
        dynamic_range_db=34.0,
        gamma=1.0,
        speckle_contrast=0.75,
        speckle_grain=(0.9, 1.6),
        psf_sigma=0.5,
        resolution=1.0,
        noise_floor_db=-31.0,
        attenuation=1.0,
        tilt_max=0.12,
        air_band=(0.06, 0.22),
        column_jitter_db=0.4,
        file_format="png",
    ),
    "xiangya": ScannerSignature(
        gain_db=-1.0,
        dynamic_range_db=29.0,
        gamma=0.8,
        speckle_contrast=0.8,
        speckle_grain=(0.7, 1.1),
        psf_sigma=1.0,
        resolution=0.6,
        noise_floor_db=-27.0,
        attenuation=0.85,
        tilt_max=0.22,
        air_band=(0.04, 0.16),
        column_jitter_db=0.2,
        file_format="tif16",
    ),
    "huaxi": ScannerSignature(
        gain_db=-5.0,
        dynamic_range_db=40.0,
        gamma=1.3,
        speckle_contrast=0.9,
        speckle_grain=(1.2, 1.9),
        psf_sigma=0.3,
        resolution=0.8,
        noise_floor_db=-34.0,
        attenuation=1.2,
        tilt_max=0.07,
        air_band=(0.12, 0.30),
        column_jitter_db=1.0,
        file_format="jpg",
    ),
}


def scanner_signature(center: str) -> ScannerSignature:
    """The hand-tuned signature of a known center, or one derived from crc32 of the name (stable across runs)."""
    if center in _KNOWN_SIGNATURES:
        return _KNOWN_SIGNATURES[center]
    rng = np.random.default_rng(zlib.crc32(center.encode("utf-8")))

    def between(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    low = between(0.03, 0.14)
    return ScannerSignature(
        gain_db=between(-3.0, 3.0),
        dynamic_range_db=between(28.0, 42.0),
        gamma=between(0.75, 1.35),
        speckle_contrast=between(0.5, 1.0),
        speckle_grain=(between(0.6, 1.4), between(1.0, 2.6)),
        psf_sigma=between(0.2, 1.1),
        resolution=between(0.55, 1.0),
        noise_floor_db=between(-37.0, -26.0),
        attenuation=between(0.8, 1.25),
        tilt_max=between(0.05, 0.24),
        air_band=(low, low + between(0.08, 0.18)),
        column_jitter_db=between(0.1, 1.1),
        file_format="png",
    )


# ---------------------------------------------------------------------------------------------------------
# Random-field helpers


def pixel_scale(height: int, width: int) -> float:
    """Pixels per default-size pixel: structure sizes scale with the image, so any size shows the same field."""
    return float(np.sqrt(height * width / (DEFAULT_H * DEFAULT_W)))


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std random field with features about `cell` (rows, cols) pixels large."""
    h, w = shape
    coarse_h = max(2, int(np.ceil(h / cell[0])) + 1)
    coarse_w = max(2, int(np.ceil(w / cell[1])) + 1)
    coarse = rng.standard_normal((coarse_h, coarse_w)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _smooth_curve(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std random 1-D curve with wiggles about `cell` samples long."""
    return _smooth_field(rng, (1, n), (1.0, cell))[0]


def _smoothstep(x: np.ndarray, width: float) -> np.ndarray:
    s = np.clip(x / width, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def _filled_ellipses(
    shape: tuple[int, int], ellipses: Sequence[tuple[float, float, float, float, float]]
) -> np.ndarray:
    """Anti-aliased union of filled ellipses (cx, cy, half-width, half-height, angle in degrees), in [0, 1]."""
    layer = np.zeros(shape, np.float32)
    scale = 16  # cv2 fixed-point shift of 4 bits -> sub-pixel centres and axes
    for cx, cy, ax, ay, angle in ellipses:
        centre = (round(cx * scale), round(cy * scale))
        axes = (max(1, round(ax * scale)), max(1, round(ay * scale)))
        cv2.ellipse(layer, centre, axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA, 4)
    return layer


# ---------------------------------------------------------------------------------------------------------
# Tissue: reflectivity maps in "flattened" coordinates (row = depth below a smooth base surface)


@dataclass(frozen=True)
class _Canvas:
    """Flattened tissue frame: canvas row `margin` is the smooth base surface, `relief` rises above it."""

    height: int  # height of the output image
    width: int
    relief: np.ndarray  # (W,) protrusion of the real surface above the base surface, >= 0
    margin: int
    depth: np.ndarray  # (rows, W) depth below the real (relief) surface, pixels

    @classmethod
    def for_relief(cls, relief: np.ndarray, height: int) -> _Canvas:
        margin = int(np.ceil(relief.max())) + 2
        rows = np.arange(height + margin, dtype=np.float32)[:, None] - margin
        depth = rows + relief[None, :].astype(np.float32)
        return cls(height, relief.size, relief.astype(np.float32), margin, depth)

    @property
    def px(self) -> float:
        return pixel_scale(self.height, self.width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.depth.shape


@dataclass(frozen=True)
class _Tissue:
    canvas: _Canvas
    reflectivity: np.ndarray  # same shape as canvas.depth, linear, (0, 1]


def _epithelium_thickness(rng: np.random.Generator, cv: _Canvas, lo: float, hi: float) -> np.ndarray:
    """Epithelium thickness per column, a fraction lo..hi of the image height, gently varying."""
    mean = _uniform(rng, lo, hi) * cv.height
    wobble = _uniform(rng, 0.05, 0.2) * _smooth_curve(rng, cv.width, cv.width / 3)
    return (mean * (1.0 + wobble)).astype(np.float32)


def _texture(rng: np.random.Generator, cv: _Canvas, cell: tuple[float, float], strength: float) -> np.ndarray:
    """Positive multiplicative tissue texture around 1 (clipped so it never punches black holes)."""
    return np.maximum(1.0 + strength * _smooth_field(rng, cv.shape, cell), 0.25)


def _two_layers(
    rng: np.random.Generator, cv: _Canvas, thickness: np.ndarray, contrast: float, boundary_width: float
) -> np.ndarray:
    """Gray epithelium over a whiter, horizontally textured stroma, meeting at `thickness`."""
    r_epi = _uniform(rng, 0.03, 0.08)
    r_stroma = min(0.9, r_epi * contrast)
    epi_texture = _texture(rng, cv, (2.5 * cv.px, 12.0 * cv.px), _uniform(rng, 0.1, 0.3))
    stroma_texture = _texture(rng, cv, (3.0 * cv.px, 14.0 * cv.px), _uniform(rng, 0.2, 0.4))
    step = _sigmoid((cv.depth - thickness[None, :]) / (boundary_width * cv.px))
    return r_epi * (1.0 - step) * epi_texture + r_stroma * step * stroma_texture


def _curved_bands(
    rng: np.random.Generator, cv: _Canvas, top: np.ndarray, count: int, bend: float, strength: float
) -> np.ndarray:
    """Multiplicative darker bands below `top`, bending by about `bend` (default-size) pixels: sub-layers."""
    factor = np.ones(cv.shape, np.float32)
    for _ in range(count):
        centre = top + _uniform(rng, 12.0 * cv.px, 0.4 * cv.height)
        centre = centre + bend * cv.px * _smooth_curve(rng, cv.width, cv.width / _uniform(rng, 1.0, 2.5))
        half = _uniform(rng, 3.0, 8.0) * cv.px
        band = np.exp(-(((cv.depth - centre[None, :]) / half) ** 2))
        factor *= 1.0 - _uniform(rng, 0.35, 0.7) * strength * band
    return factor


def _tissue_inflammation(rng: np.random.Generator, height: int, width: int) -> _Tissue:
    """Distinct layers: a gray epithelium, a sharp boundary, a white stroma with gray sub-bands."""
    cv = _Canvas.for_relief(np.zeros(width, np.float32), height)
    thickness = _epithelium_thickness(rng, cv, 0.07, 0.17)
    r = _two_layers(rng, cv, thickness, _uniform(rng, 5.0, 12.0), _uniform(rng, 0.7, 2.0))
    r *= _curved_bands(rng, cv, thickness, int(rng.integers(1, 3)), _uniform(rng, 1.0, 4.0), 1.0)
    return _Tissue(cv, r)


def _cyst_ellipses(
    rng: np.random.Generator, cv: _Canvas, thickness: np.ndarray
) -> list[tuple[float, float, float, float, float]]:
    count = int(rng.choice([1, 1, 2, 2, 3, 4]))
    ellipses = []
    for _ in range(count):
        cx = _uniform(rng, 0.08, 0.92) * cv.width
        half_w = _uniform(rng, 0.05, 0.15) * cv.width
        half_h = half_w * _uniform(rng, 0.35, 0.7)
        top = float(thickness[int(np.clip(cx, 0, cv.width - 1))]) + 4.0 * cv.px
        cy = cv.margin + top + half_h + _uniform(rng, 0.0, 0.4 * cv.height)
        ellipses.append((cx, cy, half_w, half_h, _uniform(rng, -15.0, 15.0)))
    return ellipses


def _tissue_cyst(rng: np.random.Generator, height: int, width: int) -> _Tissue:
    """Smooth curved layers holding one or more oval, hypo-reflective (fluid) areas."""
    cv = _Canvas.for_relief(np.zeros(width, np.float32), height)
    thickness = _epithelium_thickness(rng, cv, 0.06, 0.14)
    r = _two_layers(rng, cv, thickness, _uniform(rng, 3.0, 8.0), _uniform(rng, 1.0, 3.0))
    r *= _curved_bands(rng, cv, thickness, int(rng.integers(1, 4)), _uniform(rng, 3.0, 12.0), 0.8)
    cyst = cv2.GaussianBlur(_filled_ellipses(cv.shape, _cyst_ellipses(rng, cv, thickness)), (0, 0), cv.px)
    # Fluid attenuates less than tissue, so the tissue just under a cyst looks brighter.
    below = np.maximum.accumulate(cyst, axis=0) - cyst
    r *= 1.0 + _uniform(rng, 0.1, 0.6) * below
    r_fluid = _uniform(rng, 0.004, 0.03)
    return _Tissue(cv, r * (1.0 - cyst) + r_fluid * cyst)


@dataclass(frozen=True)
class _Papilla:
    centre: float
    width: float
    height: float


def _papillae(rng: np.random.Generator, width: int, height: int) -> list[_Papilla]:
    """A continuous row of rounded finger-like protrusions along (most of) the surface."""
    scale = _uniform(rng, 0.7, 1.3) * pixel_scale(height, width)
    tallest = _uniform(rng, 0.04, 0.12) * height
    start, stop = -10.0 * scale, width + 10.0 * scale
    if rng.random() < 0.25:  # sometimes the papillary zone covers only part of the scan
        covered = _uniform(rng, 0.55, 0.9) * width
        start = _uniform(rng, 0.0, width - covered)
        stop = start + covered
    papillae, x = [], start - _uniform(rng, 0.0, 12.0) * scale
    while x < stop:
        w = _uniform(rng, 12.0, 26.0) * scale
        papillae.append(_Papilla(x + w / 2, w, tallest * _uniform(rng, 0.4, 1.0)))
        x += w * _uniform(rng, 0.85, 1.1)
    return papillae


def _papilla_relief(papillae: Sequence[_Papilla], width: int) -> np.ndarray:
    x = np.arange(width, dtype=np.float32)
    relief = np.zeros(width, np.float32)
    for p in papillae:
        u = np.clip(1.0 - (2.0 * (x - p.centre) / p.width) ** 2, 0.0, 1.0)
        relief = np.maximum(relief, p.height * u**0.45)
    return relief


def _tissue_ectropion(rng: np.random.Generator, height: int, width: int) -> _Tissue:
    """Columnar epithelium folded into papillae: bright rims and dark cores along the upper region."""
    papillae = _papillae(rng, width, height)
    cv = _Canvas.for_relief(_papilla_relief(papillae, width), height)
    r_stroma = _uniform(rng, 0.18, 0.45)
    r = r_stroma * _texture(rng, cv, (4.0 * cv.px, 8.0 * cv.px), _uniform(rng, 0.2, 0.4))
    r += _uniform(rng, 0.3, 0.8) * np.exp(-np.maximum(cv.depth, 0.0) / (_uniform(rng, 2.0, 4.0) * cv.px))
    core_depth = _uniform(rng, 4.0 * cv.px, 0.1 * height)
    cores = []
    for p in papillae:
        top = -0.8 * p.height
        bottom = core_depth * _uniform(rng, 0.6, 1.4)
        cy = cv.margin + (top + bottom) / 2
        cores.append((p.centre, cy, p.width * _uniform(rng, 0.25, 0.36), (bottom - top) / 2, 0.0))
    core = cv2.GaussianBlur(_filled_ellipses(cv.shape, cores), (0, 0), cv.px)
    r *= 1.0 - _uniform(rng, 0.7, 0.92) * core
    return _Tissue(cv, r)


def _icicle_layer(rng: np.random.Generator, cv: _Canvas, thickness: np.ndarray) -> np.ndarray:
    """Densely packed, tapering bright streaks that hang down from the epithelium, fading with length."""
    layer = np.zeros(cv.shape, np.float32)
    spacing = _uniform(rng, 4.0, 9.0) * cv.px
    mean_length = _uniform(rng, 0.12, 0.32) * cv.height
    scale = 16
    for x in np.arange(-4.0 * cv.px, cv.width + 4.0 * cv.px, spacing):
        c = x + _uniform(rng, -0.3, 0.3) * spacing
        top = cv.margin + float(thickness[int(np.clip(c, 0, cv.width - 1))]) * _uniform(rng, 0.1, 0.7)
        length = mean_length * _uniform(rng, 0.5, 1.5)
        half = _uniform(rng, 1.0, 2.6) * cv.px
        lean = _uniform(rng, -0.12, 0.12) * length
        brightness = _uniform(rng, 0.5, 1.0)
        for t0, fade in ((0.0, 1.0), (1 / 3, 0.7), (2 / 3, 0.4)):
            t1 = t0 + 1 / 3
            w0, w1 = half * (1 - 0.85 * t0), half * (1 - 0.85 * t1)
            x0, x1 = c + lean * t0, c + lean * t1
            y0, y1 = top + length * t0, top + length * t1
            quad = np.array([[x0 - w0, y0], [x0 + w0, y0], [x1 + w1, y1], [x1 - w1, y1]]) * scale
            cv2.fillConvexPoly(layer, np.round(quad).astype(np.int32), brightness * fade, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(layer, (0, 0), 0.7 * cv.px)


def _tissue_hsil(rng: np.random.Generator, height: int, width: int) -> _Tissue:
    """Thickened epithelium with a blurred boundary, crowded by dense icicle-like bright streaks."""
    cv = _Canvas.for_relief(np.zeros(width, np.float32), height)
    thickness = _epithelium_thickness(rng, cv, 0.12, 0.26)
    r = _two_layers(rng, cv, thickness, _uniform(rng, 1.5, 4.0), _uniform(rng, 3.0, 8.0))
    icicles = _icicle_layer(rng, cv, thickness)
    # Between the streaks the tissue is darker, which is what makes them read as "icicles".
    zone = cv2.GaussianBlur(icicles, (0, 0), sigmaX=6.0 * cv.px, sigmaY=3.0 * cv.px)
    zone /= zone.max() + 1e-6
    r *= 1.0 - _uniform(rng, 0.3, 0.7) * zone
    return _Tissue(cv, r + _uniform(rng, 0.2, 0.6) * icicles)


def _tissue_cancer(rng: np.random.Generator, height: int, width: int) -> _Tissue:
    """No layering: a heterogeneous mass with irregular bright tumour nests and dark necrotic areas."""
    px = pixel_scale(height, width)
    relief = _smooth_curve(rng, width, _uniform(rng, 15.0, 40.0) * px) * _uniform(rng, 1.0, 4.0) * px
    cv = _Canvas.for_relief(relief - relief.min(), height)
    r = _uniform(rng, 0.08, 0.2) * _texture(rng, cv, (6.0 * px, 8.0 * px), 0.3)
    r += (
        _uniform(rng, 0.3, 0.9)
        * _irregular_blobs(rng, cv, _uniform(rng, 6.0, 12.0) * px, 0.68, 0.86)
        * _texture(rng, cv, (2.0 * px, 2.0 * px), 0.3)
    )
    necrosis = _irregular_blobs(rng, cv, _uniform(rng, 16.0, 30.0) * px, 0.8, 0.92)
    necrosis *= _smoothstep(cv.depth - _uniform(rng, 5.0, 20.0) * px, 8.0 * px)
    r *= 1.0 - necrosis * _uniform(rng, 0.8, 0.97)
    if rng.random() < 0.3:  # a remnant of normal layering at one side of the scan
        r *= _layer_remnant(rng, cv)
    return _Tissue(cv, r)


def _irregular_blobs(
    rng: np.random.Generator, cv: _Canvas, cell: float, q_lo: float, q_hi: float
) -> np.ndarray:
    """Soft-edged irregular blobs covering roughly 1-q of the canvas (q drawn from q_lo..q_hi), in [0, 1]."""
    field = _smooth_field(rng, cv.shape, (cell, cell * _uniform(rng, 0.8, 1.8)))
    return _smoothstep(field - np.quantile(field, _uniform(rng, q_lo, q_hi)), 0.35)


def _layer_remnant(rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
    """Darkens an epithelium-like band over one side of the scan (multiplicative factor)."""
    thickness = _epithelium_thickness(rng, cv, 0.06, 0.12)
    split = _uniform(rng, 0.2, 0.5) * cv.width
    x = np.arange(cv.width, dtype=np.float32)
    edge = 6.0 * cv.px
    side = _sigmoid((split - x) / edge) if rng.random() < 0.5 else _sigmoid((x - (cv.width - split)) / edge)
    band = 1.0 - _sigmoid((cv.depth - thickness[None, :]) / (1.5 * cv.px))
    return 1.0 - _uniform(rng, 0.4, 0.7) * band * side[None, :]


def _add_vessels(rng: np.random.Generator, tissue: _Tissue) -> np.ndarray:
    """A few small dark vessels in any class, so a single dark oval alone does not mean 'cyst'."""
    cv = tissue.canvas
    vessels = []
    for _ in range(int(rng.poisson(0.8))):
        cy = cv.margin + _uniform(rng, 20.0 * cv.px, 0.7 * cv.height)
        half_w, half_h = _uniform(rng, 2.0, 6.0) * cv.px, _uniform(rng, 1.5, 4.0) * cv.px
        vessels.append((_uniform(rng, 0, cv.width), cy, half_w, half_h, 0.0))
    if not vessels:
        return tissue.reflectivity
    layer = cv2.GaussianBlur(_filled_ellipses(cv.shape, vessels), (0, 0), 0.8 * cv.px)
    return tissue.reflectivity * (1.0 - _uniform(rng, 0.4, 0.8) * layer)


@dataclass(frozen=True)
class _ClassStyle:
    tissue: Callable[[np.random.Generator, int, int], _Tissue]
    curvature: float  # scale of the surface curvature
    attenuation: float  # scale of the depth attenuation


_STYLES: dict[str, _ClassStyle] = {
    "mild_inflammation": _ClassStyle(_tissue_inflammation, 1.0, 1.0),
    "cyst": _ClassStyle(_tissue_cyst, 1.8, 0.95),
    "ectropion": _ClassStyle(_tissue_ectropion, 1.0, 1.05),
    "high-grade_squamous_intraepithelial_lesion": _ClassStyle(_tissue_hsil, 1.0, 1.1),
    "cancer": _ClassStyle(_tissue_cancer, 1.2, 1.25),
}


# ---------------------------------------------------------------------------------------------------------
# Scanner: surface geometry, attenuation, speckle, optics, noise, display


def _base_surface(
    rng: np.random.Generator, sig: ScannerSignature, curvature: float, relief: np.ndarray, height: int
) -> np.ndarray:
    """Row of the smooth base surface per column: tilted, curved, gently wavy, below the air band."""
    width = relief.size
    xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / width
    tilt = _uniform(rng, -1.0, 1.0) * sig.tilt_max * width
    bow = _uniform(rng, -0.04, 0.1) * curvature * height
    wave = _uniform(rng, 0.0, 0.02) * height * _smooth_curve(rng, width, width / _uniform(rng, 2.0, 5.0))
    shape = tilt * xs + 4.0 * bow * xs**2 + wave
    shape -= shape.min()
    limit = 0.3 * height
    if shape.max() > limit:
        shape *= limit / shape.max()
    air = max(2.0, _uniform(rng, *sig.air_band) * height)
    return air + float(relief.max()) + shape


def _warp_to_image(tissue: _Tissue, base: np.ndarray) -> np.ndarray:
    """Hangs the flattened reflectivity map below the base surface (column-wise fractional shift)."""
    cv = tissue.canvas
    rows = np.arange(cv.height, dtype=np.float32)[:, None]
    map_y = (rows - base[None, :] + cv.margin).astype(np.float32)
    map_x = np.broadcast_to(np.arange(cv.width, dtype=np.float32)[None, :], map_y.shape).copy()
    return cv2.remap(tissue.reflectivity.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderValue=0.0)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], grain: tuple[float, float]) -> np.ndarray:
    """Fully developed speckle: |filtered complex Gaussian|^2, exponentially distributed, mean 1."""
    field = rng.standard_normal((2, *shape)).astype(np.float32)
    px = pixel_scale(*shape)
    sigma_x, sigma_y = grain[1] * px, grain[0] * px
    re = cv2.GaussianBlur(field[0], (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    im = cv2.GaussianBlur(field[1], (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    intensity = re * re + im * im
    return intensity / intensity.mean()


def _column_gain_db(rng: np.random.Generator, sig: ScannerSignature, width: int, px: float) -> np.ndarray:
    """Per-A-scan gain: scanner jitter plus occasional shadows cast by mucus or debris on the surface."""
    gain = sig.column_jitter_db * rng.standard_normal(width).astype(np.float32)
    x = np.arange(width, dtype=np.float32)
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 3))):
            centre, half = _uniform(rng, 0, width), _uniform(rng, 1.0, 5.0) * px
            gain -= _uniform(rng, 3.0, 8.0) * np.exp(-(((x - centre) / half) ** 2))
    return gain


def _degrade_optics(intensity: np.ndarray, sig: ScannerSignature) -> np.ndarray:
    """Optical blur, then the scanner's coarser sampling (render small, upsample)."""
    height, width = intensity.shape
    sigma = sig.psf_sigma * pixel_scale(height, width)
    out = cv2.GaussianBlur(intensity, (0, 0), sigma) if sigma > 0 else intensity
    if sig.resolution < 1.0:
        small = (max(8, round(width * sig.resolution)), max(8, round(height * sig.resolution)))
        out = cv2.resize(out, small, interpolation=cv2.INTER_AREA)
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def _tissue_for(style: _ClassStyle, rng: np.random.Generator, height: int, width: int) -> _Tissue:
    """The class's tissue plus the structures every class shares (vessels), clipped to valid reflectivity."""
    tissue = style.tissue(rng, height, width)
    return _Tissue(tissue.canvas, np.clip(_add_vessels(rng, tissue), 1e-3, 1.0).astype(np.float32))


def render_bscan(
    center: str, class_name: str, rng: np.random.Generator, size: tuple[int, int] = (DEFAULT_H, DEFAULT_W)
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic B-scan of `class_name` seen by `center`'s scanner: (image in [0, 1], tissue mask bool)."""
    height, width = size
    sig, style = scanner_signature(center), _STYLES[class_name]
    tissue = _tissue_for(style, rng, height, width)
    base = _base_surface(rng, sig, style.curvature, tissue.canvas.relief, height)
    surface = base - tissue.canvas.relief
    depth = np.arange(height, dtype=np.float32)[:, None] - surface[None, :]
    mask = depth >= 0.0

    reflectivity = _warp_to_image(tissue, base)
    line_width = _uniform(rng, 0.8, 2.0) * pixel_scale(height, width)
    surface_line = _uniform(rng, 0.5, 1.0) * np.exp(-np.maximum(depth, 0.0) / line_width)
    reflectivity = np.maximum(reflectivity, surface_line)
    attenuation_db = _uniform(rng, 20.0, 34.0) * sig.attenuation * style.attenuation / height
    signal_db = (
        10.0 * np.log10(reflectivity + 1e-4)
        - attenuation_db * np.maximum(depth, 0.0)
        + _column_gain_db(rng, sig, width, pixel_scale(height, width))[None, :]
        + _uniform(rng, -2.5, 2.5)
    )
    speckle = _speckle(rng, size, sig.speckle_grain) ** sig.speckle_contrast
    intensity = _degrade_optics(10.0 ** (signal_db / 10.0) * speckle, sig) * mask
    noise = 10.0 ** (sig.noise_floor_db / 10.0) * rng.exponential(1.0, size).astype(np.float32)
    display_db = 10.0 * np.log10(intensity + noise) + sig.gain_db
    image = np.clip((display_db + sig.dynamic_range_db) / sig.dynamic_range_db, 0.0, 1.0) ** sig.gamma
    return image.astype(np.float32), mask


# ---------------------------------------------------------------------------------------------------------
# Files


def image_rng(seed: int, center: str, class_index: int, index: int) -> np.random.Generator:
    """Independent stream per image, so an image never depends on what else is generated or in which order."""
    entropy = [seed, zlib.crc32(center.encode("utf-8")), class_index, index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _file_pixels(image: np.ndarray, sig: ScannerSignature) -> np.ndarray:
    if sig.file_format == "tif16":
        span = _UINT16_PEAK - _UINT16_PEDESTAL
        return np.round(_UINT16_PEDESTAL + image * span).astype(np.uint16)
    return np.round(image * 255.0).astype(np.uint8)


def _write_pixels(path: Path, pixels: np.ndarray, file_format: str) -> None:
    """PNG/JPEG are encoded in memory because cv2.imwrite cannot open non-ASCII paths on every platform."""
    if file_format == "tif16":
        tifffile.imwrite(path, pixels, photometric="minisblack")
        return
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if file_format == "jpg" else []
    ok, encoded = cv2.imencode(".jpg" if file_format == "jpg" else ".png", pixels, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def read_gray(path: str | Path) -> np.ndarray:
    """A generated image as float32 in [0, 1]: 8-bit by /255, 16-bit rescaled by the image's own range."""
    data = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise OSError(f"could not read image {path}")
    if data.ndim == 3:
        data = cv2.cvtColor(data, cv2.COLOR_BGR2GRAY)
    if data.dtype == np.uint8:
        return data.astype(np.float32) / 255.0
    data = data.astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    return (data - lo) / max(hi - lo, 1e-6)


def _stem(center: str, class_name: str, index: int) -> str:
    return f"{center}_{CLASS_SHORT_NAMES[class_name]}_{index:04d}"


def _render_and_write(
    out: Path, seed: int, center: str, class_index: int, index: int, size: tuple[int, int]
) -> None:
    class_name = list(DEFAULT_CLASSES)[class_index]
    sig = scanner_signature(center)
    image, mask = render_bscan(center, class_name, image_rng(seed, center, class_index, index), size)
    stem = _stem(center, class_name, index)
    root = out / center
    _write_pixels(
        root / "images" / class_name / f"{stem}{sig.suffix}", _file_pixels(image, sig), sig.file_format
    )
    _write_pixels(root / "masks" / class_name / f"{stem}.png", mask.astype(np.uint8) * 255, "png")


def _prepare_folders(out: Path, centers: Sequence[str]) -> None:
    """Creates the class folders and removes images/masks a previous run left there for the same centers."""
    for center in centers:
        for class_name in DEFAULT_CLASSES:
            for kind in ("images", "masks"):
                folder = out / center / kind / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for old in folder.glob(f"{center}_*"):
                    if old.is_file() and old.suffix.lower() in _IMAGE_SUFFIXES:
                        old.unlink()


# ---------------------------------------------------------------------------------------------------------
# Contact sheet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _sheet_classes(out: Path, centers: Sequence[str]) -> list[str]:
    found = {
        p.name
        for c in centers
        if (out / c / "images").is_dir()
        for p in (out / c / "images").iterdir()
        if p.is_dir()
    }
    known = [name for name in DEFAULT_CLASSES if name in found]
    return known + sorted(found - set(known))


def _thumbnail(path: Path, height: int, width: int) -> np.ndarray:
    return cv2.resize(read_gray(path), (width, height), interpolation=cv2.INTER_AREA)


def _thumb_width(paths: Sequence[Path]) -> int:
    """Thumbnail width that keeps the aspect ratio of the (first) generated image."""
    if not paths:
        return round(_PREVIEW_THUMB_H * DEFAULT_W / DEFAULT_H)
    height, width = read_gray(paths[0]).shape
    return int(np.clip(round(_PREVIEW_THUMB_H * width / height), _PREVIEW_THUMB_H // 3, 4 * _PREVIEW_THUMB_H))


@dataclass(frozen=True)
class _SheetLayout:
    """Contact-sheet geometry: one block of `examples` rows per center, one column per class."""

    examples: int
    thumb_w: int
    thumb_h: int = _PREVIEW_THUMB_H
    gap: int = 4
    block_gap: int = 14
    label_w: int = 100
    header_h: int = 30

    @property
    def block_h(self) -> int:
        return self.examples * (self.thumb_h + self.gap) + self.block_gap

    def cell(self, block: int, example: int, column: int) -> tuple[int, int]:
        """Top-left (x, y) of one thumbnail."""
        x = self.label_w + column * (self.thumb_w + self.gap)
        y = self.header_h + block * self.block_h + example * (self.thumb_h + self.gap)
        return x, y

    def size(self, blocks: int, columns: int) -> tuple[int, int]:
        return self.label_w + columns * (self.thumb_w + self.gap), self.header_h + blocks * self.block_h


def write_preview(
    out: str | Path, *, centers: Sequence[str] | None = None, examples: int = _PREVIEW_EXAMPLES
) -> Path:
    """Writes OUT/preview.png so a human can check the data at a glance: a block of rows per center, a column
    per class, the first `examples` images of each (16-bit images rescaled by their own range)."""
    out = Path(out)
    examples = _check_int("examples", examples, 1)
    if centers is None:
        centers = sorted(p.name for p in out.iterdir() if (p / "images").is_dir()) if out.is_dir() else []
    classes = _sheet_classes(out, centers)
    if not centers or not classes:
        raise ValueError(f"no generated images under {out} (expected OUT/<center>/images/<class>/...)")
    chosen = {
        (center, class_name): _image_files(out / center / "images" / class_name)[:examples]
        for center in centers
        for class_name in classes
    }
    layout = _SheetLayout(examples, _thumb_width([p for paths in chosen.values() for p in paths]))
    width, height = layout.size(len(centers), len(classes))
    sheet = np.full((height, width), 0.1, np.float32)
    for block, center in enumerate(centers):
        for column, class_name in enumerate(classes):
            for example, path in enumerate(chosen[(center, class_name)]):
                x, y = layout.cell(block, example, column)
                sheet[y : y + layout.thumb_h, x : x + layout.thumb_w] = _thumbnail(
                    path, layout.thumb_h, layout.thumb_w
                )
    image = Image.fromarray(np.round(sheet * 255).astype(np.uint8), mode="L")
    _draw_labels(image, layout, centers, classes)
    path = out / "preview.png"
    image.save(path, optimize=True)
    return path


def _draw_labels(
    image: Image.Image, layout: _SheetLayout, centers: Sequence[str], classes: Sequence[str]
) -> None:
    draw, font = ImageDraw.Draw(image), _font(15)
    for column, class_name in enumerate(classes):
        x, _ = layout.cell(0, 0, column)
        label = CLASS_SHORT_NAMES.get(class_name, class_name)
        draw.text((x + layout.thumb_w // 2, layout.header_h // 2), label, fill=255, font=font, anchor="mm")
    for block, center in enumerate(centers):
        _, y = layout.cell(block, 0, 0)
        middle = y + (layout.block_h - layout.block_gap) // 2
        draw.text((8, middle), center, fill=255, font=font, anchor="lm")


# ---------------------------------------------------------------------------------------------------------
# Public entry point


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_dataset` wrote."""

    out: Path
    counts: dict[str, dict[str, int]]  # center -> class -> number of images
    preview: Path | None
    seconds: float

    @property
    def total(self) -> int:
        return sum(n for per_class in self.counts.values() for n in per_class.values())


def _check_int(name: str, value: object, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return int(value)


def _check_centers(centers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(centers, str) or not isinstance(centers, Sequence):
        raise ValueError(f"centers must be a sequence of names, got {centers!r}")
    if not centers:
        raise ValueError("centers must name at least one center")
    seen: set[str] = set()
    for center in centers:
        if not isinstance(center, str) or not _CENTER_NAME.match(center):
            raise ValueError(
                f"bad center name {center!r}: use letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        if center.lower() in seen:
            raise ValueError(f"duplicate center name {center!r} (names are compared case-insensitively)")
        seen.add(center.lower())
    return tuple(centers)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    height, width = (_check_int(name, v, MIN_SIZE) for name, v in zip(("height", "width"), size, strict=True))
    if max(height, width) > MAX_SIZE:
        raise ValueError(f"size must be at most {MAX_SIZE} x {MAX_SIZE}, got {height} x {width}")
    return height, width


def generate_dataset(
    out: str | Path,
    *,
    seed: int = 0,
    per_class: int = 40,
    centers: Sequence[str] = DEFAULT_CENTERS,
    size: tuple[int, int] = (DEFAULT_H, DEFAULT_W),
    preview: bool = True,
    progress: bool = True,
) -> SynthSummary:
    """Writes the synthetic data set (formats per center: see the module docstring):

    OUT/<center>/images/<class>/<center>_<class-short>_<NNNN>.<ext>, OUT/<center>/masks/<class>/<stem>.png
    and OUT/preview.png when `preview`.

    Each image is seeded from (seed, crc32(center), class index, image index), so the same seed gives
    byte-identical files whatever else is generated. Re-running into the same folder overwrites the files of
    these centers and removes ones a previous run left in their class folders; with preview=False an old
    preview.png is removed, as it would no longer match. Bad arguments raise ValueError before anything is
    written.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    seed = _check_int("seed", seed, 0)
    per_class = _check_int("per_class", per_class, 1)
    centers = _check_centers(centers)
    size = _check_size(size)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a folder, but {out} is a file")
    _prepare_folders(out, centers)
    jobs = [
        (center, class_index, index)
        for center in centers
        for class_index in range(len(DEFAULT_CLASSES))
        for index in range(per_class)
    ]
    for center, class_index, index in tqdm(jobs, desc="synth", unit="img", disable=not progress):
        _render_and_write(out, seed, center, class_index, index, size)
    preview_path = out / "preview.png"
    if preview:
        write_preview(out, centers=centers)
    else:
        preview_path.unlink(missing_ok=True)  # a sheet from an earlier run would no longer match
    counts = {center: dict.fromkeys(DEFAULT_CLASSES, per_class) for center in centers}
    return SynthSummary(out, counts, preview_path if preview else None, time.perf_counter() - started)
