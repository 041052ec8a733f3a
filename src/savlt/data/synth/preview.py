"""The contact sheet OUT/preview.png: a few scans per class and center, to check the data at a glance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from savlt.classes import DEFAULT_CLASSES, short_name
from savlt.data.imageio import is_image_file, read_image
from savlt.data.synth.checks import SynthError, check_int
from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W
from savlt.io import atomic_path

_PREVIEW_EXAMPLES = 3
_PREVIEW_THUMB_H = 120


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


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


def _gray(path: Path) -> np.ndarray:
    """An image as float32 in [0, 1] (16-bit images rescaled by their own range)."""
    return read_image(path)[:, :, 0].astype(np.float32) / 255.0


def _thumbnail(path: Path, height: int, width: int) -> np.ndarray:
    return cv2.resize(_gray(path), (width, height), interpolation=cv2.INTER_AREA)


def _thumb_width(paths: Sequence[Path]) -> int:
    """Thumbnail width that keeps the aspect ratio of the (first) generated image."""
    if not paths:
        return round(_PREVIEW_THUMB_H * DEFAULT_W / DEFAULT_H)
    height, width = read_image(paths[0]).shape[:2]
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
    examples = check_int("examples", examples, 1)
    if centers is None:
        centers = sorted(p.name for p in out.iterdir() if (p / "images").is_dir()) if out.is_dir() else []
    classes = _sheet_classes(out, centers)
    if not centers or not classes:
        raise SynthError(
            f"no generated images under {out} (expected OUT/<center>/images/<class>/...): "
            "generate the data set there first"
        )
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
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def _draw_labels(
    image: Image.Image, layout: _SheetLayout, centers: Sequence[str], classes: Sequence[str]
) -> None:
    draw, font = ImageDraw.Draw(image), _font(15)
    for column, class_name in enumerate(classes):
        x, _ = layout.cell(0, 0, column)
        label = short_name(class_name)
        draw.text((x + layout.thumb_w // 2, layout.header_h // 2), label, fill=255, font=font, anchor="mm")
    for block, center in enumerate(centers):
        _, y = layout.cell(block, 0, 0)
        middle = y + (layout.block_h - layout.block_gap) // 2
        draw.text((8, middle), center, fill=255, font=font, anchor="lm")
