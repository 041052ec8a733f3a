"""Writing predicted tissue masks for a whole data set, in the data set's own masks layout.

Masks land at ``OUT/<center>/masks/<class folder>/<stem>.png`` (0/255), exactly where
``scan_dataset`` looks for them, so with OUT = ROOT the data set gains masks in place. An existing
mask file is never replaced unless asked: with OUT = ROOT it may be a hand-drawn ground truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from savlt.data.discover import DatasetScan, ImageRecord
from savlt.data.imageio import MASK_EXTENSION, read_image
from savlt.io import atomic_path, progress_batches
from savlt.seg.model import TissueSegmenter
from savlt.seg.plots import overlay_sheet

log = logging.getLogger(__name__)

PREVIEW_FILE = "mask_preview.png"
PREVIEW_COUNT = 12


def mask_target(record: ImageRecord, out: Path) -> Path:
    """Where the mask of `record` belongs under `out` (mirrors the image path below images/)."""
    parts = record.rel.split("/")
    if parts[0] == "images":
        parts = parts[1:]
    return out.joinpath(record.center, "masks", *parts).with_suffix(MASK_EXTENSION)


@dataclass
class PredictSummary:
    out: Path
    written: int = 0
    skipped: list[Path] = field(default_factory=list)  # existing masks left alone
    preview: Path | None = None

    def describe(self) -> str:
        text = f"wrote {self.written} mask(s) under {self.out}"
        if self.skipped:
            text += (
                f"; skipped {len(self.skipped)} image(s) whose mask already exists, e.g. {self.skipped[0]} "
                "(use --overwrite to replace them)"
            )
        if self.preview is not None:
            text += f"; preview: {self.preview}"
        return text


def _write_mask(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def predict_dataset(
    segmenter: TissueSegmenter,
    scan: DatasetScan,
    out: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> PredictSummary:
    """Segment every image of the scanned centers and write the masks (default out: the data root)."""
    summary = PredictSummary(out=Path(out) if out is not None else scan.root)
    records = [r for c in scan.centers.values() for r in c.records if r.page is None]
    pages = sum(len(c.records) for c in scan.centers.values()) - len(records)
    if pages:
        log.info("skipping %d page(s) of multi-page TIFF volumes: the masks layout holds no volumes", pages)
    todo: list[tuple[ImageRecord, Path]] = []
    for record in records:
        target = mask_target(record, summary.out)
        if target.exists() and not overwrite:
            summary.skipped.append(target)
        else:
            todo.append((record, target))
    if summary.skipped:
        log.info("skipping %d image(s) whose mask already exists (use --overwrite)", len(summary.skipped))
    shown = (
        {round(i) for i in np.linspace(0, len(todo) - 1, min(PREVIEW_COUNT, len(todo)))} if todo else set()
    )
    preview: list[tuple[str, np.ndarray, np.ndarray]] = []
    for chunk in progress_batches(todo, batch_size, "predicting masks", progress):
        images = [read_image(record.path) for record, _ in chunk]
        for offset, ((record, target), image, mask) in enumerate(
            zip(chunk, images, segmenter.predict_masks(images), strict=True)
        ):
            _write_mask(target, mask)
            if summary.written + offset in shown:
                preview.append((f"{record.center}/{record.path.name}", image, mask))
        summary.written += len(chunk)
    if preview:
        summary.out.mkdir(parents=True, exist_ok=True)
        summary.preview = overlay_sheet(preview, summary.out / PREVIEW_FILE)
    return summary
