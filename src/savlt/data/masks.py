"""Tissue masks for the structure prior, computed once per image and kept for the whole run.

Sources: the data set's mask files, a trained segmenter (anything with ``predict_masks``), or the
classical mask (smoothed Otsu threshold, surface found per column, everything below the surface
is tissue). Masks are stored bit-packed in memory (8× smaller than bool) and unpacked when a
sample is loaded, so the segmenter never runs inside a training step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from scipy.ndimage import median_filter

from savlt.data.discover import DataError, ImageRecord
from savlt.data.imageio import read_image, read_mask
from savlt.io import progress_batches


class MaskPredictor(Protocol):
    def predict_masks(self, images: list[np.ndarray]) -> list[np.ndarray]: ...


def classical_tissue_mask(image: np.ndarray) -> np.ndarray:
    """Bool H×W mask of the tissue below the surface of an 8-bit scan (H×W or H×W×3)."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    height, width = gray.shape
    sigma = max(1.0, min(height, width) / 100)
    smooth = cv2.GaussianBlur(gray, (0, 0), sigma)
    _, foreground = cv2.threshold(smooth, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    size = max(3, int(round(min(height, width) / 60)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, kernel).astype(bool)
    has_tissue = foreground.any(axis=0)
    surface = np.where(has_tissue, foreground.argmax(axis=0), height)  # first tissue row per column
    surface = median_filter(surface, size=max(3, width // 20) | 1, mode="nearest")
    return np.arange(height)[:, None] >= surface[None, :]


class MaskStore(Mapping[Path, np.ndarray]):
    """path -> bool mask, stored bit-packed."""

    def __init__(self) -> None:
        self._packed: dict[Path, tuple[np.ndarray, tuple[int, int]]] = {}

    def add(self, path: Path, mask: np.ndarray) -> None:
        self._packed[path] = (np.packbits(mask.astype(bool), axis=None), mask.shape)

    def __getitem__(self, path: Path) -> np.ndarray:
        bits, shape = self._packed[path]
        return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


def _mask_from_file(record: ImageRecord) -> np.ndarray:
    if record.mask_path is None:
        raise DataError(
            f"roi.mask_source=files, but image {record.path} has no mask "
            f"(expected masks/<class>/{record.path.stem}.png in center {record.center})"
        )
    return read_mask(record.mask_path, read_image(record.path).shape[:2])


def compute_masks(
    records: Iterable[ImageRecord],
    source: str,
    segmenter: MaskPredictor | None = None,
    store: MaskStore | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> MaskStore:
    """Masks for every record not yet in `store` (source: files, classical or segmenter)."""
    store = store if store is not None else MaskStore()
    todo = list(dict.fromkeys(r for r in records if r.path not in store))
    if source == "segmenter" and segmenter is None:
        raise ValueError("mask source 'segmenter' needs a loaded segmenter")
    for chunk in progress_batches(todo, batch_size, f"tissue masks ({source})", progress):
        if source == "files":
            masks = [_mask_from_file(r) for r in chunk]
        else:
            images = [read_image(r.path) for r in chunk]
            if source == "segmenter":
                masks = segmenter.predict_masks(images)
            else:
                masks = [classical_tissue_mask(image) for image in images]
        for record, mask in zip(chunk, masks, strict=True):
            store.add(record.path, mask)
    return store


class TissueMasks:
    """A run's mask source (``roi.mask_source`` resolved: files, classical or segmenter), holding
    the segmenter, when there is one, for the whole run. `per_input` (``roi.mask_timing=crop``):
    the model segments each of its inputs itself, so no scan gets a mask here (None, or masks of
    ones that the model replaces)."""

    def __init__(self, kind: str, segmenter: MaskPredictor | None = None, per_input: bool = False) -> None:
        if kind == "segmenter" and segmenter is None:
            raise ValueError("the segmenter mask source needs a loaded segmenter")
        self.kind = kind
        self.segmenter = segmenter
        self.per_input = per_input

    def masks_for(
        self, records: Iterable[ImageRecord], store: MaskStore | None = None, progress: bool = True
    ) -> MaskStore | None:
        if self.per_input:
            return None
        return compute_masks(records, self.kind, self.segmenter, store=store, progress=progress)

    def masks_for_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Masks of loose images (prediction): mask files do not exist there, so the classical mask stands in."""
        if self.per_input:
            return [np.ones(image.shape[:2], dtype=bool) for image in images]
        if self.segmenter is not None:
            return self.segmenter.predict_masks(images)
        return [classical_tissue_mask(image) for image in images]
