"""Train/val/test splits of the training center and few-shot draws, stored as JSON.

Paths in split files are relative to the center folder (``images/cyst/a.png``), so a split travels
with the data; paths relative to ``<center>/images/`` (``cyst/a.png``, the published code's split
files, whose entries are ``[path, label, classname]``) are accepted too. Every path read from a file is checked to stay inside the center folder and to be
one of the scanned images, and is reported by name otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from savlt.data.discover import CenterData, DataError, ImageRecord

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
VAL_CAP = 16
# K shots may exceed the largest class's training images at most this many times (drawn with repeats).
MAX_REPEAT = 4


@dataclass
class Split:
    center: str
    train: list[str]
    val: list[str]
    test: list[str]
    source: str  # how it was made, e.g. "ratio 0.45/0.15/0.40 seed 0" or the split file's path

    def part(self, name: str) -> list[str]:
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        return {"center": self.center, "source": self.source, **{p: self.part(p) for p in PARTS}}


@dataclass
class FewShot:
    center: str
    shots: int
    seed: int
    train: list[str]  # may repeat a path when a class has fewer than `shots` images
    val: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "center": self.center,
            "shots": self.shots,
            "seed": self.seed,
            "train": self.train,
            "val": self.val,
        }


def _by_class(records: list[ImageRecord]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.rel):
        groups[record.label].append(record.rel)
    return dict(sorted(groups.items()))


def ratio_split(center: CenterData, ratios: list[float], seed: int) -> Split:
    """Per class, shuffle (seeded) and cut into train/val/test by the given fractions."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for label, rels in _by_class(center.records).items():
        order = [rels[i] for i in rng.permutation(len(rels))]
        n_train = int(round(ratios[0] * len(order)))
        n_val = min(int(round(ratios[1] * len(order))), len(order) - n_train)
        parts["train"] += order[:n_train]
        parts["val"] += order[n_train : n_train + n_val]
        parts["test"] += order[n_train + n_val :]
        if n_train == 0:
            log.warning(
                "class %s of center %s has too few images (%d) for a train part",
                label,
                center.name,
                len(rels),
            )
    ratio_text = "/".join(f"{r:.2f}" for r in ratios)
    return Split(
        center.name,
        sorted(parts["train"]),
        sorted(parts["val"]),
        sorted(parts["test"]),
        source=f"ratio {ratio_text} seed {seed}",
    )


def _checked_rel(raw: Any, center: CenterData, known: dict[str, ImageRecord], file: Path, part: str) -> str:
    if isinstance(raw, list | tuple) and raw:  # Dassl-style entries: [path, label, classname]
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise DataError(f"split file {file}: entry {raw!r} in {part!r} is not a path")
    text = raw.replace("\\", "/")
    if PurePosixPath(text).is_absolute() or os.path.isabs(raw):
        raise DataError(
            f"split file {file}: path {raw!r} in {part!r} must be relative to the center folder {center.root}"
        )
    root = center.root.resolve()
    resolved = (root / text).resolve()
    if not resolved.is_relative_to(root):
        raise DataError(
            f"split file {file}: path {raw!r} in {part!r} escapes the center folder {center.root}"
        )
    rel = resolved.relative_to(root).as_posix()
    below_images = (root / "images" / text).resolve()
    if rel not in known and below_images.is_relative_to(root / "images"):
        # the published code's split files list paths relative to <center>/images/
        alternative = below_images.relative_to(root).as_posix()
        rel = alternative if alternative in known else rel
    if rel not in known:
        reason = "does not exist" if not resolved.exists() else "is not an image of a known class folder"
        raise DataError(f"split file {file}: path {raw!r} in {part!r} {reason} (under {center.root})")
    return rel


def load_split(file: str | Path, center: CenterData) -> Split:
    """Read a user split JSON ({"train": [...], "val": [...], "test": [...]}) and check every path."""
    file = Path(file)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"split file {file} does not exist") from None
    except ValueError as exc:  # not JSON, or not text at all
        raise DataError(f"split file {file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(p, []), list) for p in PARTS):
        raise DataError(f"split file {file} must be an object with lists 'train', 'val' and 'test'")
    if not data.get("train"):
        raise DataError(f"split file {file} has no 'train' entries")
    known = center.by_rel()
    parts = {p: [_checked_rel(e, center, known, file, p) for e in data.get(p, [])] for p in PARTS}
    seen: dict[str, str] = {}
    for part, rels in parts.items():
        for rel in rels:
            if seen.setdefault(rel, part) != part:
                raise DataError(f"split file {file}: {rel} is listed in both {seen[rel]!r} and {part!r}")
    return Split(center.name, parts["train"], parts["val"], parts["test"], source=str(file))


def sample_few_shot(split: Split, center: CenterData, shots: int, seed: int) -> FewShot:
    """K images per class from train (when a class has fewer: all of them, then repeats, and a warning),
    and min(K, 16) per class from val."""
    records = center.by_rel()
    groups = _by_class([records[r] for r in split.train])
    largest = max((len(rels) for rels in groups.values()), default=0)
    if shots > MAX_REPEAT * largest:
        counts = ", ".join(f"{label} {len(rels)}" for label, rels in groups.items()) or "none"
        raise DataError(
            f"train.shots={shots} is more than {MAX_REPEAT}× the largest class in the training part of "
            f"center {center.name} (training images per class: {counts}): use --shots "
            f"{MAX_REPEAT * largest} or fewer, or add images"
        )
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    for label, rels in groups.items():
        if len(rels) < shots:
            log.warning(
                "class %s of center %s has %d training images, fewer than %d shots: drawing with replacement",
                label,
                center.name,
                len(rels),
                shots,
            )
            # every image once, then repeats to reach K
            picks = [*range(len(rels)), *rng.choice(len(rels), size=shots - len(rels), replace=True).tolist()]
        else:
            picks = rng.choice(len(rels), size=shots, replace=False).tolist()
        train += [rels[i] for i in picks]
    val_k = min(shots, VAL_CAP)
    for _, rels in _by_class([records[r] for r in split.val]).items():
        val += [rels[i] for i in sorted(rng.choice(len(rels), size=min(val_k, len(rels)), replace=False))]
    return FewShot(center.name, shots, seed, train, val)


def load_few_shot(file: Path, center: CenterData) -> FewShot:
    try:
        data = json.loads(Path(file).read_text())
        entries = {p: list(data[p]) for p in ("train", "val")}
        shots, seed = int(data["shots"]), int(data["seed"])
    except FileNotFoundError:
        raise DataError(f"few-shot file {file} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a few-shot list
        raise DataError(f"few-shot file {file} is corrupt ({type(exc).__name__}: {exc})") from None
    known = center.by_rel()
    lists = {p: [_checked_rel(e, center, known, file, p) for e in entries[p]] for p in entries}
    return FewShot(center.name, shots, seed, lists["train"], lists["val"])
