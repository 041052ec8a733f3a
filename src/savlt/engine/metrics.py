"""Per-center metrics with bootstrap confidence intervals; undefined metrics are None, never a crash.

5-class: accuracy, macro-F1 (over the classes present in the ground truth), confusion matrix.
Binary high-risk screen (positive classes chosen by name): a scan screens positive when its
predicted class is high-risk; AUC scores the probability mass on the high-risk classes.
Sensitivity, specificity, PPV and NPV are None when their denominator is empty, AUC when only
one binary class is present. Intervals: percentile bootstrap over scans (seeded), resamples in
which a metric is undefined are left out of that metric's interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
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


def point_metrics(labels: np.ndarray, probs: np.ndarray, high_risk: np.ndarray) -> dict[str, Any]:
    """The metrics of one set of predictions (labels (N,), probs (N, C), high_risk (C,) bool)."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    positive = high_risk[labels]
    flagged = high_risk[preds]
    score = probs[:, high_risk].sum(axis=1)
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
    labels: np.ndarray, probs: np.ndarray, high_risk: np.ndarray, resamples: int, level: float, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    draws = [
        point_metrics(labels[idx], probs[idx], high_risk)
        for idx in rng.integers(0, len(labels), size=(resamples, len(labels)))
    ]
    out: dict[str, Any] = {key: _interval([d[key] for d in draws], level) for key in ("accuracy", "macro_f1")}
    out["binary"] = {key: _interval([d["binary"][key] for d in draws], level) for key in BINARY_KEYS}
    return out


def center_metrics(
    labels: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    high_risk: Sequence[str],
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of one center, in the metrics.json layout (fractions in [0, 1])."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    n_classes = len(class_names)
    risk = np.array([name in high_risk for name in class_names])
    confusion = np.bincount(labels * n_classes + probs.argmax(1), minlength=n_classes**2).reshape(
        n_classes, n_classes
    )
    result = {"n": int(len(labels)), **point_metrics(labels, probs, risk), "confusion": confusion.tolist()}
    result["ci95" if abs(level - 0.95) < 1e-9 else f"ci{round(level * 100)}"] = (
        bootstrap_intervals(labels, probs, risk, resamples, level, seed) if resamples > 0 else None
    )
    return result
