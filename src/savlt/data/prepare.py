"""The training center's split and few-shot draw for a configuration, cached as JSON.

The cache (``<root>/.savlt`` by default) keeps the test set fixed even when images are added to
the data later; it is skipped with a warning when the data root is read-only. Every run folder
gets its own copy too, so a run never depends on the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from savlt.data.discover import CenterData, DataError
from savlt.data.splits import FewShot, Split, load_few_shot, load_split, ratio_split, sample_few_shot
from savlt.io import OutputError, writable_folder, write_json

log = logging.getLogger(__name__)


def cache_folder(root: str | Path | None, cache_dir: str | Path | None = None) -> Path | None:
    """The writable cache folder (`cache_dir`, else ROOT/.savlt), or None (with a warning) when
    there is none."""
    folder = Path(cache_dir) if cache_dir else Path(root or ".") / ".savlt"
    try:
        writable_folder(folder, "cache folder")
    except OutputError:
        log.warning("cache folder %s is not writable: splits are not cached (set data.cache_dir)", folder)
        return None
    return folder


def _digest(split: Split) -> str:
    text = json.dumps([split.train, split.val, split.test])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def resolve_split(
    center: CenterData,
    cache: Path | None,
    ratios: Sequence[float],
    seed: int,
    split_file: str | Path | None = None,
) -> Split:
    """The user's split file, else the cached ratio split, else a new ratio split (then cached)."""
    if split_file:
        return load_split(split_file, center)
    ratio_text = "-".join(f"{round(r * 100)}" for r in ratios)
    cached = cache / f"split_{center.name}_r{ratio_text}_seed{seed}.json" if cache else None
    if cached is not None and cached.is_file():
        try:
            split = load_split(cached, center)
        except DataError as exc:
            raise DataError(
                f"{exc}. This is the cached split (corrupt, or the data changed since it was made): "
                f"delete {cached} to split the data again"
            ) from None
        listed = set(split.train) | set(split.val) | set(split.test)
        new = [r.rel for r in center.records if r.rel not in listed]
        if new:
            log.warning(
                "%d images of center %s (e.g. %s) are not in the cached split %s and are not used; "
                "delete it to re-split",
                len(new),
                center.name,
                new[0],
                cached,
            )
        return split
    split = ratio_split(center, list(ratios), seed)
    if cached is not None:
        write_json(cached, split.to_json())
    return split


def resolve_few_shot(split: Split, center: CenterData, shots: int, seed: int, cache: Path | None) -> FewShot:
    """The seeded K-shot draw from `split`, read from the cache when it was drawn before."""
    cached = cache / f"fewshot_{center.name}_{_digest(split)}_k{shots}_seed{seed}.json" if cache else None
    if cached is not None and cached.is_file():
        try:
            return load_few_shot(cached, center)
        except DataError as exc:  # the draw is a function of the split and the seed: draw it again
            log.warning("%s; drawing it again", exc)
    few = sample_few_shot(split, center, shots, seed)
    if cached is not None:
        write_json(cached, few.to_json())
    return few
