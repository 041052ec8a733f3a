"""The images a segmenter learns from: every scan that has a tissue mask, loaded once and resized.

All pairs are decoded and checked up front (a bad mask fails before the first epoch, naming the
file), then kept in memory at the network's input size, so an epoch never touches the disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from savlt.data.discover import DataError, DatasetScan, ImageRecord
from savlt.data.imageio import read_image, read_mask
from savlt.seg.model import resize_image, resize_mask

log = logging.getLogger(__name__)


def masked_records(scan: DatasetScan) -> list[ImageRecord]:
    """Records with a mask; those without are counted in one log line, none at all is an error."""
    records = [r for c in scan.centers.values() for r in c.records]
    masked = [r for r in records if r.mask_path is not None]
    names = ", ".join(scan.centers)
    if not masked:
        missing = [str(c.root / "masks") for c in scan.centers.values() if not (c.root / "masks").is_dir()]
        where = f"; missing mask folders: {', '.join(missing)}" if missing else ""
        raise DataError(
            f"no image under {scan.root} (centers: {names}) has a tissue mask; expected "
            f"<center>/masks/<class>/<image stem>.png beside <center>/images/<class>/{where}"
        )
    if len(masked) < len(records):
        log.info(
            "skipped %d of %d images without a mask (centers: %s); %d image(s) with masks remain",
            len(records) - len(masked),
            len(records),
            names,
            len(masked),
        )
    return masked


@dataclass
class PairArrays:
    images: np.ndarray  # uint8 (N, H, W, 3) at the network's input size
    masks: np.ndarray  # bool (N, H, W)


def load_pairs(records: list[ImageRecord], size: tuple[int, int], progress: bool = True) -> PairArrays:
    """Decode, check (mask size and values, by file) and resize every image/mask pair."""
    images = np.empty((len(records), *size, 3), dtype=np.uint8)
    masks = np.empty((len(records), *size), dtype=bool)
    for i, record in enumerate(tqdm(records, desc="loading masked images", unit="img", disable=not progress)):
        image = read_image(record.path)
        mask = read_mask(record.mask_path, image.shape[:2])  # type: ignore[arg-type]  # masked records only
        images[i] = resize_image(image, size)
        masks[i] = resize_mask(mask, size)
    return PairArrays(images, masks)
