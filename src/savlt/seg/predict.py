"""Writing predicted tissue masks for a whole data set, in the data set's own masks layout.

Masks land at ``OUT/<center>/masks/<class folder>/<stem>.png`` (0/255), exactly where
``scan_dataset`` looks for them, so with OUT = ROOT the data set gains masks in place. An existing
mask file is kept: with OUT = ROOT it may be a hand-drawn ground truth. ``overwrite`` replaces only
the masks SAVLT predicted: OUT/savlt-masks.json records every file written (masks and the
preview) with the SHA-256 of its bytes, so a mask drawn by hand, or one changed since, is never
replaced, nor is a file it did not write under the preview's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from savlt.data.discover import DatasetScan, ImageRecord
from savlt.data.imageio import MASK_EXTENSION, read_image
from savlt.io import atomic_path, name_from_text, progress_batches, savlt_version, write_json
from savlt.seg.model import TissueSegmenter
from savlt.seg.plots import overlay_sheet

log = logging.getLogger(__name__)

PREVIEW_FILE = "mask_preview.png"
PREVIEW_COUNT = 12
RECORD_FILE = "savlt-masks.json"  # in the mask root: what seg predict wrote there (module docstring)


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
    kept: list[Path] = field(default_factory=list)  # existing files SAVLT did not write: never replaced
    preview: Path | None = None

    def describe(self) -> str:
        text = f"wrote {self.written} mask(s) under {self.out}"
        if self.skipped:
            text += (
                f"; skipped {len(self.skipped)} image(s) whose mask already exists, e.g. {self.skipped[0]} "
                "(use --overwrite to replace the masks SAVLT predicted)"
            )
        if self.kept:
            text += (
                f"; kept {len(self.kept)} existing file(s) SAVLT did not write (drawn by hand, or changed "
                f"since SAVLT wrote them), e.g. {self.kept[0]}: never replaced"
            )
        if self.preview is not None:
            text += f"; preview: {self.preview}"
        return text


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _written_before(out: Path) -> dict[str, str]:
    """What seg predict wrote under `out` (relative path -> SHA-256), from its record there."""
    try:
        files = json.loads((out / RECORD_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return (
        {name_from_text(k): v for k, v in files.items() if isinstance(v, str)}
        if isinstance(files, dict)
        else {}
    )


def _is_ours(path: Path, out: Path, written: dict[str, str]) -> bool:
    """Whether the existing file `path` is exactly what seg predict wrote there."""
    if path.is_symlink() or not path.is_file():
        return False
    digest = written.get(path.relative_to(out).as_posix())
    return digest is not None and digest == _digest(path)


def _remember(out: Path, written: dict[str, str], paths: list[Path]) -> None:
    """Add `paths`, just written under `out`, to `written` and to the record there."""
    written.update({p.relative_to(out).as_posix(): _digest(p) for p in paths})
    write_json(out / RECORD_FILE, {"savlt": savlt_version(), "files": written})


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
    """Segment every image of the scanned centers and write the masks (default out: the data root);
    `overwrite` replaces only masks SAVLT predicted (see the module's docstring)."""
    summary = PredictSummary(out=Path(out) if out is not None else scan.root)
    records = [r for c in scan.centers.values() for r in c.records if r.page is None]
    pages = sum(len(c.records) for c in scan.centers.values()) - len(records)
    if pages:
        log.info("skipping %d page(s) of multi-page TIFF volumes: the masks layout holds no volumes", pages)
    written = _written_before(summary.out)
    todo: list[tuple[ImageRecord, Path]] = []
    for record in records:
        target = mask_target(record, summary.out)
        if not (target.exists() or target.is_symlink()):
            todo.append((record, target))
        elif not overwrite:
            summary.skipped.append(target)
        elif _is_ours(target, summary.out, written):
            todo.append((record, target))
        else:
            summary.kept.append(target)
    if summary.skipped:
        log.info("skipping %d image(s) whose mask already exists (use --overwrite)", len(summary.skipped))
    if summary.kept:
        log.warning(
            "keeping %d mask(s) SAVLT did not predict (drawn by hand, or changed since), e.g. %s",
            len(summary.kept),
            summary.kept[0],
        )
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
        _remember(summary.out, written, [target for _, target in chunk])  # a stopped run loses no record
        summary.written += len(chunk)
    sheet = summary.out / PREVIEW_FILE
    if preview and (sheet.exists() or sheet.is_symlink()) and not _is_ours(sheet, summary.out, written):
        summary.kept.append(sheet)
    elif preview:
        summary.out.mkdir(parents=True, exist_ok=True)
        summary.preview = overlay_sheet(preview, sheet)
        _remember(summary.out, written, [sheet])
    return summary
