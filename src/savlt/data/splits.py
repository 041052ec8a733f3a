"""Train/val/test splits of the training center and few-shot draws, stored as JSON.

Paths in split files are relative to the center folder (``images/cyst/a.png``), so a split travels
with the data; paths relative to ``<center>/images/`` (``cyst/a.png``, the published code's split
files, whose entries are ``[path, label, classname]``) are accepted too; a file name that is not
UTF-8 is written and read as ``savlt.io.plain_text`` writes it. Every path read from a file is
checked to stay inside the center folder and to be one of the scanned images, and is reported by
name otherwise.

By patient (``by_patient``): the scans of one patient (``ImageRecord.patient_id``: the patient, else
the volume, else the scan) stay together in one part, and the K shots of a class are spread over as
many patients as it has. When no patient has more than one scan, both are exactly the per-image
split and draw.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from savlt.data.discover import CenterData, DataError, ImageRecord
from savlt.io import name_from_text, read_text

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
# K shots may exceed the largest class's training images at most this many times (drawn with repeats).
MAX_REPEAT = 4


@dataclass(frozen=True)
class Protocol:
    """How a few-shot draw is made (``protocol`` in the configuration): the validation scans per
    class, and whether the K × C training shots follow the class distribution (``balanced=False``)."""

    name: str
    val_cap: int  # validation scans per class: min(K, val_cap)
    balanced: bool
    summary: str


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("standard", 16, True, "K scans per class; validation min(K, 16) per class"),
        Protocol(
            "coop", 4, True, "K scans per class; validation min(K, 4) per class (CoOp's few-shot validation)"
        ),
        Protocol(
            "realistic",
            0,
            False,
            "K × C scans drawn from the training part's class distribution (or at the stated imbalance "
            "ratio), at least one per class; no validation set, so nothing is selected or calibrated on one",
        ),
    )
}


@dataclass
class Split:
    center: str
    train: list[str]
    val: list[str]
    test: list[str]
    source: str  # how it was made, e.g. "ratio 0.45/0.15/0.40 seed 0" or the split file's path
    # The patients of each part ({"by": ..., "train": [...], ...}), recorded when patients are known.
    patients: dict[str, Any] | None = None

    def part(self, name: str) -> list[str]:
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        data = {"center": self.center, "source": self.source, **{p: self.part(p) for p in PARTS}}
        return data if self.patients is None else {**data, "patients": self.patients}


@dataclass
class FewShot:
    center: str
    shots: int
    seed: int
    train: list[str]  # may repeat a path when a class has fewer than `shots` images
    val: list[str]
    protocol: str = "standard"  # a key of PROTOCOLS
    # Where the lists came from when not SAVLT's own draw (the published sampler, an imported file).
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "center": self.center,
            "shots": self.shots,
            "seed": self.seed,
            "protocol": self.protocol,
            "train": self.train,
            "val": self.val,
        }
        return data if self.source is None else {**data, "source": self.source}


def _by_class(records: list[ImageRecord]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.rel):
        groups[record.label].append(record.rel)
    return dict(sorted(groups.items()))


def has_groups(records: list[ImageRecord]) -> bool:
    """Whether some patient (or volume) has more than one scan, so that splitting by patient
    differs from splitting by image."""
    return len({r.patient_id for r in records}) < len(records)


def _strata(records: list[ImageRecord], by_patient: bool) -> dict[str, list[list[str]]]:
    """Per class (sorted by name), the groups of scans that stay together: one per patient (or,
    not `by_patient`, per scan), each sorted, in the order of their first scan. A patient with
    scans of several classes is filed, whole, under the class of most of its scans (a tie: the
    first class by name)."""
    members: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.rel):
        members[record.patient_id if by_patient else record.rel].append(record)
    strata: dict[str, list[list[str]]] = defaultdict(list)
    for scans in members.values():
        counts = Counter(r.label for r in scans)
        strata[min(counts, key=lambda c: (-counts[c], c))].append([r.rel for r in scans])
    return {label: sorted(groups) for label, groups in sorted(strata.items())}


def _cut(sizes: np.ndarray, target: int) -> int:
    """How many groups (of these cumulative sizes, from 0) come closest to `target` scans."""
    return int(np.argmin(np.abs(sizes - target)))


def _every_part(train_end: int, val_end: int, groups: int, ratios: list[float]) -> tuple[int, int]:
    """The cuts moved so that each part with a ratio above 0 gets at least one group, when there are
    enough groups."""
    wanted = [int(r > 0) for r in ratios]
    if groups < sum(wanted):
        return train_end, val_end
    train_end = min(max(train_end, wanted[0]), groups - wanted[1] - wanted[2])
    return train_end, min(max(val_end, train_end + wanted[1]), groups - wanted[2])


def ratio_split(center: CenterData, ratios: list[float], seed: int, by_patient: bool = True) -> Split:
    """Per class, shuffle the patients (seeded) and cut them into train/val/test as close to the
    given fractions of scans as whole patients allow, each part with a fraction above 0 getting at
    least one patient when the class has enough; every scan its own patient, or not `by_patient`:
    the images themselves, exactly as before patients were known."""
    rng = np.random.default_rng(seed)
    grouped = by_patient and has_groups(center.records)
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for label, groups in _strata(center.records, grouped).items():
        order = [groups[i] for i in rng.permutation(len(groups))]
        sizes = np.cumsum([0, *(len(g) for g in order)])
        n_train = int(round(ratios[0] * sizes[-1]))
        n_val = min(int(round(ratios[1] * sizes[-1])), int(sizes[-1]) - n_train)
        train_end = _cut(sizes, n_train)
        val_end = max(train_end, _cut(sizes, n_train + n_val))
        if grouped:  # whole patients: no part left empty for want of a fraction of a patient
            train_end, val_end = _every_part(train_end, val_end, len(groups), ratios)
        for part, chosen in zip(
            PARTS, (order[:train_end], order[train_end:val_end], order[val_end:]), strict=True
        ):
            parts[part] += [rel for group in chosen for rel in group]
        if train_end == 0:
            log.warning(
                "class %s of center %s has too few %s (%d) for a train part",
                label,
                center.name,
                "patients" if grouped else "images",
                len(groups),
            )
    ratio_text = "/".join(f"{r:.2f}" for r in ratios)
    return Split(
        center.name,
        sorted(parts["train"]),
        sorted(parts["val"]),
        sorted(parts["test"]),
        source=f"ratio {ratio_text} seed {seed}" + (" by patient" if grouped else ""),
    )


def patients_across_parts(split: Split, center: CenterData) -> dict[str, list[str]]:
    """The patients with scans in more than one part of `split` -> those parts."""
    records = center.by_rel()
    found: dict[str, set[str]] = defaultdict(set)
    for part in PARTS:
        for rel in split.part(part):
            found[records[rel].patient_id].add(part)
    return {p: [x for x in PARTS if x in parts] for p, parts in sorted(found.items()) if len(parts) > 1}


ACCEPT = "set data.split_by=image to accept it (recorded in metrics.json)"


def check_patients(
    split: Split, center: CenterData, by_patient: bool, what: str, fix: str = f"move them, or {ACCEPT}"
) -> dict[str, list[str]]:
    """The patients `split` (`what`: "split file X", …) puts in several parts. By patient that
    is an error naming the first of them and saying how to `fix` it; by image they are returned
    (the caller logs and records them)."""
    across = patients_across_parts(split, center)
    if not across or not by_patient:
        return across
    patient, parts = next(iter(across.items()))
    records = center.by_rel()
    examples = [next(r for r in split.part(part) if records[r].patient_id == patient) for part in parts[:2]]
    others = f" (and {len(across) - 1} other patient(s))" if len(across) > 1 else ""
    raise DataError(
        f"{what} puts patient {patient!r} of center {center.name} in both {parts[0]!r} and {parts[1]!r} "
        f"(e.g. {examples[0]} and {examples[1]}){others}: a patient's scans must stay in one part; {fix}"
    )


def record_patients(split: Split, center: CenterData, by: str) -> Split:
    """`split` with the patients of each part recorded (when the center's patients are known or it
    has volumes)."""
    if center.patient_source is None and not has_groups(center.records):
        return split
    records = center.by_rel()
    parts = {part: sorted({records[r].patient_id for r in split.part(part)}) for part in PARTS}
    split.patients = {"by": by, "source": center.patient_source, **parts}
    return split


def _checked_rel(raw: Any, center: CenterData, known: dict[str, ImageRecord], file: Path, part: str) -> str:
    if isinstance(raw, list | tuple) and raw:  # Dassl-style entries: [path, label, classname]
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise DataError(f"split file {file}: entry {raw!r} in {part!r} is not a path")
    text = name_from_text(raw).replace("\\", "/")
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
    text = read_text(file, "split file", DataError)
    try:
        data = json.loads(text)
    except ValueError as exc:
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


def _units(rels: list[str], records: dict[str, ImageRecord], by_patient: bool) -> list[list[str]]:
    """The scans `rels` (sorted) grouped by patient (or each alone), in the order of their first scan."""
    groups: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        groups[records[rel].patient_id if by_patient else rel].append(rel)
    return list(groups.values())


def _spread(rng: np.random.Generator, units: list[list[str]], k: int) -> list[str]:
    """k distinct scans (k at most the number of scans) spread over as many of the patients
    `units` as possible: k patients at random and one scan of each, or, with fewer patients than
    k, every patient in turn (a random order) until k scans are drawn. Singletons draw exactly
    ``rng.choice(len(units), k, replace=False)``."""
    if len(units) >= k:
        chosen = [units[i] for i in rng.choice(len(units), size=k, replace=False)]
        return [u[0] if len(u) == 1 else u[int(rng.integers(len(u)))] for u in chosen]
    shuffled = [
        u if len(u) == 1 else [u[i] for i in rng.permutation(len(u))]
        for u in (units[i] for i in rng.permutation(len(units)))
    ]
    rounds = [u[depth] for depth in range(max(map(len, shuffled))) for u in shuffled if depth < len(u)]
    return rounds[:k]


def sample_few_shot(
    split: Split,
    center: CenterData,
    shots: int,
    seed: int,
    by_patient: bool = True,
    protocol: str = "standard",
    imbalance: float | None = None,
) -> FewShot:
    """The few-shot draw of `protocol` (``PROTOCOLS``). Balanced: K images per class from train
    (when a class has fewer: all of them, then repeats, and a warning). Realistic: K × C images
    whose classes follow the training part (or, with `imbalance` r, class sizes falling
    geometrically from the largest class to r times fewer), at least one per class, K × C capped at
    the training part's size. Validation: min(K, the protocol's cap) per class. Every class's scans are spread over as
    many patients as it has (not `by_patient`: drawn per image)."""
    rule = PROTOCOLS[protocol]
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
    wanted = (
        dict.fromkeys(groups, shots)
        if rule.balanced
        else _imbalanced_counts(rng, {label: len(rels) for label, rels in groups.items()}, shots, imbalance)
    )
    train: list[str] = []
    val: list[str] = []
    for label, rels in groups.items():
        k = wanted[label]
        if len(rels) < k:
            log.warning(
                "class %s of center %s has %d training images, fewer than %d shots: drawing with replacement",
                label,
                center.name,
                len(rels),
                k,
            )
            # every image once, then repeats to reach K
            picks = [*range(len(rels)), *rng.choice(len(rels), size=k - len(rels), replace=True).tolist()]
            train += [rels[i] for i in picks]
        else:
            train += _spread(rng, _units(rels, records, by_patient), k)
    val_k = min(shots, rule.val_cap)
    for _, rels in _by_class([records[r] for r in split.val]).items() if val_k else ():
        val += sorted(_spread(rng, _units(rels, records, by_patient), min(val_k, len(rels))))
    return FewShot(center.name, shots, seed, train, val, protocol)


def sample_published(
    split: Split, center: CenterData, shots: int, seed: int, protocol: str = "standard"
) -> FewShot:
    """The published code's draw (Dassl's ``generate_fewshot_dataset``), per image: Python's
    ``random`` seeded with `seed`; the split's training scans in the split's order, grouped by class
    in the order the classes first appear; per class ``sample(scans, K)``, or ``choices(scans, k=K)``
    (repeats) when the class has fewer than K; then the validation scans the same way with
    min(K, the protocol's cap), from the same random state. A balanced protocol only (checked by
    the configuration)."""
    rng = random.Random(seed)
    records = center.by_rel()

    def draw(rels: list[str], k: int, part: str) -> list[str]:
        groups: dict[str, list[str]] = defaultdict(list)
        for rel in rels:
            groups[records[rel].label].append(rel)
        drawn: list[str] = []
        for label, scans in groups.items():
            if len(scans) < k:
                log.warning(
                    "class %s of center %s has %d %s images, fewer than %d: drawing with repeats",
                    label,
                    center.name,
                    len(scans),
                    part,
                    k,
                )
            drawn += rng.sample(scans, k) if len(scans) >= k else rng.choices(scans, k=k)
        return drawn

    train = draw(split.train, shots, "training")
    val = draw(split.val, min(shots, PROTOCOLS[protocol].val_cap), "validation")
    source = f"published sampler (Dassl's generate_fewshot_dataset, Python's random) seed {seed}"
    return FewShot(center.name, shots, seed, train, val, protocol, source)


def _imbalanced_counts(
    rng: np.random.Generator, sizes: dict[str, int], shots: int, imbalance: float | None
) -> dict[str, int]:
    """Shots per class summing to K × C (at most the training part's size), at least one per class:
    the rest drawn without replacement from the training part's scans (`imbalance` None), or K × C
    shared out in proportion to r^(−i/(C−1)), the i-th largest class of the training part (ties by
    name) getting share i."""
    labels = list(sizes)
    total = min(shots * len(labels), sum(sizes.values()))
    counts = dict.fromkeys(labels, 1)
    if imbalance is None:
        pool = np.repeat(np.arange(len(labels)), [sizes[label] - 1 for label in labels])
        for i in rng.choice(pool, size=total - len(labels), replace=False):
            counts[labels[i]] += 1
        return counts
    order = sorted(labels, key=lambda label: (-sizes[label], label))  # the largest class the most shots
    weights = imbalance ** (-np.arange(len(order)) / max(len(order) - 1, 1))
    share = total * weights / weights.sum()
    shares = np.maximum(1, np.floor(share)).astype(int)
    while shares.sum() < total:  # to the class furthest below its share
        shares[int(np.argmax(share - shares))] += 1
    while shares.sum() > total:  # from the class furthest above its share, keeping one each
        shares[int(np.argmax(np.where(shares > 1, shares - share, -np.inf)))] -= 1
    return {label: int(n) for label, n in zip(order, shares, strict=True)}


def load_few_shot(file: Path, center: CenterData) -> FewShot:
    text = read_text(file, "few-shot file", DataError)
    try:
        data = json.loads(text)
        entries = {p: list(data[p]) for p in ("train", "val")}
        shots, seed = int(data["shots"]), int(data["seed"])
        protocol = str(data.get("protocol", "standard"))  # files written before protocols existed
        source = data.get("source")
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a few-shot list
        raise DataError(f"few-shot file {file} is corrupt ({type(exc).__name__}: {exc})") from None
    known = center.by_rel()
    lists = {p: [_checked_rel(e, center, known, file, p) for e in entries[p]] for p in entries}
    if protocol not in PROTOCOLS:
        raise DataError(
            f"few-shot file {file} names protocol {protocol!r}, not one of {', '.join(PROTOCOLS)}"
        )
    if source is not None and not isinstance(source, str):
        raise DataError(f"few-shot file {file}: 'source' must be a text, not {source!r}")
    return FewShot(center.name, shots, seed, lists["train"], lists["val"], protocol, source)
