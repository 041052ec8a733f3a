"""The results table of a run and its markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from savlt.io import markdown_table, text_table, write_text
from savlt.report.plots import confusion_png, roc_png, training_curves_png


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return fmt(value) if not ci else f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def results_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "center",
        "n",
        "accuracy [95% CI]",
        "macro-F1",
        "AUC [95% CI]",
        "sensitivity",
        "specificity",
        "PPV",
        "NPV",
    ]
    rows = []
    for center, m in metrics["centers"].items():
        ci = m.get("ci95") or {}
        b, bci = m["binary"], ci.get("binary") or {}
        role = " (internal test)" if center == metrics.get("train_center") else ""
        rows.append(
            [
                center + role,
                str(m["n"]),
                fmt_ci(m["accuracy"], ci.get("accuracy")),
                fmt(m["macro_f1"]),
                fmt_ci(b["auc"], bci.get("auc")),
                fmt(b["sensitivity"]),
                fmt(b["specificity"]),
                fmt(b["ppv"]),
                fmt(b["npv"]),
            ]
        )
    return header, rows


def results_table(metrics: dict[str, Any]) -> str:
    return text_table(*results_rows(metrics))


def write_report(
    folder: Path,
    metrics: dict[str, Any],
    class_names: Sequence[str],
    scores: dict[str, tuple[np.ndarray, np.ndarray]],
    history: Sequence[dict[str, Any]] = (),
    title: str = "SAVLT run",
) -> Path:
    """report.md with the results table, per-center confusion matrix and ROC, training curves.

    `scores` maps a center to (is_high_risk (N,) bool, high-risk probability (N,)) for the ROC.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    info = {k: metrics[k] for k in ("method", "backbone", "shots", "seed", "train_center") if k in metrics}
    if info:
        lines += [", ".join(f"**{k}**: {v}" for k, v in info.items()), ""]
    lines += [
        "Fractions in [0, 1]; brackets are 95 % percentile-bootstrap intervals. The binary screen is "
        "high-risk (" + ", ".join(metrics.get("high_risk", [])) + ") against the rest.",
        "",
        markdown_table(*results_rows(metrics)),
        "",
    ]
    if history:
        training_curves_png(history, folder / "training_curves.png")
        lines += ["## Training", "", "![training curves](training_curves.png)", ""]
    for center, m in metrics["centers"].items():
        confusion_png(
            m["confusion"], class_names, f"{center} (n={m['n']})", folder / f"confusion_{center}.png"
        )
        positive, score = scores[center]
        roc_png(
            positive, score, m["binary"]["auc"], f"{center}: high-risk screen", folder / f"roc_{center}.png"
        )
        fallback = m.get("roi_fallback")
        lines += [f"## {center}", ""]
        if fallback is not None:
            lines += [f"ROI fell back to the whole image for {fallback} of {m['n']} scans.", ""]
        lines += [f"![confusion]({f'confusion_{center}.png'}) ![ROC]({f'roc_{center}.png'})", ""]
    path = folder / "report.md"
    write_text(path, "\n".join(lines))
    return path
