"""The results table of a run and its markdown report (with the screening decision, the patients
and the calibration when metrics.json has them)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from savlt.classes import short_name
from savlt.io import markdown_table, text_table, write_text
from savlt.report.plots import Bins, confusion_png, reliability_png, roc_png, training_curves_png

SCREEN = ("sensitivity", "specificity", "ppv", "npv")
SCREEN_TITLES = ("sensitivity", "specificity", "PPV", "NPV")
# What every report says first: what SAVLT's answers are for.
RESEARCH_USE = (
    "**Research use only, not a medical device.** These figures describe a model on the data named "
    "here; they are not a diagnosis and have not been validated for clinical use."
)
ARGMAX_SCREEN = "screen: the predicted class is high-risk"
FAILED = "FAILED"


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return fmt(value) if not ci else f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def intervals(metrics: dict[str, Any]) -> tuple[str, str]:
    """The key of metrics.json's intervals and their level in words: ("ci95", "95%") by default,
    ("ci90", "90%") for a run evaluated with ``eval.ci_level=0.9``. The level is metrics.json's
    ``ci_level``, or (a file written before it was recorded) read from the key."""
    keys = (k for m in metrics.get("centers", {}).values() for k in m if re.fullmatch(r"ci\d+", k))
    key = next(keys, "ci95")
    level = metrics.get("ci_level")
    return key, (f"{100 * level:g}%" if level else f"{key[2:]}%")


def interval_text(metrics: dict[str, Any]) -> str:
    """How the intervals were computed (metrics.json's per-center "interval_methods"), in words,
    naming the centers when they differ; "percentile bootstrap" for a file written before they
    were recorded."""
    by_method: dict[tuple[str, str], list[str]] = {}
    for center, m in metrics["centers"].items():
        if "interval_methods" in m:
            how = m["interval_methods"]
            by_method.setdefault((how["proportions"], how["auc_macro_f1"]), []).append(center)
    if not by_method:
        return "percentile bootstrap"
    parts = [f"proportions {prop}, AUC and macro-F1 {boot}" for prop, boot in by_method]
    if len(parts) == 1:
        return parts[0]
    named = zip(parts, by_method.values(), strict=True)
    return "; ".join(f"{', '.join(centers)}: {part}" for part, centers in named)


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
    key, level = intervals(metrics)
    more = f" [{level} CI]" if every_interval else ""
    header = [
        "center",
        "n",
        f"accuracy [{level} CI]",
        f"macro-F1{more}",
        f"AUC [{level} CI]",
        *(t + more for t in SCREEN_TITLES),
    ]

    def cell(value: float | None, interval: Sequence[float] | None) -> str:
        return fmt_ci(value, interval) if every_interval else fmt(value)

    rows = []
    for center, m in metrics["centers"].items():
        ci = m.get(key) or {}
        b, bci = m["binary"], ci.get("binary") or {}
        rows.append(
            [
                _role(metrics, center),
                scans_cell(metrics, m),
                fmt_ci(m["accuracy"], ci.get("accuracy")),
                cell(m["macro_f1"], ci.get("macro_f1")),
                fmt_ci(b["auc"], bci.get("auc")),
                *(cell(b[name], bci.get(name)) for name in SCREEN),
            ]
        )
    return header, rows


def results_table(metrics: dict[str, Any]) -> str:
    """The terminal's results table, titled with the screen its binary columns show."""
    return f"Results per center ({ARGMAX_SCREEN}):\n" + text_table(*results_rows(metrics))


def _role(metrics: dict[str, Any], center: str) -> str:
    return center + (" (internal test)" if center == metrics.get("train_center") else "")


def _blocks(metrics: dict[str, Any], name: str, key: str) -> Iterator[tuple[str, dict, dict, dict]]:
    """(center, its metrics, its `name` block, that block's intervals under `key`) of each center
    that has the block."""
    for center, m in metrics["centers"].items():
        block = m.get(name)
        if block:
            yield center, m, block, block.get(key) or {}


def threshold_cell(op: dict[str, Any]) -> str:
    """The threshold a center's screen used: "not established" when it fell back to the class."""
    if op.get("established") is False:
        return "not established"
    return fmt(op.get("threshold"))


def screen_verdict(op: dict[str, Any]) -> str:
    """The referral screen's verdict on a center: FAILED when its sensitivity is below the target
    and so is its interval's upper end (``engine.calibration.screen_failed``)."""
    if op.get("screen_failed") is None:
        return "n/a"
    return FAILED if op["screen_failed"] else "ok"


def failed_note(metrics: dict[str, Any], failed: Sequence[str]) -> str:
    """The line under a screening table naming the centers where the screen failed."""
    level = intervals(metrics)[1]
    return (
        f"The screen FAILED on {', '.join(failed)}: its sensitivity there is below the target, and so is "
        f"the upper end of its {level} interval."
    )


def decision_rows(metrics: dict[str, Any], every_interval: bool = True) -> tuple[list[str], list[list[str]]]:
    """The referral screen per center (as delivered: the threshold, or the predicted class when
    the operating point is not established), beside the argmax screen's sensitivity and
    specificity; no rows when the run has no calibration."""
    key, level = intervals(metrics)
    more = f" [{level} CI]" if every_interval else ""
    header = [
        "center",
        "threshold",
        *(t + more for t in SCREEN_TITLES),
        "argmax sens.",
        "argmax spec.",
        "screen",
    ]
    rows = []
    for center, m, op, ci in _blocks(metrics, "operating_point", key):
        rows.append(
            [
                _role(metrics, center),
                threshold_cell(op),
                *(fmt_ci(op[k], ci.get(k)) if every_interval else fmt(op[k]) for k in SCREEN),
                fmt(m["binary"]["sensitivity"]),
                fmt(m["binary"]["specificity"]),
                screen_verdict(op),
            ]
        )
    return header, rows


def set_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per center: the prediction sets' empirical coverage (with its interval), mean size and the
    share of empty sets."""
    key, level = intervals(metrics)
    header = ["center", "target coverage", f"coverage [{level} CI]", "mean set size", "empty sets"]
    rows = [
        [
            _role(metrics, center),
            f"{1 - sets['alpha']:g}",
            fmt_ci(sets["coverage"], ci.get("coverage")),
            f"{sets['mean_size']:.2f}",
            fmt(sets["empty"]),
        ]
        for center, _, sets, ci in _blocks(metrics, "prediction_sets", key)
    ]
    return header, rows


def patient_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per center: patients, accuracy and the binary screen per patient (argmax, with intervals
    over patients), and the sensitivity and specificity of the referral screen."""
    key, level = intervals(metrics)
    header = [
        "center",
        "patients",
        f"accuracy [{level} CI]",
        f"AUC [{level} CI]",
        *(f"{t} [{level} CI]" for t in SCREEN_TITLES),
        "referral sens. / spec.",
    ]
    rows = []
    for center, _, pm, ci in _blocks(metrics, "patient", key):
        b, bci = pm["binary"], ci.get("binary") or {}
        op = pm.get("operating_point")
        rows.append(
            [
                _role(metrics, center),
                str(pm["n"]),
                fmt_ci(pm["accuracy"], ci.get("accuracy")),
                fmt_ci(b["auc"], bci.get("auc")),
                *(fmt_ci(b[k], bci.get(k)) for k in SCREEN),
                f"{fmt(op['sensitivity'])} / {fmt(op['specificity'])}" if op else "n/a",
            ]
        )
    return header, rows


def decision_table(metrics: dict[str, Any]) -> str:
    """The terminal's screening table: per center, the referral screen (per scan, with FAILED
    where it fails its target beyond doubt) and the patients' accuracy and AUC, titled with the
    rule; empty when the run has no calibration and no patients."""
    header = ["center", "threshold", *SCREEN_TITLES, "screen", "patients", "patient acc.", "patient AUC"]
    rows = []
    rule = ARGMAX_SCREEN
    for center, m in metrics["centers"].items():
        op, pm = m.get("operating_point") or {}, m.get("patient") or {}
        if not op and not pm:
            continue
        rule = op.get("rule", rule)
        rows.append(
            [
                _role(metrics, center),
                threshold_cell(op),
                *(fmt(op.get(k)) for k in SCREEN),
                screen_verdict(op) if op else "n/a",
                str(pm.get("n", "n/a")),
                fmt(pm.get("accuracy")),
                fmt((pm.get("binary") or {}).get("auc")),
            ]
        )
    if not rows:
        return ""
    failed = [r[0] for r in rows if r[header.index("screen")] == FAILED]
    note = f"\n{failed_note(metrics, failed)}" if failed else ""
    return f"Referral screen ({rule}):\n" + text_table(header, rows) + note


def patient_source_text(source: str | None) -> str:
    if source is None:
        return "no patient information: every scan is its own patient"
    return f"patients from {source}"


def split_lines(metrics: dict[str, Any]) -> list[str]:
    """How the training center was split, by patient or by image, with scans and patients per part."""
    split = metrics.get("split")
    if not split or "parts" not in split:
        return []
    parts = ", ".join(
        f"{name} {p['scans']} scans / {p['patients']} patients" for name, p in split["parts"].items()
    )
    lines = [
        f"**Split** of {metrics.get('train_center')} by {split['by']}; "
        f"{patient_source_text(split.get('patient_source'))}: {parts}.",
        "",
    ]
    if split.get("warning"):
        lines += [f"**Warning**: {split['warning']}.", ""]
    return lines


def fit_lines(metrics: dict[str, Any]) -> list[str]:
    """What the temperature and the referral threshold were fitted on, and their warnings."""
    fit = metrics.get("validation_fit")
    if not fit:
        return ["This run has no calibration (made before calibration.json existed).", ""]
    rules = (m["operating_point"]["rule"] for m in metrics["centers"].values() if "operating_point" in m)
    rule = next(rules, None)
    sets = (
        f" Prediction sets at coverage {1 - fit['conformal_alpha']:g} ({str(fit['conformal_score']).upper()} "
        "score on the uncalibrated probabilities) were fitted on the same draw."
        if fit.get("conformal_alpha") is not None
        else ""
    )
    lines = [
        f"Temperature {fit['temperature']:.3g}, referral threshold and prediction sets fitted on the "
        f"validation draw only (its predictions: predictions/validation.csv): {fit['scans']} scans "
        f"({fit['positives']} high-risk) from {fit['patients']} patients.{sets} Every figure here is "
        "computed from the calibrated probabilities the run delivers.",
        "",
    ]
    if rule:
        lines += [f"**Referral rule**: {rule}.", ""]
    lines += [f"- **Warning**: {w}." for w in fit.get("warnings", [])]
    return lines + ([""] if fit.get("warnings") else [])


def decision_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's sections on the screening decision, the patients and the calibration."""
    centers = metrics["centers"]
    lines = ["## Screening decision", "", *fit_lines(metrics)]
    header, rows = decision_rows(metrics)
    if rows:
        lines += [markdown_table(header, rows), ""]
        failed = [r[0] for r in rows if r[-1] == FAILED]
        if failed:
            lines += [f"**{failed_note(metrics, failed)}**", ""]
    header, rows = set_rows(metrics)
    if rows:
        lines += [
            "## Prediction sets",
            "",
            "Each scan's set holds the classes that cannot be ruled out at the target coverage "
            "(split conformal on the validation draw). The guarantee holds for scans like the validation "
            "draw's; on other centers the coverage below is measured, not promised.",
            "",
            markdown_table(header, rows),
            "",
        ]
    header, rows = patient_rows(metrics)
    if rows:
        aggregate = next(iter(centers.values()))["patient"].get("aggregate")
        how = "mean of its scans' class probabilities" if aggregate == "mean" else "its riskiest scan"
        by_source: dict[str | None, list[str]] = {}
        for c, m in centers.items():
            if "patient" in m:
                by_source.setdefault(m["patient"].get("source"), []).append(c)
        sources = "; ".join(f"{', '.join(cs)}: {patient_source_text(src)}" for src, cs in by_source.items())
        lines += [
            "## Patients",
            "",
            f"A patient's probabilities: the {how} (eval.patient_aggregate={aggregate}); it is high-risk "
            f"when any of its scans is. {sources}.",
            "",
            markdown_table(header, rows),
            "",
        ]
    calibrated = [(c, m["calibration"]) for c, m in centers.items() if "calibration" in m]
    if calibrated:
        rows = [
            [_role(metrics, c), f"{cal['temperature']:.3g}", fmt(cal["ece_before"]), fmt(cal["ece_after"])]
            for c, cal in calibrated
        ]
        lines += [
            "## Calibration",
            "",
            "Expected calibration error (top-class confidence, 10 bins) on each center's test scans, before "
            "and after temperature scaling.",
            "",
            markdown_table(["center", "temperature", "ECE before", "ECE after"], rows),
            "",
        ]
    return lines


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
    reliability: dict[str, tuple[Bins, Bins]] | None = None,
    figures: bool = True,
) -> Path:
    """report.md with the results table, the screening decision, patients and calibration, per-center
    confusion matrix, ROC and reliability diagram, training curves (the figures unless not
    `figures`: the text and numbers are the same).

    `scores` maps a center to (is_high_risk (N,) bool, high-risk probability (N,)) for the ROC;
    `reliability` a center to its reliability bins before and after calibration.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", RESEARCH_USE, ""]
    keys = ("method", "protocol", "backbone", "shots", "seed", "train_center")
    info = {k: metrics[k] for k in keys if k in metrics}
    if info:
        lines += [", ".join(f"**{k}**: {v}" for k, v in info.items()), ""]
    if metrics.get("protocol") == "realistic":
        lines += [
            "**Realistic protocol**: the K × C shots follow the class distribution and there is no "
            "validation set: every hyperparameter was fixed in advance, nothing was selected and nothing "
            "calibrated on one.",
            "",
        ]
    lines += prior_lines(metrics.get("structure_prior"))
    lines += split_lines(metrics)
    lines += [
        f"Fractions in [0, 1]; brackets are {intervals(metrics)[1]} intervals: {interval_text(metrics)}. "
        "The binary screen is high-risk (" + ", ".join(metrics.get("high_risk", [])) + ") against the rest; "
        f"in this table, {ARGMAX_SCREEN}.",
        "",
        markdown_table(*results_rows(metrics, every_interval=True)),
        "",
        *decision_lines(metrics),
    ]
    if history and figures:
        training_curves_png(history, folder / "training_curves.png")
        lines += ["## Training", "", "![training curves](training_curves.png)", ""]
    for center, m in metrics["centers"].items():
        fallback = m.get("roi_fallback")
        lines += [f"## {center}", "", *center_lines(metrics, center, class_names)]
        if fallback is not None:
            lines += [f"ROI fell back to the whole image for {fallback} of {m['n']} scans.", ""]
        if not figures:
            continue
        confusion_png(
            m["confusion"], class_names, f"{center} (n={m['n']})", folder / f"confusion_{center}.png"
        )
        positive, score = scores[center]
        op = m.get("operating_point") or {}
        point = (
            (1 - op["specificity"], op["sensitivity"])
            if op.get("sensitivity") is not None and op.get("specificity") is not None
            else None
        )
        roc_png(
            positive,
            score,
            m["binary"]["auc"],
            f"{center}: high-risk screen",
            folder / f"roc_{center}.png",
            point,
        )
        shown = f"![confusion](confusion_{center}.png) ![ROC](roc_{center}.png)"
        if reliability and center in reliability and "calibration" in m:
            cal = m["calibration"]
            title = f"{center}: ECE {cal['ece_before']:.3f} → {cal['ece_after']:.3f}"
            reliability_png(*reliability[center], title, folder / f"reliability_{center}.png")
            shown += f" ![reliability](reliability_{center}.png)"
        lines += [shown, ""]
    path = folder / "report.md"
    write_text(path, "\n".join(lines))
    return path
