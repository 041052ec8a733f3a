"""The published code's few-shot pickle (``split_fewshot/shot_K-seed_S.pkl``, ``{"train": [Datum,
...], "val": [...]}``), read without running anything in it and turned into SAVLT's few-shot JSON.

A pickle can call any function when it is loaded. This one is read by an unpickler that knows a
single global, Dassl's ``Datum`` record, which it rebuilds as ``Datum`` below (Dassl is never
imported); any other global is refused before it is looked up, so nothing named in the file runs.
Containers, texts and numbers come from the pickle's own opcodes.

Each entry's image path is absolute on the authors' machine; it is matched to a scan of the
training center by the longest run of trailing path components (file name, class folder,
``images``, …) that some scan's path below the center folder ends with, which must name exactly
one scan. The entry's class must be the class SAVLT files that scan under (aliases included), and
its label must stand for one class throughout the file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import Counter, defaultdict
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any

from savlt.classes import ClassMap, UnknownClassError
from savlt.data.discover import CenterData, DataError
from savlt.data.splits import PROTOCOLS, FewShot
from savlt.io import OutputError, check_outside_data, read_manifest, writable_file, write_json

# Where Dassl defines its record (and the package that re-exports it).
DATUM_GLOBALS = {("dassl.data.datasets.base_dataset", "Datum"), ("dassl.data.datasets", "Datum")}
PUBLISHED_NAME = re.compile(r"shot_(\d+)-seed_(\d+)\.pkl")
# Problem entries named in an error before the rest are counted.
NAMED = 3
# What a truncated or corrupt pickle raises from its opcodes (nothing in it is ever called).
CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
    MemoryError,
)


class Datum:
    """One entry of the published pickle: Dassl's ``Datum`` rebuilt from its pickled state (its
    fields only; a field that is missing or of the wrong type stays None and is reported)."""

    impath: str | None = None
    label: int | None = None
    classname: str | None = None

    def __setstate__(self, state: Any) -> None:
        fields = state if isinstance(state, dict) else {}
        impath, label, classname = fields.get("_impath"), fields.get("_label"), fields.get("_classname")
        self.impath = impath if isinstance(impath, str) and impath else None
        self.label = label if isinstance(label, int) and not isinstance(label, bool) else None
        self.classname = classname if isinstance(classname, str) else None


class _DatumOnly(pickle.Unpickler):
    def __init__(self, data: bytes, file: Path) -> None:
        super().__init__(BytesIO(data))
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DATUM_GLOBALS:
            return Datum
        raise DataError(
            f"published few-shot pickle {self.file} refers to {module}.{name}, not Dassl's Datum record: "
            "refused and nothing in it was run (only the published code's few-shot pickles are read)"
        )


def read_published_pickle(file: str | Path) -> dict[str, list[tuple[str, int, str]]]:
    """The train and val lists of a published few-shot pickle, each entry (image path, label,
    class name) as the published split files list them; a missing, corrupt or foreign file is a
    DataError naming it."""
    path = Path(file)
    what = f"published few-shot pickle {path}"
    if path.is_dir():
        raise DataError(f"{what} is a directory, not a file: give the .pkl file's path")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} not found") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} ({exc.strerror or exc})") from None
    try:
        loaded = _DatumOnly(data, path).load()
    except DataError:  # a refused global (a ValueError too, so caught before CORRUPT)
        raise
    except CORRUPT as exc:
        raise DataError(
            f"{what} is truncated or not a pickle ({type(exc).__name__}: {exc}): copy it again from "
            "the published code's split_fewshot/ folder"
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(loaded.get(p), list) for p in ("train", "val")):
        raise DataError(f"{what} is not a few-shot pickle: it must hold {{'train': [...], 'val': [...]}}")
    lists: dict[str, list[tuple[str, int, str]]] = {}
    for part in ("train", "val"):
        lists[part] = []
        for i, entry in enumerate(loaded[part]):
            if not isinstance(entry, Datum):
                raise DataError(f"{what}: {part}[{i}] is a {type(entry).__name__}, not a Datum record")
            if entry.impath is None or entry.label is None or entry.classname is None:
                raise DataError(
                    f"{what}: {part}[{i}] lacks an image path, an integer label or a class name "
                    "(_impath, _label, _classname)"
                )
            lists[part].append((entry.impath, entry.label, entry.classname))
    return lists


def _suffixes(center: CenterData) -> dict[tuple[str, ...], list[str]]:
    """Every run of trailing path components of the center's scan files -> the scans ending so
    (a page of a multi-page volume has no path of its own and is left out)."""
    index: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for record in center.records:
        if record.page is None:
            parts = PurePosixPath(record.rel).parts
            for n in range(1, len(parts) + 1):
                index[parts[-n:]].append(record.rel)
    return index


def _scans_of(impath: str, index: dict[tuple[str, ...], list[str]]) -> list[str]:
    """The scans the longest matching run of trailing components of `impath` names."""
    parts = [p for p in impath.replace("\\", "/").split("/") if p not in ("", ".")]
    for n in range(len(parts), 0, -1):
        if tuple(parts[-n:]) in index:
            return index[tuple(parts[-n:])]
    return []


def _refuse(file: Path, problem: str, entries: list[str], fix: str) -> None:
    if entries:
        more = f" and {len(entries) - NAMED} more" if len(entries) > NAMED else ""
        raise DataError(
            f"published few-shot pickle {file}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
            f"{problem}: {'; '.join(entries[:NAMED])}{more}: {fix}"
        )


def _matched(
    file: Path, loaded: dict[str, list[tuple[str, int, str]]], center: CenterData, class_map: ClassMap
) -> dict[str, list[str]]:
    """part -> the scans (relative to the center folder) its entries name, every entry checked."""
    index, records = _suffixes(center), center.by_rel()
    lists: dict[str, list[str]] = {"train": [], "val": []}
    unmatched: list[str] = []
    several: list[str] = []
    wrong: list[str] = []
    by_label: dict[int, tuple[str, str]] = {}  # label -> (its class, the entry that showed it)
    by_class: dict[str, tuple[int, str]] = {}  # class -> (its label, the entry that showed it)
    for part, entries in loaded.items():
        for i, (impath, label, classname) in enumerate(entries):
            where = f"{part}[{i}] {impath!r}"
            scans = _scans_of(impath, index)
            if not scans:
                unmatched.append(where)
                continue
            if len(scans) > 1:
                several.append(f"{where} ({' or '.join(scans[:2])})")
                continue
            rel = scans[0]
            try:
                named = class_map.resolve(classname)
            except UnknownClassError:
                named = None
            known_class, shown = by_label.setdefault(label, (records[rel].label, where))
            known_label, first = by_class.setdefault(records[rel].label, (label, where))
            if named != records[rel].label:
                wrong.append(
                    f"{where} is class {classname!r}, but SAVLT files {rel} under {records[rel].label!r}"
                )
            elif known_class != named:
                wrong.append(
                    f"{where} has label {label} for {named!r}, which {shown} has for {known_class!r}"
                )
            elif known_label != label:
                wrong.append(
                    f"{where} has label {label} for {named!r}, which {first} has as label {known_label}"
                )
            lists[part].append(rel)
    where = f"of center {center.name} under {center.root}"
    _refuse(
        file,
        f"match no scan {where}",
        unmatched,
        "give the data root and training center the draw was made from (--data, --center)",
    )
    _refuse(
        file, f"match several scans {where}", several, "the path below the center folder must name one scan"
    )
    _refuse(
        file,
        "disagree with SAVLT's classes",
        wrong,
        "check that it is this data set's draw and how its class folders map (data.class_aliases)",
    )
    return lists


def import_published_few_shot(
    file: str | Path, center: CenterData, class_map: ClassMap, seed: int | None = None
) -> FewShot:
    """The published few-shot pickle `file` as a few-shot draw of `center`'s scans, in the file's
    order (training shots may repeat, as the published draw repeats a short class's scans). K is
    the number of training shots per class; the protocol is the one whose validation count,
    min(K, cap), every class has; the seed is `seed`, else the one the file name
    (``shot_K-seed_S.pkl``) gives. The file, with its SHA-256, is recorded as the source."""
    path = Path(file)
    loaded = read_published_pickle(path)
    lists = _matched(path, loaded, center, class_map)
    records = center.by_rel()
    train = Counter(records[rel].label for rel in lists["train"])
    if not train or len(set(train.values())) != 1:
        counts = ", ".join(f"{label} {n}" for label, n in sorted(train.items())) or "none"
        raise DataError(
            f"published few-shot pickle {path} is not a K-shot draw: its training shots per class are {counts}"
        )
    shots = next(iter(train.values()))
    named = PUBLISHED_NAME.fullmatch(path.name)
    if named and int(named[1]) != shots:
        raise DataError(
            f"published few-shot pickle {path} is named for {named[1]} shots but holds {shots} per class: "
            "check that it is the file its name says"
        )
    if seed is None:
        if not named:
            raise DataError(
                f"published few-shot pickle {path} is not named shot_K-seed_S.pkl, so its seed is unknown: "
                "give it with --seed"
            )
        seed = int(named[2])
    val = Counter(records[rel].label for rel in lists["val"])
    protocol = next(
        (
            rule.name
            for rule in PROTOCOLS.values()
            if rule.balanced and val == dict.fromkeys(train, min(shots, rule.val_cap))
        ),
        None,
    )
    if protocol is None:
        counts = ", ".join(f"{label} {n}" for label, n in sorted(val.items())) or "none"
        raise DataError(
            f"published few-shot pickle {path}: its validation scans per class ({counts}) are not "
            f"min(K, 16) or min(K, 4) of each of its {len(train)} classes (K = {shots})"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = f"published few-shot pickle {path.resolve()} (sha256 {digest})"
    return FewShot(center.name, shots, seed, lists["train"], lists["val"], protocol, source)


def is_few_shot_json(path: Path) -> bool:
    """Whether `path` is a few-shot JSON SAVLT wrote (a file, no link, with FewShot's fields)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"center", "shots", "seed", "protocol", "train", "val"} <= set(data)


def save_few_shot(path: str | Path, few: FewShot, data_root: str | Path | None) -> None:
    """Write `few` to `path`, refusing a place in the data root or in a SAVLT output folder, and
    any existing file but a few-shot JSON SAVLT wrote."""
    path = Path(path)
    what = "few-shot file (--out)"
    check_outside_data(path, [data_root], what, holding=False)
    if read_manifest(path.parent) is not None:
        raise OutputError(
            f"{what} {path} would be written into the SAVLT output folder {path.parent}: choose a file outside it"
        )
    if (path.exists() or path.is_symlink()) and not path.is_dir() and not is_few_shot_json(path):
        raise OutputError(
            f"{what} {path} exists and is not a few-shot JSON SAVLT wrote; SAVLT never replaces a file it "
            "did not write: choose another file name"
        )
    writable_file(path, what)
    write_json(path, few.to_json())
