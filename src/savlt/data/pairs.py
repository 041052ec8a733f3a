"""Image–text pairs for contrastive pretraining: a pairs CSV, or a data root with class folders.

A pairs CSV has the columns ``file`` (a path relative to the CSV's folder) and ``text`` (a report
sentence or caption); other columns are ignored. A data root (``ROOT/<center>/images/<class>/…``)
gives every scan its class's description as caption. Every row is checked before training: a
missing column or an empty text is an error naming the row; missing or unreadable images are
collected and reported all at once.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from savlt.classes import ClassMap
from savlt.data.discover import DataError, scan_data
from savlt.data.imageio import read_image
from savlt.data.quality import check_scans
from savlt.io import name_from_text, read_text

# Listed in an error about unreadable images; the log has them all.
LISTED = 10


@dataclass(frozen=True)
class Pair:
    path: Path
    text: str


def read_pairs_csv(file: Path) -> list[Pair]:
    """The rows of a pairs CSV, checked for columns, empty texts and paths that leave its folder."""
    text = read_text(file, "pairs file", DataError)
    try:
        with io.StringIO(text, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in ("file", "text") if c not in columns]
            if missing:
                raise DataError(
                    f"pairs file {file} lacks the column(s) {', '.join(missing)} (it has: "
                    f"{', '.join(columns) or 'none'}); the header must name file and text"
                )
            rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"cannot read pairs file {file}: {exc}") from None
    root = file.parent.resolve()
    pairs = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        name, text = (row.get("file") or "").strip(), (row.get("text") or "").strip()
        if not name:
            raise DataError(f"pairs file {file}, line {number}: the file column is empty")
        if not text:
            raise DataError(f"pairs file {file}, line {number}: the text of {name} is empty")
        path = (root / name_from_text(name)).resolve()
        if not path.is_relative_to(root):
            raise DataError(f"pairs file {file}, line {number}: {name} lies outside the file's folder {root}")
        pairs.append(Pair(path, text))
    if not pairs:
        raise DataError(f"pairs file {file} holds no rows")
    return pairs


def pairs_from_root(root: Path, class_map: ClassMap, descriptions: dict[str, str]) -> list[Pair]:
    """Every scan of every center under a data root, captioned with its class's description."""
    scan = scan_data(root, class_map)
    return [Pair(r.path, descriptions[r.label]) for c in scan.centers.values() for r in c.records]


def load_pairs(
    source: str | Path, class_map: ClassMap, descriptions: dict[str, str], progress: bool = True
) -> list[Pair]:
    """Pairs from a CSV file or a data root, every image decoded once (all failures listed)."""
    source = Path(source)
    if source.is_dir():
        pairs = pairs_from_root(source, class_map, descriptions)
    elif source.is_file():
        pairs = read_pairs_csv(source)
    else:
        raise DataError(f"pairs source {source} does not exist: give a pairs CSV (file, text) or a data root")
    checks = check_scans([(p.path, None) for p in pairs], progress=progress, desc="checking pairs")
    bad = [c for c in checks if c.problem is not None]
    if bad:
        shown = "; ".join(c.problem.message for c in bad[:LISTED])
        more = f" (and {len(bad) - LISTED} more)" if len(bad) > LISTED else ""
        raise DataError(f"{len(bad)} of {len(pairs)} pair images cannot be used: {shown}{more}")
    return pairs


def split_pairs(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a seeded random share of the pairs is held out (at least one each)."""
    if len(pairs) < 4:
        raise DataError(f"{len(pairs)} pairs are too few to pretrain: at least 4 are needed")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = min(len(pairs) - 2, max(2, round(val_fraction * len(pairs))))
    held = sorted(order[:n_val].tolist())
    kept = sorted(order[n_val:].tolist())
    return [pairs[i] for i in kept], [pairs[i] for i in held]


class PairDataset(Dataset[tuple[torch.Tensor, int]]):
    """Items are (image float 3×S×S, pair index); index with ``(index, seed)`` to fix the
    augmentation of that draw, as ``OCTDataset``."""

    def __init__(self, pairs: Sequence[Pair], transform: A.Compose) -> None:
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            self.transform.set_random_seed(seed)
        image = read_image(self.pairs[index].path)
        return self.transform(image=image)["image"], index
