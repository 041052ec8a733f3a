"""Writing the data set: image and mask files per center and class, and `generate_dataset`; with patients,
several B-scans per patient, a metadata.csv per center, and some patients as multi-page TIFF volumes."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from savlt.classes import DEFAULT_CLASSES, short_name
from savlt.data.synth.checks import SynthError, check_centers, check_int, check_size
from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W
from savlt.data.synth.preview import write_preview
from savlt.data.synth.render import image_rng, patient_bscans, patient_rng, render_bscan
from savlt.data.synth.scanner import ScannerSignature, scanner_signature
from savlt.io import atomic_path, read_manifest, write_csv
from savlt.outputs import claim_folder

DEFAULT_CENTERS: tuple[str, ...] = ("mixed", "xiangya", "huaxi")
KIND = "synth"  # the kind in OUT/savlt-manifest.json
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
    """One image (H×W) in `file_format`, or, for "tif16" and "tif", a stack of pages (N×H×W) as a
    multi-page TIFF."""
    with atomic_path(path) as tmp:
        if file_format in ("tif16", "tif"):
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


METADATA_COLUMNS = ("file", "patient", "volume", "slice")


def _is_volume(patient: int, fraction: float) -> bool:
    """Whether patient number `patient` is written as a volume: a share `fraction` of the patients,
    spread evenly (no randomness)."""
    return math.floor((patient + 1) * fraction) > math.floor(patient * fraction)


def _write_patient(
    out: Path,
    seed: int,
    center: str,
    class_index: int,
    patient: int,
    indices: Sequence[int],
    size: tuple[int, int],
    as_volume: bool,
) -> list[tuple[str, str, str, int]]:
    """The B-scans `indices` of one patient, as image and mask files or as one multi-page TIFF volume
    (no mask files); returns their metadata rows (file, patient, volume, slice)."""
    class_name = list(DEFAULT_CLASSES)[class_index]
    sig = scanner_signature(center)
    streams = [image_rng(seed, center, class_index, index) for index in indices]
    scans = patient_bscans(center, class_name, patient_rng(seed, center, class_index, patient), streams, size)
    name = f"{center}_{short_name(class_name).lower()}_p{patient:03d}"
    volume = f"{name}_v1"
    if as_volume:
        rel = f"images/{class_name}/{name}.tif"
        pages = np.stack([_file_pixels(image, sig) for image, _ in scans])
        _write_pixels(out / center / rel, pages, "tif16" if sig.file_format == "tif16" else "tif")
        return [(f"{rel}#{page}", name, volume, page) for page in range(len(indices))]
    rows = []
    for page, (index, (image, mask)) in enumerate(zip(indices, scans, strict=True)):
        stem = f"{name}_{index:04d}"
        write_scan(out / center / "images" / class_name / f"{stem}{sig.suffix}", image, center)
        _write_pixels(out / center / "masks" / class_name / f"{stem}.png", mask.astype(np.uint8) * 255, "png")
        rows.append((f"images/{class_name}/{stem}{sig.suffix}", name, volume, page))
    return rows


def claim_synth_folder(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `out` for a synthetic data set while the block runs, checked before anything is
    written (``savlt.outputs.claim_folder``): a missing or empty folder is used as it is; one
    holding exactly an earlier, finished synth output (its manifest lists the files) is replaced;
    anything else is refused, nothing deleted. A SynthError leaves `out` as it was found."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"out must be a folder, but {out} is a file: choose another output path")
    return claim_folder(
        out,
        KIND,
        replaces=lambda folder: "files" in (read_manifest(folder) or {}),
        advice="savlt synth writes only into an empty or new folder, or over its own earlier output "
        "(a finished one): choose another folder",
    )


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_dataset` wrote."""

    out: Path
    counts: dict[str, dict[str, int]]  # center -> class -> number of images
    preview: Path | None
    seconds: float
    patients: int = 0  # patients written (every center and class); 0: one scan per patient
    volumes: int = 0  # of them written as multi-page TIFF volumes

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
    patients_per_class: int | None = None,
    volume_fraction: float = 0.0,
) -> SynthSummary:
    """Writes the synthetic data set (formats per center: see the package docstring):

    OUT/<center>/images/<class>/<center>_<class-short>_<NNNN>.<ext>, OUT/<center>/masks/<class>/<stem>.png
    and OUT/preview.png when `preview`; <class-short> is the class's short name in lower case.

    With `patients_per_class` N, the `per_class` scans of each class and center come from N patients
    (consecutive scan numbers, as even as they divide): patient P's scans are neighbouring B-scans of one
    tissue (``render.patient_bscans``), named <center>_<class-short>_p<PPP>_<NNNN>.<ext>, and
    OUT/<center>/metadata.csv lists file, patient (<center>_<class-short>_p<PPP>), volume and slice. A
    share `volume_fraction` of the patients is written as one multi-page TIFF volume each
    (<center>_<class-short>_p<PPP>.tif, 16-bit for xiangya, else 8-bit; one page per scan, no mask files).

    Each image is seeded from (seed, crc32(center), class index, image index), so the same seed gives
    byte-identical files whatever else is generated. OUT must be missing, empty or hold exactly an earlier
    synth output, which is replaced (``claim_synth_folder``); OUT/savlt-manifest.json lists the files
    written. Bad arguments raise SynthError, and any other OUT OutputError, before anything is written.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    seed = check_int("seed", seed, 0)
    per_class = check_int("per_class", per_class, 1)
    centers = check_centers(centers)
    size = check_size(size)
    _check_patients(patients_per_class, per_class, volume_fraction)
    with claim_synth_folder(out):
        patients = volumes = 0
        if patients_per_class is None:
            jobs = [
                (center, class_index, index)
                for center in centers
                for class_index in range(len(DEFAULT_CLASSES))
                for index in range(per_class)
            ]
            for center, class_index, index in tqdm(jobs, desc="synth", unit="img", disable=not progress):
                _render_and_write(out, seed, center, class_index, index, size)
        else:
            total = len(centers) * len(DEFAULT_CLASSES) * per_class
            bar = tqdm(total=total, desc="synth", unit="img", disable=not progress)
            for center in centers:
                rows = []
                for class_index in range(len(DEFAULT_CLASSES)):
                    for patient, indices in enumerate(
                        np.array_split(np.arange(per_class), patients_per_class)
                    ):
                        as_volume = _is_volume(patient, volume_fraction)
                        scans = indices.tolist()
                        rows += _write_patient(
                            out, seed, center, class_index, patient, scans, size, as_volume
                        )
                        patients, volumes = patients + 1, volumes + as_volume
                        bar.update(len(scans))
                write_csv(out / center / "metadata.csv", METADATA_COLUMNS, rows)
            bar.close()
        preview_path = out / "preview.png"
        if preview:
            write_preview(out, centers=centers)
    counts = {center: dict.fromkeys(DEFAULT_CLASSES, per_class) for center in centers}
    seconds = time.perf_counter() - started
    return SynthSummary(out, counts, preview_path if preview else None, seconds, patients, volumes)


def _check_patients(patients_per_class: int | None, per_class: int, volume_fraction: float) -> None:
    if patients_per_class is not None:
        check_int("patients_per_class", patients_per_class, 1)
        if patients_per_class > per_class:
            raise SynthError(
                f"patients_per_class ({patients_per_class}) must not exceed per_class ({per_class}): "
                "every patient needs at least one scan"
            )
    if isinstance(volume_fraction, bool) or not isinstance(volume_fraction, int | float):
        raise SynthError(f"volume_fraction must be a number from 0 to 1, got {volume_fraction!r}")
    if not 0 <= volume_fraction <= 1:
        raise SynthError(f"volume_fraction must lie in [0, 1], got {volume_fraction}")
    if volume_fraction and patients_per_class is None:
        raise SynthError("volume_fraction needs patients_per_class: volumes hold the scans of one patient")
