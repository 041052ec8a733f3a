"""Per-center metrics with bootstrap confidence intervals; undefined metrics are None, never a crash.

5-class: accuracy, macro-F1 (over the classes present in the ground truth), confusion matrix.
Binary high-risk screen (positive classes chosen by name): a scan screens positive when its
predicted class is high-risk; the AUC ranks scans by ``risk_scores``: the probability mass on the
high-risk classes (as float64 log-odds, so that confident scans do not tie at 1.0) or, as the
published code, Σ high-risk logits − Σ other logits (``eval.auc_score``).
Sensitivity, specificity, PPV and NPV are None when their denominator is empty, AUC when only
one binary class is present. Intervals: percentile bootstrap over scans (seeded), resamples in
which a metric is undefined are left out of that metric's interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from scipy.stats import rankdata

BINARY_KEYS = ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv")


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


def point_metrics(
    labels: np.ndarray, probs: np.ndarray, high_risk: np.ndarray, score: np.ndarray
) -> dict[str, Any]:
    """The metrics of one set of predictions (labels (N,), probs (N, C), high_risk (C,) bool,
    score (N,) of the binary screen)."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    positive = high_risk[labels]
    flagged = high_risk[preds]
    tp = int((positive & flagged).sum())
    tn = int((~positive & ~flagged).sum())
    fp = int((~positive & flagged).sum())
    fn = int((positive & ~flagged).sum())
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": macro_f1(labels, preds, n_classes),
        "binary": {
            "accuracy": float((positive == flagged).mean()),
            "auc": auc_score(positive, score),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
        },
    }


def _interval(values: list[float | None], level: float) -> list[float] | None:
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))]


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    high_risk: np.ndarray,
    score: np.ndarray,
    resamples: int,
    level: float,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    draws = [
        point_metrics(labels[idx], probs[idx], high_risk, score[idx])
        for idx in rng.integers(0, len(labels), size=(resamples, len(labels)))
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
) -> dict[str, Any]:
    """Every metric of one center from its class logits (N, C), in the metrics.json layout
    (fractions in [0, 1])."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    probs = probabilities(logits)
    n_classes = len(class_names)
    risk = np.array([name in high_risk for name in class_names])
    score = risk_scores(logits, risk, screen_score)
    confusion = np.bincount(labels * n_classes + probs.argmax(1), minlength=n_classes**2).reshape(
        n_classes, n_classes
    )
    result = {
        "n": int(len(labels)),
        **point_metrics(labels, probs, risk, score),
        "confusion": confusion.tolist(),
    }
    result["ci95" if abs(level - 0.95) < 1e-9 else f"ci{round(level * 100)}"] = (
        bootstrap_intervals(labels, probs, risk, score, resamples, level, seed) if resamples > 0 else None
    )
    return result
