"""The results table of a run and its markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from savlt.classes import short_name
from savlt.io import markdown_table, text_table, write_text
from savlt.report.plots import confusion_png, roc_png, training_curves_png


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return fmt(value) if not ci else f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def scans_cell(metrics: dict[str, Any], m: dict[str, Any]) -> str:
    """`n`, with the scans that could not be assessed when there are any."""
    left = m.get("unassessable") or 0
    if not left:
        return str(m["n"])
    if metrics.get("unassessable_policy", "exclude") == "exclude":
        return f"{m['n']} (+{left} not assessable, excluded)"
    return f"{m['n']} (incl. {left} not assessable)"


def results_rows(metrics: dict[str, Any], every_interval: bool = False) -> tuple[list[str], list[list[str]]]:
    """The results table; intervals for accuracy and AUC, or for every metric (`every_interval`:
    macro-F1, sensitivity, specificity, PPV and NPV too)."""
    screen = ("sensitivity", "specificity", "ppv", "npv")
    titles = ["sensitivity", "specificity", "PPV", "NPV"]
    more = " [95% CI]" if every_interval else ""
    header = [
        "center",
        "n",
        "accuracy [95% CI]",
        f"macro-F1{more}",
        "AUC [95% CI]",
        *(t + more for t in titles),
    ]

    def cell(value: float | None, interval: Sequence[float] | None) -> str:
        return fmt_ci(value, interval) if every_interval else fmt(value)

    rows = []
    for center, m in metrics["centers"].items():
        ci = m.get("ci95") or {}
        b, bci = m["binary"], ci.get("binary") or {}
        role = " (internal test)" if center == metrics.get("train_center") else ""
        rows.append(
            [
                center + role,
                scans_cell(metrics, m),
                fmt_ci(m["accuracy"], ci.get("accuracy")),
                cell(m["macro_f1"], ci.get("macro_f1")),
                fmt_ci(b["auc"], bci.get("auc")),
                *(cell(b[key], bci.get(key)) for key in screen),
            ]
        )
    return header, rows


def results_table(metrics: dict[str, Any]) -> str:
    return text_table(*results_rows(metrics))


def class_rows(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[list[str]]:
    """Per class: support (scans of the class), recall, precision and F1 (as in macro-F1)."""
    matrix = np.asarray(confusion)
    support, called, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    rows = []
    for i, name in enumerate(class_names):
        recall = hits[i] / support[i] if support[i] else None
        precision = hits[i] / called[i] if called[i] else None
        f1 = 2 * hits[i] / (support[i] + called[i]) if support[i] + called[i] else None
        rows.append([short_name(name), str(int(support[i])), fmt(recall), fmt(precision), fmt(f1)])
    return rows


def center_lines(metrics: dict[str, Any], center: str, class_names: Sequence[str]) -> list[str]:
    """A center's section of the report, before its figures: scans not assessed, class counts and
    the per-class table, classes absent from the center."""
    m = metrics["centers"][center]
    lines = []
    left = m.get("unassessable") or 0
    if left:
        how = (
            "left out of these metrics"
            if metrics.get("unassessable_policy", "exclude") == "exclude"
            else "scored like the others"
        )
        lines += [f"{left} scan(s) could not be assessed and are {how} (eval.unassessable).", ""]
    header = ["class", "scans", "recall", "precision", "F1"]
    lines += [markdown_table(header, class_rows(m["confusion"], class_names)), ""]
    absent = [short_name(n) for n, row in zip(class_names, m["confusion"], strict=True) if not sum(row)]
    if absent:
        lines += [f"No scans of {', '.join(absent)} in this center (left out of macro-F1).", ""]
    return lines


def prior_lines(prior: dict[str, Any] | None) -> list[str]:
    """What the report says about the tissue masks behind the ROI, when it matters."""
    if not prior:
        return []
    kind = prior.get("mask_source")
    if kind == "files":
        centers = ", ".join(prior.get("annotated_masks_at_test_time") or [])
        return [
            f"**Structure prior**: annotated tissue masks were used at test time (centers: {centers}).",
            "",
        ]
    if kind != "segmenter":
        return [f"**Structure prior**: {kind} tissue masks.", ""]
    seen = prior.get("evaluated_centers_seen")
    if seen is None:
        note = "the centers it was trained on are not recorded"
    elif seen:
        note = f"it was trained on masks of evaluated center(s) {', '.join(seen)}"
    else:
        note = "it saw none of the evaluated centers"
    return [f"**Structure prior**: segmenter `{prior.get('segmenter')}`; {note}.", ""]


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
    lines += prior_lines(metrics.get("structure_prior"))
    lines += [
        "Fractions in [0, 1]; brackets are 95 % percentile-bootstrap intervals. The binary screen is "
        "high-risk (" + ", ".join(metrics.get("high_risk", [])) + ") against the rest.",
        "",
        markdown_table(*results_rows(metrics, every_interval=True)),
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
        lines += [f"## {center}", "", *center_lines(metrics, center, class_names)]
        if fallback is not None:
            lines += [f"ROI fell back to the whole image for {fallback} of {m['n']} scans.", ""]
        lines += [f"![confusion]({f'confusion_{center}.png'}) ![ROC]({f'roc_{center}.png'})", ""]
    path = folder / "report.md"
    write_text(path, "\n".join(lines))
    return path
