"""Each center's scanner and how it forms an image: surface placement, speckle, column gain, optics,
noise floor and log-compressed display. The scanners differ, which is the domain shift between centers."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from savlt.data.synth.fields import pixel_scale, smooth_curve, uniform


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


def base_surface(
    rng: np.random.Generator, sig: ScannerSignature, curvature: float, relief: np.ndarray, height: int
) -> np.ndarray:
    """Row of the smooth base surface per column: tilted, curved, gently wavy, below the air band."""
    width = relief.size
    xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / width
    tilt = uniform(rng, -1.0, 1.0) * sig.tilt_max * width
    bow = uniform(rng, -0.04, 0.1) * curvature * height
    wave = uniform(rng, 0.0, 0.02) * height * smooth_curve(rng, width, width / uniform(rng, 2.0, 5.0))
    shape = tilt * xs + 4.0 * bow * xs**2 + wave
    shape -= shape.min()
    limit = 0.3 * height
    if shape.max() > limit:
        shape *= limit / shape.max()
    air = max(2.0, uniform(rng, *sig.air_band) * height)
    return air + float(relief.max()) + shape


def speckle(rng: np.random.Generator, shape: tuple[int, int], sig: ScannerSignature) -> np.ndarray:
    """Fully developed speckle (|filtered complex Gaussian|^2, exponentially distributed, mean 1) with the
    scanner's grain, raised to its speckle contrast."""
    return speckle_from(rng.standard_normal((2, *shape)).astype(np.float32), sig)


def speckle_from(field: np.ndarray, sig: ScannerSignature) -> np.ndarray:
    """`speckle` from a given (2, H, W) standard normal field (the real and imaginary parts)."""
    shape = field.shape[1:]
    px = pixel_scale(*shape)
    sigma_x, sigma_y = sig.speckle_grain[1] * px, sig.speckle_grain[0] * px
    re = cv2.GaussianBlur(field[0], (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    im = cv2.GaussianBlur(field[1], (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    intensity = re * re + im * im
    return (intensity / intensity.mean()) ** sig.speckle_contrast


def column_gain_db(rng: np.random.Generator, sig: ScannerSignature, width: int, px: float) -> np.ndarray:
    """Per-A-scan gain: scanner jitter plus occasional shadows cast by mucus or debris on the surface."""
    gain = sig.column_jitter_db * rng.standard_normal(width).astype(np.float32)
    x = np.arange(width, dtype=np.float32)
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 3))):
            centre, half = uniform(rng, 0, width), uniform(rng, 1.0, 5.0) * px
            gain -= uniform(rng, 3.0, 8.0) * np.exp(-(((x - centre) / half) ** 2))
    return gain


def degrade_optics(intensity: np.ndarray, sig: ScannerSignature) -> np.ndarray:
    """Optical blur, then the scanner's coarser sampling (render small, upsample)."""
    height, width = intensity.shape
    sigma = sig.psf_sigma * pixel_scale(height, width)
    out = cv2.GaussianBlur(intensity, (0, 0), sigma) if sigma > 0 else intensity
    if sig.resolution < 1.0:
        small = (max(8, round(width * sig.resolution)), max(8, round(height * sig.resolution)))
        out = cv2.resize(out, small, interpolation=cv2.INTER_AREA)
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def display(rng: np.random.Generator, intensity: np.ndarray, sig: ScannerSignature) -> np.ndarray:
    """The detector's noise floor added, then log-compressed to the scanner's gain, dynamic range and gamma:
    display values in [0, 1]."""
    noise = 10.0 ** (sig.noise_floor_db / 10.0) * rng.exponential(1.0, intensity.shape).astype(np.float32)
    display_db = 10.0 * np.log10(intensity + noise) + sig.gain_db
    return np.clip((display_db + sig.dynamic_range_db) / sig.dynamic_range_db, 0.0, 1.0) ** sig.gamma
