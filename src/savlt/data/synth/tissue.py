"""Tissue: one reflectivity renderer per class, drawing the structure its class description names, in
"flattened" coordinates (row = depth below a smooth base surface), plus the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from savlt.data.synth.fields import pixel_scale, smooth_curve, smooth_field, uniform


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


@dataclass(frozen=True)
class Canvas:
    """Flattened tissue frame: canvas row `margin` is the smooth base surface, `relief` rises above it."""

    height: int  # height of the output image
    width: int
    relief: np.ndarray  # (W,) protrusion of the real surface above the base surface, >= 0
    margin: int
    depth: np.ndarray  # (rows, W) depth below the real (relief) surface, pixels

    @classmethod
    def for_relief(cls, relief: np.ndarray, height: int) -> Canvas:
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
class Tissue:
    canvas: Canvas
    reflectivity: np.ndarray  # same shape as canvas.depth, linear, (0, 1]


def _epithelium_thickness(rng: np.random.Generator, cv: Canvas, lo: float, hi: float) -> np.ndarray:
    """Epithelium thickness per column, a fraction lo..hi of the image height, gently varying."""
    mean = uniform(rng, lo, hi) * cv.height
    wobble = uniform(rng, 0.05, 0.2) * smooth_curve(rng, cv.width, cv.width / 3)
    return (mean * (1.0 + wobble)).astype(np.float32)


def _texture(rng: np.random.Generator, cv: Canvas, cell: tuple[float, float], strength: float) -> np.ndarray:
    """Positive multiplicative tissue texture around 1 (clipped so it never punches black holes)."""
    return np.maximum(1.0 + strength * smooth_field(rng, cv.shape, cell), 0.25)


def _two_layers(
    rng: np.random.Generator, cv: Canvas, thickness: np.ndarray, contrast: float, boundary_width: float
) -> np.ndarray:
    """Gray epithelium over a whiter, horizontally textured stroma, meeting at `thickness`."""
    r_epi = uniform(rng, 0.03, 0.08)
    r_stroma = min(0.9, r_epi * contrast)
    epi_texture = _texture(rng, cv, (2.5 * cv.px, 12.0 * cv.px), uniform(rng, 0.1, 0.3))
    stroma_texture = _texture(rng, cv, (3.0 * cv.px, 14.0 * cv.px), uniform(rng, 0.2, 0.4))
    step = _sigmoid((cv.depth - thickness[None, :]) / (boundary_width * cv.px))
    return r_epi * (1.0 - step) * epi_texture + r_stroma * step * stroma_texture


def _curved_bands(
    rng: np.random.Generator, cv: Canvas, top: np.ndarray, count: int, bend: float, strength: float
) -> np.ndarray:
    """Multiplicative darker bands below `top`, bending by about `bend` (default-size) pixels: sub-layers."""
    factor = np.ones(cv.shape, np.float32)
    for _ in range(count):
        centre = top + uniform(rng, 12.0 * cv.px, 0.4 * cv.height)
        centre = centre + bend * cv.px * smooth_curve(rng, cv.width, cv.width / uniform(rng, 1.0, 2.5))
        half = uniform(rng, 3.0, 8.0) * cv.px
        band = np.exp(-(((cv.depth - centre[None, :]) / half) ** 2))
        factor *= 1.0 - uniform(rng, 0.35, 0.7) * strength * band
    return factor


def _tissue_inflammation(rng: np.random.Generator, height: int, width: int) -> Tissue:
    """Distinct layers: a gray epithelium, a sharp boundary, a white stroma with gray sub-bands."""
    cv = Canvas.for_relief(np.zeros(width, np.float32), height)
    thickness = _epithelium_thickness(rng, cv, 0.07, 0.17)
    r = _two_layers(rng, cv, thickness, uniform(rng, 5.0, 12.0), uniform(rng, 0.7, 2.0))
    r *= _curved_bands(rng, cv, thickness, int(rng.integers(1, 3)), uniform(rng, 1.0, 4.0), 1.0)
    return Tissue(cv, r)


def _cyst_ellipses(
    rng: np.random.Generator, cv: Canvas, thickness: np.ndarray
) -> list[tuple[float, float, float, float, float]]:
    count = int(rng.choice([1, 1, 2, 2, 3, 4]))
    ellipses = []
    for _ in range(count):
        cx = uniform(rng, 0.08, 0.92) * cv.width
        half_w = uniform(rng, 0.05, 0.15) * cv.width
        half_h = half_w * uniform(rng, 0.35, 0.7)
        top = float(thickness[int(np.clip(cx, 0, cv.width - 1))]) + 4.0 * cv.px
        cy = cv.margin + top + half_h + uniform(rng, 0.0, 0.4 * cv.height)
        ellipses.append((cx, cy, half_w, half_h, uniform(rng, -15.0, 15.0)))
    return ellipses


def _tissue_cyst(rng: np.random.Generator, height: int, width: int) -> Tissue:
    """Smooth curved layers holding one or more oval, hypo-reflective (fluid) areas."""
    cv = Canvas.for_relief(np.zeros(width, np.float32), height)
    thickness = _epithelium_thickness(rng, cv, 0.06, 0.14)
    r = _two_layers(rng, cv, thickness, uniform(rng, 3.0, 8.0), uniform(rng, 1.0, 3.0))
    r *= _curved_bands(rng, cv, thickness, int(rng.integers(1, 4)), uniform(rng, 3.0, 12.0), 0.8)
    cyst = cv2.GaussianBlur(_filled_ellipses(cv.shape, _cyst_ellipses(rng, cv, thickness)), (0, 0), cv.px)
    # Fluid attenuates less than tissue, so the tissue just under a cyst looks brighter.
    below = np.maximum.accumulate(cyst, axis=0) - cyst
    r *= 1.0 + uniform(rng, 0.1, 0.6) * below
    r_fluid = uniform(rng, 0.004, 0.03)
    return Tissue(cv, r * (1.0 - cyst) + r_fluid * cyst)


@dataclass(frozen=True)
class _Papilla:
    centre: float
    width: float
    height: float


def _papillae(rng: np.random.Generator, width: int, height: int) -> list[_Papilla]:
    """A continuous row of rounded finger-like protrusions along (most of) the surface."""
    scale = uniform(rng, 0.7, 1.3) * pixel_scale(height, width)
    tallest = uniform(rng, 0.04, 0.12) * height
    start, stop = -10.0 * scale, width + 10.0 * scale
    if rng.random() < 0.25:  # sometimes the papillary zone covers only part of the scan
        covered = uniform(rng, 0.55, 0.9) * width
        start = uniform(rng, 0.0, width - covered)
        stop = start + covered
    papillae, x = [], start - uniform(rng, 0.0, 12.0) * scale
    while x < stop:
        w = uniform(rng, 12.0, 26.0) * scale
        papillae.append(_Papilla(x + w / 2, w, tallest * uniform(rng, 0.4, 1.0)))
        x += w * uniform(rng, 0.85, 1.1)
    return papillae


def _papilla_relief(papillae: Sequence[_Papilla], width: int) -> np.ndarray:
    x = np.arange(width, dtype=np.float32)
    relief = np.zeros(width, np.float32)
    for p in papillae:
        u = np.clip(1.0 - (2.0 * (x - p.centre) / p.width) ** 2, 0.0, 1.0)
        relief = np.maximum(relief, p.height * u**0.45)
    return relief


def _tissue_ectropion(rng: np.random.Generator, height: int, width: int) -> Tissue:
    """Columnar epithelium folded into papillae: bright rims and dark cores along the upper region."""
    papillae = _papillae(rng, width, height)
    cv = Canvas.for_relief(_papilla_relief(papillae, width), height)
    r_stroma = uniform(rng, 0.18, 0.45)
    r = r_stroma * _texture(rng, cv, (4.0 * cv.px, 8.0 * cv.px), uniform(rng, 0.2, 0.4))
    r += uniform(rng, 0.3, 0.8) * np.exp(-np.maximum(cv.depth, 0.0) / (uniform(rng, 2.0, 4.0) * cv.px))
    core_depth = uniform(rng, 4.0 * cv.px, 0.1 * height)
    cores = []
    for p in papillae:
        top = -0.8 * p.height
        bottom = core_depth * uniform(rng, 0.6, 1.4)
        cy = cv.margin + (top + bottom) / 2
        cores.append((p.centre, cy, p.width * uniform(rng, 0.25, 0.36), (bottom - top) / 2, 0.0))
    core = cv2.GaussianBlur(_filled_ellipses(cv.shape, cores), (0, 0), cv.px)
    r *= 1.0 - uniform(rng, 0.7, 0.92) * core
    return Tissue(cv, r)


def _icicle_layer(rng: np.random.Generator, cv: Canvas, thickness: np.ndarray) -> np.ndarray:
    """Densely packed, tapering bright streaks that hang down from the epithelium, fading with length."""
    layer = np.zeros(cv.shape, np.float32)
    spacing = uniform(rng, 4.0, 9.0) * cv.px
    mean_length = uniform(rng, 0.12, 0.32) * cv.height
    scale = 16
    for x in np.arange(-4.0 * cv.px, cv.width + 4.0 * cv.px, spacing):
        c = x + uniform(rng, -0.3, 0.3) * spacing
        top = cv.margin + float(thickness[int(np.clip(c, 0, cv.width - 1))]) * uniform(rng, 0.1, 0.7)
        length = mean_length * uniform(rng, 0.5, 1.5)
        half = uniform(rng, 1.0, 2.6) * cv.px
        lean = uniform(rng, -0.12, 0.12) * length
        brightness = uniform(rng, 0.5, 1.0)
        for t0, fade in ((0.0, 1.0), (1 / 3, 0.7), (2 / 3, 0.4)):
            t1 = t0 + 1 / 3
            w0, w1 = half * (1 - 0.85 * t0), half * (1 - 0.85 * t1)
            x0, x1 = c + lean * t0, c + lean * t1
            y0, y1 = top + length * t0, top + length * t1
            quad = np.array([[x0 - w0, y0], [x0 + w0, y0], [x1 + w1, y1], [x1 - w1, y1]]) * scale
            cv2.fillConvexPoly(layer, np.round(quad).astype(np.int32), brightness * fade, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(layer, (0, 0), 0.7 * cv.px)


def _tissue_hsil(rng: np.random.Generator, height: int, width: int) -> Tissue:
    """Thickened epithelium with a blurred boundary, crowded by dense icicle-like bright streaks."""
    cv = Canvas.for_relief(np.zeros(width, np.float32), height)
    thickness = _epithelium_thickness(rng, cv, 0.12, 0.26)
    r = _two_layers(rng, cv, thickness, uniform(rng, 1.5, 4.0), uniform(rng, 3.0, 8.0))
    icicles = _icicle_layer(rng, cv, thickness)
    # Between the streaks the tissue is darker, which is what makes them read as "icicles".
    zone = cv2.GaussianBlur(icicles, (0, 0), sigmaX=6.0 * cv.px, sigmaY=3.0 * cv.px)
    zone /= zone.max() + 1e-6
    r *= 1.0 - uniform(rng, 0.3, 0.7) * zone
    return Tissue(cv, r + uniform(rng, 0.2, 0.6) * icicles)


def _tissue_cancer(rng: np.random.Generator, height: int, width: int) -> Tissue:
    """No layering: a heterogeneous mass with irregular bright tumour nests and dark necrotic areas."""
    px = pixel_scale(height, width)
    relief = smooth_curve(rng, width, uniform(rng, 15.0, 40.0) * px) * uniform(rng, 1.0, 4.0) * px
    cv = Canvas.for_relief(relief - relief.min(), height)
    r = uniform(rng, 0.08, 0.2) * _texture(rng, cv, (6.0 * px, 8.0 * px), 0.3)
    r += (
        uniform(rng, 0.3, 0.9)
        * _irregular_blobs(rng, cv, uniform(rng, 6.0, 12.0) * px, 0.68, 0.86)
        * _texture(rng, cv, (2.0 * px, 2.0 * px), 0.3)
    )
    necrosis = _irregular_blobs(rng, cv, uniform(rng, 16.0, 30.0) * px, 0.8, 0.92)
    necrosis *= _smoothstep(cv.depth - uniform(rng, 5.0, 20.0) * px, 8.0 * px)
    r *= 1.0 - necrosis * uniform(rng, 0.8, 0.97)
    if rng.random() < 0.3:  # a remnant of normal layering at one side of the scan
        r *= _layer_remnant(rng, cv)
    return Tissue(cv, r)


def _irregular_blobs(
    rng: np.random.Generator, cv: Canvas, cell: float, q_lo: float, q_hi: float
) -> np.ndarray:
    """Soft-edged irregular blobs covering roughly 1-q of the canvas (q drawn from q_lo..q_hi), in [0, 1]."""
    field = smooth_field(rng, cv.shape, (cell, cell * uniform(rng, 0.8, 1.8)))
    return _smoothstep(field - np.quantile(field, uniform(rng, q_lo, q_hi)), 0.35)


def _layer_remnant(rng: np.random.Generator, cv: Canvas) -> np.ndarray:
    """Darkens an epithelium-like band over one side of the scan (multiplicative factor)."""
    thickness = _epithelium_thickness(rng, cv, 0.06, 0.12)
    split = uniform(rng, 0.2, 0.5) * cv.width
    x = np.arange(cv.width, dtype=np.float32)
    edge = 6.0 * cv.px
    side = _sigmoid((split - x) / edge) if rng.random() < 0.5 else _sigmoid((x - (cv.width - split)) / edge)
    band = 1.0 - _sigmoid((cv.depth - thickness[None, :]) / (1.5 * cv.px))
    return 1.0 - uniform(rng, 0.4, 0.7) * band * side[None, :]


def _add_vessels(rng: np.random.Generator, tissue: Tissue) -> np.ndarray:
    """A few small dark vessels in any class, so a single dark oval alone does not mean 'cyst'."""
    cv = tissue.canvas
    vessels = []
    for _ in range(int(rng.poisson(0.8))):
        cy = cv.margin + uniform(rng, 20.0 * cv.px, 0.7 * cv.height)
        half_w, half_h = uniform(rng, 2.0, 6.0) * cv.px, uniform(rng, 1.5, 4.0) * cv.px
        vessels.append((uniform(rng, 0, cv.width), cy, half_w, half_h, 0.0))
    if not vessels:
        return tissue.reflectivity
    layer = cv2.GaussianBlur(_filled_ellipses(cv.shape, vessels), (0, 0), 0.8 * cv.px)
    return tissue.reflectivity * (1.0 - uniform(rng, 0.4, 0.8) * layer)


@dataclass(frozen=True)
class ClassStyle:
    tissue: Callable[[np.random.Generator, int, int], Tissue]
    curvature: float  # scale of the surface curvature
    attenuation: float  # scale of the depth attenuation


STYLES: dict[str, ClassStyle] = {
    "mild_inflammation": ClassStyle(_tissue_inflammation, 1.0, 1.0),
    "cyst": ClassStyle(_tissue_cyst, 1.8, 0.95),
    "ectropion": ClassStyle(_tissue_ectropion, 1.0, 1.05),
    "high-grade_squamous_intraepithelial_lesion": ClassStyle(_tissue_hsil, 1.0, 1.1),
    "cancer": ClassStyle(_tissue_cancer, 1.2, 1.25),
}


def tissue_for(style: ClassStyle, rng: np.random.Generator, height: int, width: int) -> Tissue:
    """The class's tissue plus the structures every class shares (vessels), clipped to valid reflectivity."""
    tissue = style.tissue(rng, height, width)
    return Tissue(tissue.canvas, np.clip(_add_vessels(rng, tissue), 1e-3, 1.0).astype(np.float32))
