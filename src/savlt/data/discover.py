"""Finding centers, classes, images and masks under a data root.

Layout: ``ROOT/<center>/images/<class>/<file>`` with optional ``ROOT/<center>/masks/<class>/<stem>.png``;
``ROOT/<center>/<class>/<file>`` (no ``images/``) is accepted too. Scanning never decodes pixels and
never raises for a data problem: every problem is collected, so ``savlt data check`` can list them
all and training can refuse the ones that matter.

One rule decides what a center is, for every command: a folder at the root with an ``images/``
folder or at least one class folder. Other folders (an ``exports/`` folder, a run folder written
into the data root) are skipped with the reason, and reported as a problem when they hold images.
Operating-system and archive debris (hidden files, ``Thumbs.db``, ``desktop.ini``, ``__MACOSX/``)
is ignored everywhere; a symbolic link to nothing is reported, never skipped silently.

A multi-page TIFF is a volume: each page is one record (``<file>#<page>``), its volume the file.
Patients come from ``<center>/metadata.csv`` (columns ``file``, relative to the center folder, and
``patient``; optional ``volume``; any other column is kept as metadata) or, without it, from a
regular expression on the file name; without either every scan is its own patient (the pages of a
volume one patient).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from savlt.classes import ClassMap, UnknownClassError, alias_syntax
from savlt.data.imageio import IMAGE_EXTENSIONS, MASK_EXTENSION, is_image_file, page_path, tiff_pages
from savlt.errors import SavltError
from savlt.io import MANIFEST_NAME, name_from_text, read_text

log = logging.getLogger(__name__)

# A center's tissue-mask folder: DATA/<center>/masks/<class>/<stem>.png.
MASKS = "masks"


class DataError(SavltError):
    """The data set cannot be used as configured; the message names the file, folder or center."""


# What operating systems and archivers leave beside the data (besides hidden names such as
# .DS_Store, ._* AppleDouble files and .savlt): ignored everywhere, never reported.
DEBRIS_NAMES = frozenset(
    {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "system volume information"}
)
# A folder holding one of these is SAVLT's own output (run, evaluation, sweep, segmenter).
OUTPUT_MARKERS = frozenset(
    {
        "config.yaml",
        "metrics.json",
        "adapter.safetensors",
        "sweep.yaml",
        "segmenter.json",
        "summary.json",
        MANIFEST_NAME,
    }
)

# How a kind of problem reads in a one-line summary.
PROBLEM_TEXT = {
    "unknown_class": "unknown class folder(s)",
    "empty_class": "empty class folder(s)",
    "not_an_image": "file(s) that are not images, not used",
    "outside_class_folder": "image(s) outside any class folder, not used",
    "not_a_center": "folder(s) holding images but no class folders, not used as centers",
    "mask_without_image": "mask(s) without an image",
    "empty_file": "empty file(s)",
    "unreadable_image": "unreadable image(s)",
    "bad_mask": "unusable mask(s)",
    "unassessable": "scan(s) that cannot be assessed",
    "bad_metadata": "unusable metadata.csv file(s) or row(s)",
    "missing_patient": "scan(s) without a patient",
    "metadata_unknown_file": "metadata.csv row(s) naming no scan",
    "broken_link": "symbolic link(s) to nothing, not used",
}
# Problems that make a center unusable for a run (raised by DatasetScan.require_usable).
FATAL = ("unknown_class", "bad_metadata", "missing_patient")
METADATA_NAME = "metadata.csv"
PATTERN_KEY = "data.patient_pattern"


def is_debris(name: str) -> bool:
    """Hidden names (.DS_Store, ._* AppleDouble files) and known system or archive leftovers."""
    return name.startswith(".") or name.lower() in DEBRIS_NAMES


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute path of the scan; a page of a volume is <file>#<page>
    rel: str  # path relative to the center folder, POSIX style (as stored in split files)
    center: str
    label: str  # canonical class name
    mask_path: Path | None = None
    patient: str | None = None  # from metadata.csv or data.patient_pattern; None: not known
    volume: str | None = None  # metadata.csv's volume, else the file of a multi-page TIFF
    page: int | None = None  # the page of a multi-page TIFF
    metadata: tuple[tuple[str, str], ...] = ()  # the other metadata.csv columns of its row

    @property
    def patient_id(self) -> str:
        """What the scan is grouped by: its patient, else its volume, else the scan itself."""
        return self.patient or self.volume or self.rel

    @property
    def file_rel(self) -> str:
        """`rel` without the page: the file the scan is stored in."""
        return self.rel if self.page is None else self.rel.rpartition("#")[0]


@dataclass(frozen=True)
class Problem:
    kind: str  # unknown_class, empty_class, mask_without_image, not_an_image, …
    path: Path
    message: str


@dataclass
class CenterData:
    name: str
    root: Path
    records: list[ImageRecord] = field(default_factory=list)
    class_folders: dict[str, str] = field(default_factory=dict)  # folder name -> class name
    missing_classes: list[str] = field(default_factory=list)
    patient_source: str | None = None  # "metadata.csv", "data.patient_pattern" or None (not known)

    def counts(self) -> Counter[str]:
        return Counter(r.label for r in self.records)

    def by_rel(self) -> dict[str, ImageRecord]:
        return {r.rel: r for r in self.records}


@dataclass
class DatasetScan:
    root: Path
    centers: dict[str, CenterData]
    problems: list[Problem]
    skipped: dict[str, str] = field(default_factory=dict)  # folder at the root -> why it is no center

    def center(self, name: str) -> CenterData:
        if name in self.skipped:
            raise DataError(
                f"folder {name!r} under {self.root} is not used as a center: it {self.skipped[name]}"
            )
        if name not in self.centers:
            known = ", ".join(sorted(self.centers)) or "none"
            raise DataError(f"center {name!r} not found under {self.root} (centers found: {known})")
        return self.centers[name]

    def require_usable(self, centers: list[str]) -> None:
        """Raise for the problems that make these centers unusable (unknown classes, unusable
        metadata, scans without a patient, no images)."""
        for name in centers:
            center = self.center(name)
            fatal = [p for p in self.problems if p.kind in FATAL and center.root in p.path.parents]
            for kind in FATAL:
                found = [p for p in fatal if p.kind == kind]
                if kind == "missing_patient" and len(found) > 1:
                    raise DataError(
                        f"{len(found)} scans of center {name!r} have no patient, e.g. {found[0].message} "
                        f"(`savlt data check {self.root}` lists them all)"
                    )
                if found:
                    raise DataError(found[0].message)
            if not center.records:
                raise DataError(f"center {name!r} ({center.root}) contains no images")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_debris(p.name))


def _loose_files(folder: Path) -> list[Path]:
    """The files lying directly in `folder`, debris left out."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_debris(p.name))


def _is_output_folder(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in OUTPUT_MARKERS)


def image_files(folder: Path, skip_outputs: bool = False) -> tuple[list[Path], list[Path]]:
    """(every image below `folder`, every other file), sorted, debris left out; with
    `skip_outputs`, SAVLT output folders (runs, sweeps, segmenters) are left out too."""
    images: list[Path] = []
    others: list[Path] = []
    for current, dirs, files in os.walk(folder):
        if skip_outputs and any(name in OUTPUT_MARKERS for name in files):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not is_debris(d))
        for name in sorted(files):
            if not is_debris(name):
                (images if is_image_file(Path(name)) else others).append(Path(current) / name)
    return images, others


def _why_not_a_center(folder: Path, class_map: ClassMap) -> str | None:
    """The reason a folder at the data root is not a center, or None when it is one."""
    if (folder / "images").is_dir():
        return None
    subfolders = [d.name for d in _visible_dirs(folder) if d.name != MASKS]
    if any(class_map.knows(name) for name in subfolders):
        return None
    if _is_output_folder(folder):
        return "is a SAVLT output folder (run, evaluation, sweep or segmenter)"
    shown = ", ".join(subfolders[:5]) + (" …" if len(subfolders) > 5 else "")
    return f"holds no class folders (subfolders: {shown or 'none'})"


def _skipped_folder_problem(folder: Path, reason: str, images: list[Path]) -> Problem:
    subfolders = [d.name for d in _visible_dirs(folder) if d.name != MASKS]
    how = (
        f"; if it is a center, map its folders to classes, e.g. {alias_syntax(subfolders[0], 'CLASS')}"
        if subfolders
        else "; if it is a center, put its scans in class folders (<center>/images/<class>/)"
    )
    return Problem(
        "not_a_center",
        folder,
        f"folder {folder} holds {len(images)} image(s) (e.g. {images[0]}) but {reason}: "
        f"it is not used as a center{how}",
    )


def _scan_center(
    center_dir: Path, class_map: ClassMap, problems: list[Problem], patient_pattern: str | None
) -> CenterData:
    center = CenterData(name=center_dir.name, root=center_dir)
    has_images_dir = (center_dir / "images").is_dir()
    images_dir = center_dir / "images" if has_images_dir else center_dir
    masks_dir = center_dir / MASKS
    loose_files = _loose_files(center_dir) + (_loose_files(images_dir) if has_images_dir else [])
    for loose in (f for f in loose_files if f != center_dir / METADATA_NAME):
        if is_image_file(loose):
            message = f"{loose} lies outside any class folder and is not used; move it into <center>/images/<class>/"
            problems.append(Problem("outside_class_folder", loose, message))
        else:
            problems.append(_not_an_image(loose))
    for class_dir in _visible_dirs(images_dir):
        if not has_images_dir and class_dir.name == MASKS:
            continue
        try:
            label = class_map.resolve(class_dir.name, where=f"center {center.name!r}")
        except UnknownClassError as exc:
            problems.append(Problem("unknown_class", class_dir, f"{exc} (folder {class_dir})"))
            continue
        center.class_folders[class_dir.name] = label
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not _hidden(p, class_dir))
        images = [p for p in files if is_image_file(p)]
        problems += [_not_an_image(other) for other in files if not is_image_file(other)]
        if not images:
            problems.append(Problem("empty_class", class_dir, f"class folder {class_dir} holds no images"))
        for path in images:
            rel = path.relative_to(center_dir).as_posix()
            pages = tiff_pages(path)
            if pages > 1:  # a volume: one record per page, no mask files
                center.records += [
                    ImageRecord(page_path(path, i), f"{rel}#{i}", center.name, label, volume=rel, page=i)
                    for i in range(pages)
                ]
                continue
            mask = masks_dir / class_dir.name / path.relative_to(class_dir).with_suffix(MASK_EXTENSION)
            center.records.append(
                ImageRecord(
                    path=path,
                    rel=rel,
                    center=center.name,
                    label=label,
                    mask_path=mask if mask.is_file() else None,
                )
            )
    _check_masks(center, masks_dir, images_dir, problems)
    problems += _broken_links(center_dir)
    _assign_patients(center, patient_pattern, problems)
    present = set(center.counts())
    center.missing_classes = [n for n in class_map.names if n not in present]
    return center


def _assign_patients(center: CenterData, pattern: str | None, problems: list[Problem]) -> None:
    """Give every record its patient: from metadata.csv when the center has one, else from
    `pattern` on the file name; a scan left without a patient is a problem."""
    table = center.root / METADATA_NAME
    if table.is_file():
        center.patient_source = METADATA_NAME
        rows = _read_metadata(table, problems)
        if rows is not None:
            center.records = _from_metadata(center, table, rows, problems)
    elif pattern:
        center.patient_source = PATTERN_KEY
        center.records = _from_pattern(center, re.compile(pattern), pattern, problems)


def _metadata_problem(table: Path, message: str) -> Problem:
    return Problem("bad_metadata", table, f"{table}: {message}")


def _read_metadata(table: Path, problems: list[Problem]) -> dict[str, dict[str, str]] | None:
    """file -> its row (lower-case column names), or None (with a problem) for an unusable file."""
    try:
        with io.StringIO(read_text(table, "metadata file", DataError), newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
            missing = [c for c in ("file", "patient") if c not in columns]
            if missing:
                problems.append(
                    _metadata_problem(
                        table,
                        f"no {' or '.join(repr(m) for m in missing)} column (columns: "
                        f"{', '.join(columns) or 'none'}); it needs the columns file and patient",
                    )
                )
                return None
            lines = [
                (reader.line_num, {c: (v or "").strip() for c, v in zip(columns, row.values(), strict=False)})
                for row in reader
            ]
    except DataError as exc:  # missing, unreadable or not UTF-8
        problems.append(Problem("bad_metadata", table, str(exc)))
        return None
    except csv.Error as exc:
        problems.append(_metadata_problem(table, f"cannot be read as a CSV file ({exc})"))
        return None
    rows: dict[str, dict[str, str]] = {}
    for line, row in lines:
        key = name_from_text(row["file"]).replace("\\", "/").removeprefix("./")
        if not key or not row["patient"]:
            problems.append(_metadata_problem(table, f"line {line} has an empty file or patient"))
        elif key in rows and rows[key]["patient"] != row["patient"]:
            problems.append(
                _metadata_problem(
                    table,
                    f"line {line}: {key} is listed again with another patient "
                    f"({row['patient']!r}, before {rows[key]['patient']!r})",
                )
            )
        else:
            rows[key] = row
    return rows


def _from_metadata(
    center: CenterData, table: Path, rows: dict[str, dict[str, str]], problems: list[Problem]
) -> list[ImageRecord]:
    """The records with their patient, volume and other columns from metadata.csv. A row names a
    scan (``<file>#<page>`` for one page of a volume) or a file (every page of a volume); paths
    relative to ``<center>/images/`` are accepted too."""

    def row_of(key: str) -> tuple[str, dict[str, str]] | None:
        for name in (key, key.removeprefix("images/")):
            if name in rows:
                return name, rows[name]
        return None

    used: set[str] = set()
    records = []
    for record in center.records:
        found = row_of(record.rel) or row_of(record.file_rel)
        if found is None:
            problems.append(
                Problem(
                    "missing_patient",
                    record.path,
                    f"{record.path} has no row in {table}: add a row (file {record.rel}, patient), "
                    f"or remove {table.name} to treat every scan as its own patient",
                )
            )
            records.append(record)
            continue
        name, row = found
        used.add(name)
        extra = tuple((k, v) for k, v in row.items() if k not in ("file", "patient", "volume") and k)
        volume = row.get("volume") or record.volume
        records.append(dataclasses.replace(record, patient=row["patient"], volume=volume, metadata=extra))
    for key in rows:
        if key not in used:
            message = f"{table}: row for {key} names no scan of center {center.name!r}; it is not used"
            problems.append(Problem("metadata_unknown_file", table, message))
    return records


def _from_pattern(
    center: CenterData, pattern: re.Pattern[str], text: str, problems: list[Problem]
) -> list[ImageRecord]:
    """The records with the patient `pattern` finds in the file name (its group "patient", else its
    first group, else the whole match)."""
    records = []
    for record in center.records:
        name = record.file_rel.rpartition("/")[2]
        found = pattern.search(name)
        patient = None
        if found is not None:
            group = "patient" if "patient" in pattern.groupindex else (1 if pattern.groups else 0)
            patient = found[group]
        if not patient:
            problems.append(
                Problem(
                    "missing_patient",
                    record.path,
                    f"file name {name!r} ({record.path}) does not match {PATTERN_KEY} {text!r}: "
                    f"change the pattern, or give the center a {METADATA_NAME}",
                )
            )
            records.append(record)
            continue
        records.append(dataclasses.replace(record, patient=patient))
    return records


def _not_an_image(path: Path) -> Problem:
    extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
    return Problem(
        "not_an_image", path, f"{path} is not an image (extension not one of {extensions}); skipped"
    )


def _broken_link(link: Path) -> Problem:
    return Problem(
        "broken_link",
        link,
        f"{link} is a symbolic link to {os.readlink(link)}, which does not exist: it is not used "
        "(mount or copy what it points to, or remove the link)",
    )


def _broken_links(folder: Path) -> list[Problem]:
    """A problem for every symbolic link below `folder` whose target is missing (a scan left on an
    unmounted drive, an export moved away): not used, and said so."""
    return [
        _broken_link(link)
        for link in sorted(folder.rglob("*"))
        if link.is_symlink() and not link.exists() and not _hidden(link, folder)
    ]


def _hidden(path: Path, below: Path) -> bool:
    return any(is_debris(part) for part in path.relative_to(below).parts)


def _check_masks(center: CenterData, masks_dir: Path, images_dir: Path, problems: list[Problem]) -> None:
    if not masks_dir.is_dir():
        return
    used = {r.mask_path for r in center.records if r.mask_path is not None}
    for mask in sorted(masks_dir.rglob("*")):
        if mask.is_file() and not _hidden(mask, masks_dir) and mask not in used:
            problems.append(
                Problem(
                    "mask_without_image",
                    mask,
                    f"mask {mask} has no image with the same stem under {images_dir / mask.parent.name}",
                )
            )


def scan_dataset(
    root: str | Path,
    class_map: ClassMap,
    centers: list[str] | None = None,
    patient_pattern: str | None = None,
) -> DatasetScan:
    """Scan ROOT (every center, or the named ones) and collect records, problems and the folders
    that are not centers; patients from each center's metadata.csv, else `patient_pattern`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    as_center = f"{root} looks like a center folder itself: pass the folder above it as the data root"
    if (root / "images").is_dir() and any(class_map.knows(d.name) for d in _visible_dirs(root / "images")):
        raise DataError(as_center)
    folders = _visible_dirs(root)
    if centers is not None:
        known = {d.name for d in folders}
        for name in centers:
            if name not in known:
                raise DataError(
                    f"center {name!r} not found under {root} (centers found: {', '.join(sorted(known)) or 'none'})"
                )
        folders = [d for d in folders if d.name in centers]
    problems = [
        _broken_link(entry)
        for entry in sorted(root.iterdir())
        if entry.is_symlink() and not entry.exists() and not is_debris(entry.name)
    ]
    found: dict[str, CenterData] = {}
    skipped: dict[str, str] = {}
    for folder in folders:
        reason = _why_not_a_center(folder, class_map)
        if reason is None:
            found[folder.name] = _scan_center(folder, class_map, problems, patient_pattern)
            continue
        skipped[folder.name] = reason
        images = [] if _is_output_folder(folder) else image_files(folder, skip_outputs=True)[0]
        if images:
            problems.append(_skipped_folder_problem(folder, reason, images))
    scan = DatasetScan(root=root, centers=found, problems=problems, skipped=skipped)
    if centers is not None:
        for name in centers:
            scan.center(name)  # a named folder that is not a center: the error says why
    if not found:
        if any(class_map.knows(d.name) for d in _visible_dirs(root)):
            raise DataError(as_center)
        raise DataError(f"no center folders under {root} (expected ROOT/<center>/images/<class>/<files>)")
    return scan


def problem_summary(problems: list[Problem], shown: int = 3) -> list[str]:
    """One line per kind of problem: how many, and the first few paths."""
    by_kind: dict[str, list[Problem]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    return [
        f"{len(items)} {PROBLEM_TEXT.get(kind, kind)}: "
        + ", ".join(str(p.path) for p in items[:shown])
        + (" …" if len(items) > shown else "")
        for kind, items in by_kind.items()
    ]


def scan_data(
    root: str | Path | None,
    class_map: ClassMap,
    centers: list[str] | None = None,
    patient_pattern: str | None = None,
) -> DatasetScan:
    """`scan_dataset` for a command: a missing root is an error saying how to give one, and the
    folders skipped, the problems found (per kind, with the first paths) and the classes missing
    from a center are logged (``savlt data check`` lists every problem by path)."""
    if not root:
        raise DataError("no data root: pass --data ROOT (or set data.root)")
    scan = scan_dataset(root, class_map, centers, patient_pattern)
    for name, reason in scan.skipped.items():
        log.warning("skipped folder %s: it %s, so it is not a center", Path(root) / name, reason)
    for center in scan.centers.values():
        if center.missing_classes:
            log.warning("center %s has no images of: %s", center.name, ", ".join(center.missing_classes))
    for line in problem_summary(scan.problems):
        log.warning("%s (`savlt data check %s` lists every problem)", line, root)
    return scan
