"""Finding centers, classes, images and masks under a data root.

Layout: ``ROOT/<center>/images/<class>/<file>`` with optional ``ROOT/<center>/masks/<class>/<stem>.png``;
``ROOT/<center>/<class>/<file>`` (no ``images/``) is accepted too. Scanning never decodes pixels and
never raises for a data problem: every problem is collected, so ``savlt data check`` can list them
all and training can refuse the ones that matter.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from savlt.classes import ClassMap, UnknownClassError
from savlt.data.imageio import IMAGE_EXTENSIONS, MASK_EXTENSION, is_image_file
from savlt.errors import SavltError

log = logging.getLogger(__name__)


class DataError(SavltError):
    """The data set cannot be used as configured; the message names the file, folder or center."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute path of the scan
    rel: str  # path relative to the center folder, POSIX style (as stored in split files)
    center: str
    label: str  # canonical class name
    mask_path: Path | None = None


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

    def counts(self) -> Counter[str]:
        return Counter(r.label for r in self.records)

    def by_rel(self) -> dict[str, ImageRecord]:
        return {r.rel: r for r in self.records}


@dataclass
class DatasetScan:
    root: Path
    centers: dict[str, CenterData]
    problems: list[Problem]

    def center(self, name: str) -> CenterData:
        if name not in self.centers:
            known = ", ".join(sorted(self.centers)) or "none"
            raise DataError(f"center {name!r} not found under {self.root} (centers found: {known})")
        return self.centers[name]

    def require_usable(self, centers: list[str]) -> None:
        """Raise for the problems that make these centers unusable (unknown classes, no images)."""
        for name in centers:
            center = self.center(name)
            for problem in self.problems:
                if problem.kind == "unknown_class" and center.root in problem.path.parents:
                    raise DataError(problem.message)
            if not center.records:
                raise DataError(f"center {name!r} ({center.root}) contains no images")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_center(center_dir: Path, class_map: ClassMap, problems: list[Problem]) -> CenterData:
    center = CenterData(name=center_dir.name, root=center_dir)
    has_images_dir = (center_dir / "images").is_dir()
    images_dir = center_dir / "images" if has_images_dir else center_dir
    masks_dir = center_dir / "masks"
    for class_dir in _visible_dirs(images_dir):
        if not has_images_dir and class_dir.name == "masks":
            continue
        try:
            label = class_map.resolve(class_dir.name, where=f"center {center.name!r}")
        except UnknownClassError as exc:
            problems.append(Problem("unknown_class", class_dir, f"{exc} (folder {class_dir})"))
            continue
        center.class_folders[class_dir.name] = label
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not _hidden(p, class_dir))
        images = [p for p in files if is_image_file(p)]
        for other in (p for p in files if not is_image_file(p)):
            problems.append(
                Problem(
                    "not_an_image",
                    other,
                    f"{other} is not an image (extension not one of {', '.join(sorted(IMAGE_EXTENSIONS))}); skipped",
                )
            )
        if not images:
            problems.append(Problem("empty_class", class_dir, f"class folder {class_dir} holds no images"))
        for path in images:
            mask = masks_dir / class_dir.name / path.relative_to(class_dir).with_suffix(MASK_EXTENSION)
            center.records.append(
                ImageRecord(
                    path=path,
                    rel=path.relative_to(center_dir).as_posix(),
                    center=center.name,
                    label=label,
                    mask_path=mask if mask.is_file() else None,
                )
            )
    _check_masks(center, masks_dir, images_dir, problems)
    present = set(center.counts())
    center.missing_classes = [n for n in class_map.names if n not in present]
    return center


def _hidden(path: Path, below: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(below).parts)


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


def scan_dataset(root: str | Path, class_map: ClassMap, centers: list[str] | None = None) -> DatasetScan:
    """Scan ROOT (every center, or the named ones) and collect records and problems."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    center_dirs = _visible_dirs(root)
    if centers is not None:
        known = {d.name for d in center_dirs}
        for name in centers:
            if name not in known:
                raise DataError(
                    f"center {name!r} not found under {root} (centers found: {', '.join(sorted(known)) or 'none'})"
                )
        center_dirs = [d for d in center_dirs if d.name in centers]
    problems: list[Problem] = []
    found = {d.name: _scan_center(d, class_map, problems) for d in center_dirs}
    if not found:
        raise DataError(f"no center folders under {root} (expected ROOT/<center>/images/<class>/<files>)")
    return DatasetScan(root=root, centers=found, problems=problems)


def scan_data(root: str | Path | None, class_map: ClassMap, centers: list[str] | None = None) -> DatasetScan:
    """`scan_dataset` for a command: a missing root is an error saying how to give one, and the
    problems found and the classes missing from a center are logged (``savlt data check`` lists
    every problem by path)."""
    if not root:
        raise DataError("no data root: pass --data ROOT (or set data.root)")
    scan = scan_dataset(root, class_map, centers)
    for center in scan.centers.values():
        if center.missing_classes:
            log.warning("center %s has no images of: %s", center.name, ", ".join(center.missing_classes))
    if scan.problems:
        log.warning(
            "%d data problem(s) under %s, e.g. %s (run `savlt data check %s` for all)",
            len(scan.problems),
            root,
            scan.problems[0].message,
            root,
        )
    return scan
