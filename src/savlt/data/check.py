"""``savlt data check``: decode every file of a data set and report each problem by path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from savlt.classes import ClassMap, short_name
from savlt.data.discover import DatasetScan, Problem, scan_dataset
from savlt.data.imageio import ImageDecodeError, read_image, read_mask
from savlt.io import text_table


@dataclass
class CheckReport:
    scan: DatasetScan
    problems: list[Problem]
    class_names: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not self.problems

    def counts_table(self) -> str:
        """Images per center × class (readable or not: problems are listed separately)."""
        short = [short_name(n) for n in self.class_names]
        header = ["center", *short, "total", "masks"]
        rows = []
        for name, center in self.scan.centers.items():
            counts = center.counts()
            masks = sum(r.mask_path is not None for r in center.records)
            rows.append(
                [
                    name,
                    *(str(counts.get(c, 0)) for c in self.class_names),
                    str(len(center.records)),
                    str(masks),
                ]
            )
        return text_table(header, rows)

    def mapping_lines(self) -> list[str]:
        lines = []
        for name, center in self.scan.centers.items():
            pairs = ", ".join(f"{folder} -> {label}" for folder, label in center.class_folders.items())
            lines.append(f"{name}: {pairs or '(no class folders)'}")
            if center.missing_classes:
                lines.append(f"  warning: {name} has no images of {', '.join(center.missing_classes)}")
        return lines

    def render(self) -> str:
        parts = [
            self.counts_table(),
            "",
            "Class mapping:",
            *("  " + line for line in self.mapping_lines()),
            "",
        ]
        if self.clean:
            parts.append("No problems found.")
        else:
            parts.append(f"{len(self.problems)} problem(s):")
            parts += [f"  [{p.kind}] {p.message}" for p in self.problems]
        return "\n".join(parts)


def check_dataset(root: str | Path, class_map: ClassMap, progress: bool = True) -> CheckReport:
    scan = scan_dataset(root, class_map)
    problems = list(scan.problems)
    records = [r for c in scan.centers.values() for r in c.records]
    for record in tqdm(records, desc="checking images", unit="img", disable=not progress):
        try:
            shape = read_image(record.path).shape[:2]
        except ImageDecodeError as exc:
            kind = "empty_file" if "0 bytes" in exc.reason else "unreadable_image"
            problems.append(Problem(kind, record.path, str(exc)))
            continue
        if record.mask_path is not None:
            try:
                read_mask(record.mask_path, shape)
            except ImageDecodeError as exc:
                problems.append(Problem("bad_mask", record.mask_path, str(exc)))
    return CheckReport(scan, problems, class_map.names)
