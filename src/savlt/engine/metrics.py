"""Per-center metrics with bootstrap confidence intervals; undefined metrics are None, never a crash.

5-class: accuracy, macro-F1 (over the classes present in the ground truth), confusion matrix.
Binary high-risk screen (positive classes chosen by name): a scan screens positive when its
predicted class is high-risk; the AUC ranks scans by ``risk_scores``: the probability mass on the
high-risk classes (as float64 log-odds, so that confident scans do not tie at 1.0) or, as the
published code, Σ high-risk logits − Σ other logits (``eval.auc_score``).
Sensitivity, specificity, PPV and NPV are None when their denominator is empty, AUC when only
one binary class is present. Intervals: percentile bootstrap (seeded) over scans, or over patients
when some patient has several scans (its scans are not independent); resamples in which a metric
is undefined are left out of that metric's interval.

Per patient: the scans' class probabilities are aggregated (their mean, or those of the scan with
the highest high-risk probability); a patient is high-risk when any of its scans is, and its class
is the most frequent among its high-risk scans if it has any, else among all its scans (a tie: the
first class). Calibration: the expected calibration error of the top-class confidence over equal-
width bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from scipy.stats import rankdata

BINARY_KEYS = ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv")
SCREEN_KEYS = ("sensitivity", "specificity", "ppv", "npv")
ECE_BINS = 10


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def auc_score(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann–Whitney) formula; ties count one half."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    present = np.unique(labels)
    confusion = np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    tp = np.diag(confusion)[present]
    denom = confusion.sum(axis=0)[present] + confusion.sum(axis=1)[present]
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities in float64."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def risk_scores(logits: np.ndarray, high_risk: np.ndarray, kind: str = "probability") -> np.ndarray:
    """(N,) float64 score of the high-risk screen from class logits (N, C); higher = more at risk.

    "probability": log p(high-risk) − log p(other), which orders scans exactly as the probability
    mass on the high-risk classes does but does not saturate at 1.0; "logit_sum": Σ high-risk
    logits − Σ other logits, the published score before its sigmoid (same ranking, same AUC).
    """
    z = np.asarray(logits, dtype=np.float64)
    if not high_risk.any() or high_risk.all():  # no binary screen: every score is the same
        return np.zeros(len(z))
    if kind == "logit_sum":
        return z[:, high_risk].sum(axis=1) - z[:, ~high_risk].sum(axis=1)
    return logsumexp(z[:, high_risk], axis=1) - logsumexp(z[:, ~high_risk], axis=1)


def screen_metrics(positive: np.ndarray, flagged: np.ndarray) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV and NPV of a screen (truth and call, (N,) bool each)."""
    tp = int((positive & flagged).sum())
    tn = int((~positive & ~flagged).sum())
    fp = int((~positive & flagged).sum())
    fn = int((positive & ~flagged).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def point_metrics(
    labels: np.ndarray, probs: np.ndarray, high_risk: np.ndarray, score: np.ndarray
) -> dict[str, Any]:
    """The metrics of one set of predictions (labels (N,), probs (N, C), high_risk (C,) bool,
    score (N,) of the binary screen)."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    positive = high_risk[labels]
    flagged = high_risk[preds]
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": macro_f1(labels, preds, n_classes),
        "binary": {
            "accuracy": float((positive == flagged).mean()),
            "auc": auc_score(positive, score),
            **screen_metrics(positive, flagged),
        },
    }


def _interval(values: list[float | None], level: float) -> list[float] | None:
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))]


def resample_indices(
    groups: np.ndarray | None, n: int, resamples: int, rng: np.random.Generator
) -> list[np.ndarray] | np.ndarray:
    """Bootstrap resamples of `n` scans: the scans drawn with replacement or, when `groups` (a
    patient id per scan) puts some scans together, the patients drawn with replacement, each
    bringing all of its scans."""
    if groups is None or len(np.unique(groups)) == n:
        return rng.integers(0, n, size=(resamples, n))
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # the scans, patient by patient
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    draws = rng.integers(0, len(counts), size=(resamples, len(counts))).ravel()
    lengths = counts[draws]
    # position k of the flattened resamples -> k - (start of its patient block) + (start of the patient)
    flat = np.repeat(starts[draws] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    bounds = np.cumsum(lengths.reshape(resamples, -1).sum(axis=1))[:-1]
    return np.split(order[flat], bounds)


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    high_risk: np.ndarray,
    score: np.ndarray,
    resamples: int,
    level: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Percentile intervals of every metric of `point_metrics`, resampling scans or, with
    `groups`, patients (see `resample_indices`)."""
    rng = np.random.default_rng(seed)
    draws = [
        point_metrics(labels[idx], probs[idx], high_risk, score[idx])
        for idx in resample_indices(groups, len(labels), resamples, rng)
    ]
    out: dict[str, Any] = {key: _interval([d[key] for d in draws], level) for key in ("accuracy", "macro_f1")}
    out["binary"] = {key: _interval([d["binary"][key] for d in draws], level) for key in BINARY_KEYS}
    return out


def center_metrics(
    labels: Sequence[int] | np.ndarray,
    logits: np.ndarray,
    class_names: Sequence[str],
    high_risk: Sequence[str],
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    screen_score: str = "probability",
    groups: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of one center from its class logits (N, C), in the metrics.json layout
    (fractions in [0, 1]); the intervals resample patients when `groups` (a patient id per scan)
    puts some scans together."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    probs = probabilities(logits)
    n_classes = len(class_names)
    risk = high_risk_mask(class_names, high_risk)
    score = risk_scores(logits, risk, screen_score)
    confusion = np.bincount(labels * n_classes + probs.argmax(1), minlength=n_classes**2).reshape(
        n_classes, n_classes
    )
    result = {
        "n": int(len(labels)),
        **point_metrics(labels, probs, risk, score),
        "confusion": confusion.tolist(),
    }
    result[ci_key(level)] = (
        bootstrap_intervals(labels, probs, risk, score, resamples, level, seed, _ids(groups))
        if resamples > 0
        else None
    )
    return result


def _ids(groups: Sequence[str] | np.ndarray | None) -> np.ndarray | None:
    return None if groups is None else np.asarray(groups)


def ci_key(level: float) -> str:
    """The key of the intervals in metrics.json: "ci95" at the default level."""
    return "ci95" if abs(level - 0.95) < 1e-9 else f"ci{round(level * 100)}"


def high_risk_mask(class_names: Sequence[str], high_risk: Sequence[str]) -> np.ndarray:
    """(C,) bool: which classes screen positive."""
    return np.array([name in high_risk for name in class_names])


def high_risk_log_odds(probs: np.ndarray, high_risk: np.ndarray) -> np.ndarray:
    """(N,) float64 log p(high-risk) − log p(other) from class probabilities (N, C): the
    "probability" score of ``risk_scores`` on their logarithms (floored at 1e-300, so finite)."""
    return risk_scores(np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-300)), high_risk)


def screen_intervals(
    positive: np.ndarray,
    flagged: np.ndarray,
    groups: np.ndarray | None,
    resamples: int,
    level: float,
    seed: int,
) -> dict[str, list[float] | None] | None:
    """Percentile intervals of `screen_metrics`, resampling scans or patients; None without resamples."""
    if resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    draws = [
        screen_metrics(positive[idx], flagged[idx])
        for idx in resample_indices(groups, len(positive), resamples, rng)
    ]
    return {key: _interval([d[key] for d in draws], level) for key in SCREEN_KEYS}


# ------------------------------------------------------------------------------ patients


def aggregate_patients(
    labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, high_risk: np.ndarray, how: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient ids (P,), patient labels (P,), patient class probabilities (P, C)) from scan labels
    (N,), probabilities (N, C) and patient ids (N,); `how` is "mean" (of the scans' probabilities)
    or "max_risk" (the probabilities of the scan with the highest high-risk probability)."""
    ids, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_patients, n_classes = len(ids), probs.shape[1]
    if how == "mean":
        sums = np.zeros((n_patients, n_classes))
        np.add.at(sums, inverse, probs)
        patient_probs = sums / np.bincount(inverse, minlength=n_patients)[:, None]
    else:
        risk = probs[:, high_risk].sum(axis=1)
        order = np.lexsort((-risk, inverse))  # by patient, the riskiest scan first
        first = order[np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]]
        patient_probs = probs[first]
    counts = np.zeros((n_patients, n_classes), dtype=np.int64)
    np.add.at(counts, (inverse, labels), 1)
    has_risk = counts[:, high_risk].sum(axis=1) > 0
    counts[has_risk[:, None] & ~high_risk[None, :]] = 0  # a high-risk patient's class is a high-risk one
    return ids, counts.argmax(axis=1), patient_probs


def patient_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    high_risk: np.ndarray,
    how: str = "mean",
    threshold: float | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """metrics.json's "patient" block: the patients' accuracy and binary screen (argmax of the
    aggregated probabilities, AUC on their high-risk log-odds), with intervals over patients, and,
    with a `threshold` on the high-risk log-odds, the screen at that threshold."""
    _, patient_labels, patient_probs = aggregate_patients(labels, probs, groups, high_risk, how)
    score = high_risk_log_odds(patient_probs, high_risk)
    block: dict[str, Any] = {"n": int(len(patient_labels)), "aggregate": how}
    block.update(point_metrics(patient_labels, patient_probs, high_risk, score))
    block[ci_key(level)] = (
        bootstrap_intervals(patient_labels, patient_probs, high_risk, score, resamples, level, seed)
        if resamples > 0
        else None
    )
    if threshold is not None:
        positive, flagged = high_risk[patient_labels], score >= threshold
        block["operating_point"] = {
            **screen_metrics(positive, flagged),
            ci_key(level): screen_intervals(positive, flagged, None, resamples, level, seed),
        }
    return block


# ------------------------------------------------------------------------------ calibration


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scans, mean confidence, accuracy) per equal-width bin of the top-class confidence; a bin
    without scans has confidence and accuracy NaN."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / counts
        accuracy = np.bincount(index, correct, minlength=bins) / counts
    return counts, mean_confidence, accuracy


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the scan-weighted mean |accuracy − confidence| over the bins."""
    counts, confidence, accuracy = reliability_bins(probs, labels, bins)
    filled = counts > 0
    return float((counts[filled] * np.abs(accuracy[filled] - confidence[filled])).sum() / counts.sum())
