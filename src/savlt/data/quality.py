"""Checking scans before they are used: every file decodes, and every scan can be assessed.

``check_scans`` decodes every scan (and its mask, when asked) in worker processes (started as
``savlt.processes`` says, and stopped at once when the check is interrupted), with a progress bar,
and returns one ``ScanCheck`` per scan: the problem that makes it unusable (empty, truncated,
not an image, a bad mask) or, for a scan that decodes, why it cannot be assessed. ``savlt data
check`` lists both; ``train`` and ``evaluate`` run it before the first step and stop with the full
list of unreadable files; ``predict`` assesses each scan with ``assess``.

A scan cannot be assessed when it holds no finite pixel value (an all-NaN float TIFF), when its
stored values are near-constant (fewer than ``min_contrast`` grey levels of the stored type
between the 0.5th and the 99.5th percentile; for float images the spread is measured against the
values' magnitude in 255 steps) or when the classical tissue mask covers less than
``min_tissue`` of it. Such scans are given no diagnosis.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from savlt.config import Config
from savlt.data.discover import DataError, Problem
from savlt.data.imageio import ImageDecodeError, decode_image, read_mask
from savlt.data.masks import classical_tissue_mask
from savlt.processes import stop_pool, worker_context, worker_started

# Fewer scans than this are checked in this process: starting workers would cost more.
PARALLEL_MIN = 64
MAX_WORKERS = 32
# Statistics are taken on a copy at most this many pixels on its longer side.
ASSESS_SIDE = 256
# An error lists this many files; all of them are logged.
LISTED = 20


@dataclass(frozen=True)
class Thresholds:
    """When a scan can be assessed (``eval.min_contrast``, ``eval.min_tissue``)."""

    min_contrast: float = 8.0
    min_tissue: float = 0.05

    @classmethod
    def of(cls, cfg: Config) -> Thresholds:
        return cls(cfg.eval.min_contrast, cfg.eval.min_tissue)


@dataclass(frozen=True)
class ScanCheck:
    path: Path
    problem: Problem | None = None  # the scan (or its mask) cannot be used
    unassessable: str | None = None  # why a readable scan cannot be assessed


def _sample(values: np.ndarray) -> np.ndarray:
    """A regular subsample of about 65 000 values (percentiles do not need every pixel)."""
    step = max(1, int(math.sqrt(values.shape[0] * values.shape[1] / 65536))) if values.ndim >= 2 else 1
    return values[::step, ::step].ravel() if values.ndim >= 2 else values.ravel()


def contrast_levels(raw: np.ndarray) -> float:
    """Spread between the 0.5th and 99.5th percentile of the stored values, in grey levels of
    the stored type (floats: relative to their magnitude, in 255 steps); NaN when no value is finite."""
    values = _sample(raw)
    if values.dtype == bool:
        return 255.0 if values.any() and not values.all() else 0.0
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
        if values.size == 0:
            return math.nan
    if values.dtype in (np.uint8, np.uint16):  # a histogram is several times faster than sorting
        cumulative = np.cumsum(np.bincount(values))
        low, high = np.searchsorted(cumulative, [0.005 * values.size, 0.995 * values.size])
        return float(high - low)
    low, high = np.percentile(values.astype(np.float64), [0.5, 99.5])
    if raw.dtype.kind != "f":
        return float(high - low)
    scale = max(abs(low), abs(high))
    return 0.0 if scale == 0 else float(255.0 * (high - low) / scale)


def tissue_fraction(rgb: np.ndarray) -> float:
    """The share of the scan the classical tissue mask covers (taken on a reduced copy)."""
    gray = rgb[:, :, 0] if rgb.ndim == 3 else rgb
    height, width = gray.shape
    factor = ASSESS_SIDE / max(height, width)
    if factor < 1:
        size = (max(8, round(width * factor)), max(8, round(height * factor)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return float(classical_tissue_mask(gray).mean())


def assess(rgb: np.ndarray, raw: np.ndarray, thresholds: Thresholds = Thresholds()) -> str | None:
    """Why a decoded scan (8-bit RGB and the stored values) cannot be assessed, or None."""
    spread = contrast_levels(raw)
    if math.isnan(spread):
        return "no finite pixel values (all NaN or infinite)"
    if spread < thresholds.min_contrast:
        return (
            f"near-constant pixels (spread {spread:.1f} grey levels between the 0.5th and 99.5th "
            f"percentile, below eval.min_contrast={thresholds.min_contrast:g})"
        )
    tissue = tissue_fraction(rgb)
    if tissue < thresholds.min_tissue:
        return (
            f"almost no tissue found ({100 * tissue:.1f} % of the scan, below "
            f"eval.min_tissue={thresholds.min_tissue:g})"
        )
    return None


def check_scan(path: Path, mask: Path | None = None, thresholds: Thresholds = Thresholds()) -> ScanCheck:
    """Decode one scan (and its mask), and assess it."""
    try:
        rgb, raw = decode_image(path)
    except ImageDecodeError as exc:
        kind = "empty_file" if "0 bytes" in exc.reason else "unreadable_image"
        return ScanCheck(path, Problem(kind, path, str(exc)))
    if mask is not None:
        try:
            read_mask(mask, rgb.shape[:2])
        except ImageDecodeError as exc:
            return ScanCheck(path, Problem("bad_mask", mask, str(exc)))
    return ScanCheck(path, unassessable=assess(rgb, raw, thresholds))


def _check_item(item: tuple[Path, Path | None, Thresholds]) -> ScanCheck:
    return check_scan(*item)


def _worker_count(items: int) -> int:
    """Worker processes for `items` scans: 0 (this process) for a few scans or off Linux, where
    nothing ends a worker whose parent died; else one per core, at most MAX_WORKERS."""
    if items < PARALLEL_MIN or not sys.platform.startswith("linux"):
        return 0
    cores = len(os.sched_getaffinity(0))
    return max(0, min(cores, MAX_WORKERS, math.ceil(items / PARALLEL_MIN)))


def check_scans(
    scans: Sequence[tuple[Path, Path | None]],
    thresholds: Thresholds = Thresholds(),
    progress: bool = True,
    desc: str = "checking images",
) -> list[ScanCheck]:
    """`check_scan` for every (scan, mask or None), in parallel; results in the order given. A
    scan this process found usable before, unchanged since (size and modification time of its
    files), is not decoded again (several runs in one process, e.g. a sweep's feature-based points)."""
    wanted = [(Path(path), mask, thresholds) for path, mask in scans]
    keys = [_identity(item) for item in wanted]
    items = [item for item, key in zip(wanted, keys, strict=True) if key is None or key not in _USABLE]
    fresh = iter(_check_all(items, progress, desc))
    results = [_USABLE[key] if key is not None and key in _USABLE else next(fresh) for key in keys]
    for key, result in zip(keys, results, strict=True):
        if key is not None and result.problem is None:
            _USABLE[key] = result
    return results


_USABLE: dict[tuple, ScanCheck] = {}  # the usable scans this process checked, by `_identity`


def _identity(item: tuple[Path, Path | None, Thresholds]) -> tuple | None:
    """What a check depends on: the scan's and mask's files (path, size, modification time) and the
    thresholds; None when a file cannot be looked at (it is checked, and reported, as always)."""
    path, mask, thresholds = item
    stats = []
    for file in (path, mask):
        if file is None:
            continue
        text = str(file)
        try:
            info = os.stat(text) if os.path.exists(text) else os.stat(text.rpartition("#")[0])
        except OSError:
            return None
        stats.append((text, info.st_size, info.st_mtime_ns))
    return (tuple(stats), thresholds)


def _check_all(
    items: list[tuple[Path, Path | None, Thresholds]], progress: bool, desc: str
) -> list[ScanCheck]:
    workers = _worker_count(len(items))
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress or not items)
    try:
        if workers <= 1:
            results = []
            for item in items:
                results.append(_check_item(item))
                bar.update(1)
            return results
        chunk = max(1, min(64, len(items) // (workers * 8)))
        pool = ProcessPoolExecutor(workers, worker_context(__name__), worker_started, (os.getpid(),))
        try:
            results = []
            for result in pool.map(_check_item, items, chunksize=chunk):
                results.append(result)
                bar.update(1)
        except BrokenProcessPool:
            stop_pool(pool)
            raise DataError(
                "the decode check's worker processes ended before they finished (killed, out of memory, "
                'or started by a script that calls SAVLT outside `if __name__ == "__main__":`): see the '
                "lines above"
            ) from None
        except BaseException:  # interrupted (or failed): no worker finishes its queue
            stop_pool(pool)
            raise
        pool.shutdown()  # every result is in: the workers are idle and exit at once
        return results
    finally:
        bar.close()


def unreadable_error(
    problems: Sequence[Problem], consequence: str, root: str | Path | None = None
) -> DataError:
    """One line naming every unusable file (the first LISTED of them when there are more)."""
    listed = "; ".join(p.message for p in problems[:LISTED])
    more = f"; … and {len(problems) - LISTED} more (all are in the log)" if len(problems) > LISTED else ""
    return DataError(
        f"{len(problems)} file(s) cannot be read, so {consequence}: {listed}{more}. "
        f"Replace or remove them (`savlt data check {root or 'ROOT'}` lists every problem) and run again"
    )
