"""How good a mask source is for the structure prior, measured on images with ground-truth masks.

What matters downstream is the ROI band, not the pixels: so beside mask Dice/IoU this reports how
far the ROI's top edge (``roi_boxes``) lands from the one the ground truth gives, as a fraction of
the image height, and how often a source finds no all-tissue row and falls back to the whole image.
The trained segmenter and the classical mask are scored on the same images, side by side.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from savlt.data.discover import DatasetScan
from savlt.data.imageio import read_image, read_mask
from savlt.data.masks import classical_tissue_mask
from savlt.io import (
    OutputError,
    check_outside_data,
    markdown_table,
    progress_batches,
    text_table,
    write_json,
    write_text,
)
from savlt.models.roi import roi_boxes
from savlt.seg.metrics import dice_iou
from savlt.seg.model import TissueSegmenter
from savlt.seg.samples import masked_records

MaskFunction = Callable[[list[np.ndarray]], list[np.ndarray]]
REPORT_TITLE = "# Tissue masks: ROI quality"  # roi_quality.md's first line


@dataclass
class SourceScores:
    """Per-image scores of one mask source; the summary properties are what the table shows."""

    name: str
    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    band_error: list[float] = field(default_factory=list)  # |y0_pred - y0_true|, fraction of the height
    fallback: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | str]:
        return {
            "source": self.name,
            "images": len(self.dice),
            "dice": float(np.mean(self.dice)),
            "iou": float(np.mean(self.iou)),
            "band_error_mean": float(np.mean(self.band_error)),
            "band_error_max": float(np.max(self.band_error)),
            "fallback_share": float(np.mean(self.fallback)),
        }


@dataclass
class RoiQuality:
    sources: list[SourceScores]
    truth_fallback: int  # ground-truth masks that themselves have no all-tissue row
    centers: list[str]
    top_fraction: float

    HEADER = ("mask source", "images", "Dice", "IoU", "ROI error mean", "ROI error max", "fallback")

    def rows(self) -> list[list[str]]:
        rows = []
        for s in (source.summary() for source in self.sources):
            rows.append(
                [
                    str(s["source"]),
                    str(s["images"]),
                    f"{s['dice']:.4f}",
                    f"{s['iou']:.4f}",
                    f"{s['band_error_mean']:.4f}",
                    f"{s['band_error_max']:.4f}",
                    f"{100 * float(s['fallback_share']):.1f}%",
                ]
            )
        return rows

    def table(self) -> str:
        return text_table(self.HEADER, self.rows())

    def to_json(self) -> dict[str, Any]:
        return {
            "centers": self.centers,
            "top_fraction": self.top_fraction,
            "ground_truth_fallback": self.truth_fallback,
            "summary": [s.summary() for s in self.sources],
            "per_image": {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in self.sources},
        }


def _y0(mask: np.ndarray, top_fraction: float) -> tuple[float, bool]:
    boxes, fallback = roi_boxes(torch.from_numpy(mask)[None], top_fraction)  # (1, 4), (1,)
    return float(boxes[0, 1]), bool(fallback[0])


def evaluate_roi(
    scan: DatasetScan,
    segmenter: TissueSegmenter | None = None,
    top_fraction: float = 0.1,
    batch_size: int = 16,
    progress: bool = True,
) -> RoiQuality:
    """Score the segmenter (if any) and the classical mask against every ground-truth mask of `scan`."""
    records = masked_records(scan)
    sources: list[tuple[SourceScores, MaskFunction]] = []
    if segmenter is not None:
        sources.append((SourceScores("segmenter"), segmenter.predict_masks))
    sources.append((SourceScores("classical"), lambda images: [classical_tissue_mask(i) for i in images]))
    truth_fallback = 0
    for chunk in progress_batches(records, batch_size, "scoring ROI", progress):
        images = [read_image(r.path) for r in chunk]
        truths = [read_mask(r.mask_path, image.shape[:2]) for r, image in zip(chunk, images, strict=True)]  # type: ignore[arg-type]
        true_y0 = [_y0(t, top_fraction) for t in truths]
        truth_fallback += sum(fb for _, fb in true_y0)
        for scores, source in sources:
            for pred, truth, (y0_true, _) in zip(source(images), truths, true_y0, strict=True):
                dice, iou = dice_iou(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
                y0_pred, fallback = _y0(pred, top_fraction)
                scores.dice.append(float(dice[0]))
                scores.iou.append(float(iou[0]))
                scores.band_error.append(abs(y0_pred - y0_true))
                scores.fallback.append(fallback)
    return RoiQuality([s for s, _ in sources], truth_fallback, list(scan.centers), top_fraction)


def _is_ours(path: Path) -> bool:
    """Whether the existing `path` is a roi_quality.json or .md SAVLT wrote (by its content)."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":
            return text.startswith(REPORT_TITLE + "\n")
        data = json.loads(text)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"segmenter", "summary", "per_image"} <= set(data)


def check_roi_quality_folder(out: Path, data_root: str | Path | None) -> None:
    """Refuse, before any work, a report folder in the data root, or one holding a roi_quality.json
    or .md SAVLT did not write (it would be replaced)."""
    what = "report folder (--out)"
    check_outside_data(out, [data_root], what, holding=False)
    for path in (out / "roi_quality.json", out / "roi_quality.md"):
        if (path.exists() or path.is_symlink()) and (path.is_symlink() or not _is_ours(path)):
            raise OutputError(
                f"{what}: {path} exists and is not a report SAVLT wrote; SAVLT never replaces a file it "
                "did not write: move it, or choose another --out"
            )


def write_roi_quality(quality: RoiQuality, out: Path, segmenter_folder: Path | None) -> Sequence[Path]:
    """roi_quality.json and roi_quality.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"segmenter": str(segmenter_folder) if segmenter_folder else None, **quality.to_json()}
    write_json(out / "roi_quality.json", data)
    notes = [
        REPORT_TITLE,
        "",
        f"- centers: {', '.join(quality.centers)}; segmenter: `{segmenter_folder or 'none (classical only)'}`",
        f"- ROI error: |y0 predicted − y0 ground truth| as a fraction of the image height, y0 = first all-tissue "
        f"row at or below {quality.top_fraction:g} of the height; fallback = no such row, ROI = whole image",
        f"- ground-truth masks that fall back themselves: {quality.truth_fallback}",
        "- a segmenter is optimistic on images it was trained on (see folds.json of its training folder)",
        "",
        markdown_table(RoiQuality.HEADER, quality.rows()),
        "",
    ]
    write_text(out / "roi_quality.md", "\n".join(notes))
    return [out / "roi_quality.json", out / "roi_quality.md"]
