"""``savlt data check``: decode every file of a data set and report each problem by path.

It scans with the rule ``train`` uses (``savlt.data.discover``) and decodes with the check
``train`` runs before its first step (``savlt.data.quality``), so the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from savlt.classes import ClassMap, short_name
from savlt.data.discover import DatasetScan, Problem, scan_dataset
from savlt.data.quality import Thresholds, check_scans
from savlt.io import plain_text, text_table


@dataclass
class CheckReport:
    scan: DatasetScan
    problems: list[Problem]
    class_names: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not self.problems

    def counts_table(self) -> str:
        """Scans per center × class (readable or not: problems are listed separately), masks, the
        multi-page TIFF volumes and the scans that are their pages, and the patients ("-" when the
        center has no patient information)."""
        short = [short_name(n) for n in self.class_names]
        header = ["center", *short, "total", "masks", "volumes", "pages", "patients"]
        rows = []
        for name, center in self.scan.centers.items():
            counts = center.counts()
            masks = sum(r.mask_path is not None for r in center.records)
            pages = [r for r in center.records if r.page is not None]
            patients = len({r.patient for r in center.records if r.patient is not None})
            rows.append(
                [
                    name,
                    *(str(counts.get(c, 0)) for c in self.class_names),
                    str(len(center.records)),
                    str(masks),
                    str(len({r.file_rel for r in pages})),
                    str(len(pages)),
                    str(patients) if center.patient_source else "-",
                ]
            )
        return text_table(header, rows)

    def patient_lines(self) -> list[str]:
        """Where each center's patients come from."""
        return [
            f"{name}: "
            + (
                f"from {center.patient_source}"
                if center.patient_source
                else "no patient information (every scan its own patient, a volume's pages one patient)"
            )
            for name, center in self.scan.centers.items()
        ]

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
            "Patients:",
            *("  " + line for line in self.patient_lines()),
            "",
        ]
        if self.scan.skipped:
            parts += [
                "Not centers (skipped by every command):",
                *(f"  {name}: it {reason}" for name, reason in self.scan.skipped.items()),
                "",
            ]
        if self.clean:
            parts.append("No problems found.")
        else:
            parts.append(f"{len(self.problems)} problem(s):")
            parts += [f"  [{p.kind}] {p.message}" for p in self.problems]
        return "\n".join(
            map(plain_text, parts)
        )  # file names that are not UTF-8: docs/data.md, "File names that are not UTF-8"


def check_dataset(
    root: str | Path,
    class_map: ClassMap,
    progress: bool = True,
    thresholds: Thresholds | None = None,
    patient_pattern: str | None = None,
) -> CheckReport:
    """Scan ROOT, decode every scan (every page of a volume) and mask (in parallel), and collect
    every problem: the scanning problems (metadata.csv ones included), unreadable files and scans
    that cannot be assessed; patients from metadata.csv, else `patient_pattern`."""
    scan = scan_dataset(root, class_map, patient_pattern=patient_pattern)
    problems = list(scan.problems)
    records = [r for c in scan.centers.values() for r in c.records]
    checks = check_scans([(r.path, r.mask_path) for r in records], thresholds or Thresholds(), progress)
    for check in checks:
        if check.problem is not None:
            problems.append(check.problem)
        elif check.unassessable is not None:
            message = f"{check.path} cannot be assessed: {check.unassessable}"
            problems.append(Problem("unassessable", check.path, message))
    return CheckReport(scan, problems, class_map.names)
