"""The training center's split and few-shot draw for a configuration, cached as JSON.

The cache (``<root>/.savlt`` by default) keeps the test set fixed even when images are added to
the data later; it is skipped with a warning when the data root is read-only. Every run folder
gets its own copy too, so a run never depends on the cache.

With ``split_by="patient"`` (the default) a split never puts one patient in two parts: one read from
a file (the user's, or a cached one made before the patients were known) that does is refused,
naming the patient; with ``"image"`` it is accepted with a warning. When patients group scans, the
cache names end in ``_patients``, so a split by image is never taken for one by patient; a draw of
the published sampler ends in ``_published``, so the two samplers' draws are never mixed either.

A given few-shot file (``data.fewshot_file``: ``savlt fewshot import``'s, or a run's
``fewshot.json``) replaces the draw; it must have been drawn from this split (its training and
validation scans in the split's train and val parts), with K = ``train.shots`` and the run's protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from savlt.data.discover import CenterData, DataError
from savlt.data.splits import (
    ACCEPT,
    PARTS,
    FewShot,
    Split,
    check_patients,
    has_groups,
    load_few_shot,
    load_split,
    ratio_split,
    record_patients,
    sample_few_shot,
    sample_published,
)
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


def _suffix(center: CenterData, split_by: str) -> str:
    return "_patients" if split_by == "patient" and has_groups(center.records) else ""


def resolve_split(
    center: CenterData,
    cache: Path | None,
    ratios: Sequence[float],
    seed: int,
    split_file: str | Path | None = None,
    split_by: str = "patient",
) -> Split:
    """The user's split file, else the cached ratio split, else a new ratio split (then cached);
    with the patients of each part recorded (see the module's docstring for `split_by`)."""
    by_patient = split_by == "patient"
    if split_file:
        split = load_split(split_file, center)
        check_patients(split, center, by_patient, f"split file {split_file}")
        return record_patients(split, center, split_by)
    ratio_text = "-".join(f"{round(r * 100)}" for r in ratios)
    name = f"split_{center.name}_r{ratio_text}_seed{seed}{_suffix(center, split_by)}.json"
    cached = cache / name if cache else None
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
        fix = f"it was made before these patients were known: delete it to split again, or {ACCEPT}"
        check_patients(split, center, by_patient, f"the cached split {cached}", fix)
        return record_patients(split, center, split_by)
    split = record_patients(ratio_split(center, list(ratios), seed, by_patient), center, split_by)
    if cached is not None:
        write_json(cached, split.to_json())
    return split


def given_few_shot(file: str | Path, split: Split, center: CenterData, shots: int, protocol: str) -> FewShot:
    """The few-shot file `file` (``data.fewshot_file``), checked against the run: K, the protocol,
    and every scan in the part of `split` it is drawn from (a training shot in the test part would
    be scored as unseen)."""
    few = load_few_shot(Path(file), center)
    if few.shots != shots:
        raise DataError(
            f"few-shot file {file} holds a {few.shots}-shot draw but train.shots is {shots}: "
            f"run with --shots {few.shots}"
        )
    if few.protocol != protocol:
        raise DataError(
            f"few-shot file {file} was drawn for protocol {few.protocol} but the run's protocol is "
            f"{protocol}: set protocol={few.protocol}"
        )
    for part, rels in (("train", few.train), ("val", few.val)):
        allowed = set(split.part(part))
        outside = [rel for rel in rels if rel not in allowed]
        if outside:
            found = next((p for p in PARTS if outside[0] in split.part(p)), None)
            where = f"in the split's {found!r} part" if found else "in no part of the split"
            raise DataError(
                f"few-shot file {file}: {outside[0]} in {part!r} is {where} ({split.source}), "
                f"not in its {part!r} part ({len(set(outside))} such scan(s)): give the split it was "
                "drawn from as data.split_file"
            )
    return few


def resolve_few_shot(
    split: Split,
    center: CenterData,
    shots: int,
    seed: int,
    cache: Path | None,
    split_by: str = "patient",
    protocol: str = "standard",
    imbalance: float | None = None,
    sampler: str = "savlt",
    fewshot_file: str | Path | None = None,
) -> FewShot:
    """The given few-shot file (`fewshot_file`, checked by ``given_few_shot``), else the seeded
    K-shot draw of `protocol` from `split` by `sampler` (``savlt``: spread over patients unless
    ``split_by="image"``; ``published``: ``sample_published``), read from the cache when it was
    drawn before."""
    if fewshot_file:
        return given_few_shot(fewshot_file, split, center, shots, protocol)
    drawn = (
        "" if protocol == "standard" else f"_{protocol}" + ("" if imbalance is None else f"_r{imbalance:g}")
    ) + ("" if sampler == "savlt" else f"_{sampler}")
    name = (
        f"fewshot_{center.name}_{_digest(split)}_k{shots}_seed{seed}{drawn}{_suffix(center, split_by)}.json"
    )
    cached = cache / name if cache else None
    if cached is not None and cached.is_file():
        try:
            return load_few_shot(cached, center)
        except DataError as exc:  # the draw is a function of the split and the seed: draw it again
            log.warning("%s; drawing it again", exc)
    few = (
        sample_published(split, center, shots, seed, protocol)
        if sampler == "published"
        else sample_few_shot(split, center, shots, seed, split_by == "patient", protocol, imbalance)
    )
    if cached is not None:
        write_json(cached, few.to_json())
    return few
