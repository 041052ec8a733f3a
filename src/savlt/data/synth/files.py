"""Writing the data set: image and mask files per center and class, and `generate_dataset`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from savlt.classes import DEFAULT_CLASSES, short_name
from savlt.data.imageio import is_image_file
from savlt.data.synth.checks import SynthError, check_centers, check_int, check_size
from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W
from savlt.data.synth.preview import write_preview
from savlt.data.synth.render import image_rng, render_bscan
from savlt.data.synth.scanner import ScannerSignature, scanner_signature
from savlt.io import atomic_path

DEFAULT_CENTERS: tuple[str, ...] = ("mixed", "xiangya", "huaxi")
_UINT16_PEDESTAL, _UINT16_PEAK = 600, 40000
_JPEG_QUALITY = 90


def _file_pixels(image: np.ndarray, sig: ScannerSignature) -> np.ndarray:
    if sig.file_format == "tif16":
        span = _UINT16_PEAK - _UINT16_PEDESTAL
        return np.round(_UINT16_PEDESTAL + image * span).astype(np.uint16)
    return np.round(image * 255.0).astype(np.uint8)


def _encoded(path: Path, pixels: np.ndarray, file_format: str) -> bytes:
    """PNG/JPEG bytes, encoded in memory because cv2.imwrite cannot open non-ASCII paths on every platform."""
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if file_format == "jpg" else []
    ok, encoded = cv2.imencode(".jpg" if file_format == "jpg" else ".png", pixels, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    return encoded.tobytes()


def _write_pixels(path: Path, pixels: np.ndarray, file_format: str) -> None:
    with atomic_path(path) as tmp:
        if file_format == "tif16":
            tifffile.imwrite(tmp, pixels, photometric="minisblack")
        else:
            tmp.write_bytes(_encoded(path, pixels, file_format))


def write_scan(path: Path, image: np.ndarray, center: str) -> None:
    """A rendered scan (values in [0, 1]) in the file format of `center`'s scanner."""
    sig = scanner_signature(center)
    _write_pixels(path, _file_pixels(image, sig), sig.file_format)


def _stem(center: str, class_name: str, index: int) -> str:
    return f"{center}_{short_name(class_name).lower()}_{index:04d}"


def _render_and_write(
    out: Path, seed: int, center: str, class_index: int, index: int, size: tuple[int, int]
) -> None:
    class_name = list(DEFAULT_CLASSES)[class_index]
    sig = scanner_signature(center)
    image, mask = render_bscan(center, class_name, image_rng(seed, center, class_index, index), size)
    stem = _stem(center, class_name, index)
    root = out / center
    write_scan(root / "images" / class_name / f"{stem}{sig.suffix}", image, center)
    _write_pixels(root / "masks" / class_name / f"{stem}.png", mask.astype(np.uint8) * 255, "png")


def _prepare_folders(out: Path, centers: Sequence[str]) -> None:
    """Creates the class folders and removes images/masks a previous run left there for the same centers."""
    for center in centers:
        for class_name in DEFAULT_CLASSES:
            for kind in ("images", "masks"):
                folder = out / center / kind / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for old in folder.glob(f"{center}_*"):
                    if old.is_file() and is_image_file(old):
                        old.unlink()


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
    """Writes the synthetic data set (formats per center: see the package docstring):

    OUT/<center>/images/<class>/<center>_<class-short>_<NNNN>.<ext>, OUT/<center>/masks/<class>/<stem>.png
    and OUT/preview.png when `preview`; <class-short> is the class's short name in lower case.

    Each image is seeded from (seed, crc32(center), class index, image index), so the same seed gives
    byte-identical files whatever else is generated. Re-running into the same folder overwrites the files of
    these centers and removes ones a previous run left in their class folders; with preview=False an old
    preview.png is removed, as it would no longer match. Bad arguments raise SynthError before anything is
    written.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    seed = check_int("seed", seed, 0)
    per_class = check_int("per_class", per_class, 1)
    centers = check_centers(centers)
    size = check_size(size)
    if out.exists() and not out.is_dir():
        raise SynthError(f"out must be a folder, but {out} is a file: choose another output path")
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
