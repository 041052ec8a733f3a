"""Per-center metrics with confidence intervals; undefined metrics are None, never a crash.

5-class: accuracy, macro-F1 (over the classes present in the ground truth), confusion matrix.
Binary high-risk screen (positive classes chosen by name): a scan screens positive when its
predicted class is high-risk; the AUC ranks scans by ``risk_scores``: the probability mass on the
high-risk classes (as float64 log-odds, so that confident scans do not tie at 1.0) or, as the
published code, Σ high-risk logits − Σ other logits (ranked in float64, or through the published
float32 softmax that ties confident scans: ``eval.auc_score``).
Sensitivity, specificity, PPV and NPV are None when their denominator is empty, AUC when only
one binary class is present.

Intervals. Proportions (accuracy, sensitivity, specificity, PPV, NPV, coverage) get Wilson score
intervals, which stay honest at 0/n and n/n where a percentile bootstrap collapses to a point;
when some patient has several scans (not independent), the Wilson interval is taken at the
effective sample size that the patients' spread implies (``proportion_interval``). AUC and
macro-F1 get percentile-bootstrap intervals (seeded), resampling scans or, when some patient has
several scans, patients; resamples in which a metric is undefined are left out of its interval.

Per patient: the scans' class probabilities are aggregated (their mean, or those of the scan with
the highest high-risk probability); a patient is high-risk when any of its scans is, and its class
is the most frequent among its high-risk scans if it has any, else among all its scans (a tie: the
first class). Calibration: the expected calibration error of the top-class confidence over equal-
width bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from scipy.stats import norm, rankdata

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
    logits − Σ other logits, the published score before its sigmoid (same ranking, same AUC);
    "logit_sum_float32": the published score itself, PyTorch's float32 softmax over [Σ other
    logits, Σ high-risk logits], which saturates at 1.0 (and ties) once the sums differ by more
    than about 16.6.
    """
    z = np.asarray(logits, dtype=np.float64)
    if not high_risk.any() or high_risk.all():  # no binary screen: every score is the same
        return np.zeros(len(z))
    if kind == "logit_sum_float32":
        import torch  # the published score is torch's float32 softmax: computed by it, it rounds alike

        z32 = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        sums = torch.stack(
            [z32[:, torch.from_numpy(~high_risk)].sum(1), z32[:, torch.from_numpy(high_risk)].sum(1)], 1
        )
        return torch.softmax(sums, dim=1)[:, 1].double().numpy()
    if kind == "logit_sum":
        return z[:, high_risk].sum(axis=1) - z[:, ~high_risk].sum(axis=1)
    return logsumexp(z[:, high_risk], axis=1) - logsumexp(z[:, ~high_risk], axis=1)


def screen_metrics(positive: np.ndarray, flagged: np.ndarray) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV and NPV of a screen (truth and call, (N,) bool each)."""
    return {
        key: _ratio(int((hit & used).sum()), int(used.sum()))
        for key, (hit, used) in screen_proportions(positive, flagged).items()
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


def _percentile_interval(values: list[float | None], level: float) -> list[float] | None:
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))]


def wilson_interval(successes: float, trials: float, level: float) -> list[float] | None:
    """The Wilson score interval of the proportion successes / trials at `level` (trials may be an
    effective, non-integer sample size); None without trials. At 0/n it is [0, u] with u > 0, at
    n/n [l, 1] with l < 1: never the single point a percentile bootstrap gives there."""
    if trials <= 0:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / trials
    shrink = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / shrink
    half = z / shrink * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    low = 0.0 if successes <= 0 else max(0.0, float(center - half))
    high = 1.0 if successes >= trials else min(1.0, float(center + half))
    return [low, high]


@dataclass(frozen=True)
class Patients:
    """The patient of each scan of a set in which some patient has several scans, and how alike
    the scans of one patient are (``scan_correlation``): what the intervals take into account."""

    ids: np.ndarray
    correlation: float


def intraclass_correlation(values: np.ndarray, ids: np.ndarray) -> float | None:
    """The one-way ANOVA estimate of the intraclass correlation of `values` ((N,) or (N, K), the
    columns' sums of squares added) between the scans of one patient (`ids`), clipped to [0, 1];
    None when it cannot be estimated (fewer than two patients, no patient with two scans, or no
    spread at all)."""
    values = np.asarray(values, dtype=np.float64).reshape(len(ids), -1)
    _, patient = np.unique(np.asarray(ids), return_inverse=True)
    n, k = len(patient), int(patient.max()) + 1 if len(patient) else 0
    if k < 2 or k == n:
        return None
    sizes = np.bincount(patient).astype(np.float64)
    sums = np.zeros((k, values.shape[1]))
    np.add.at(sums, patient, values)
    means = sums / sizes[:, None]
    between = (sizes[:, None] * (means - values.mean(axis=0)) ** 2).sum() / (k - 1)
    within = ((values - means[patient]) ** 2).sum() / (n - k)
    typical = (n - (sizes**2).sum() / n) / (k - 1)  # the mean patient size, adjusted for imbalance
    denominator = between + (typical - 1) * within
    if denominator <= 0:
        return None
    return float(np.clip((between - within) / denominator, 0.0, 1.0))


def scan_patients(
    groups: Sequence[str] | np.ndarray | None, labels: np.ndarray, probs: np.ndarray
) -> Patients | None:
    """The patients of a set's scans for its intervals; None when every scan is its own patient.
    How alike a patient's scans are is the larger of two intraclass correlations, whichever can be
    estimated: of whether each scan is classified right, and of its class probabilities (1 when
    neither can: every scan of a patient is then taken to say the same)."""
    if groups is None:
        return None
    ids = np.asarray(groups)
    if len(np.unique(ids)) == len(ids):
        return None
    estimates = [
        intraclass_correlation(probs.argmax(axis=1) == labels, ids),
        intraclass_correlation(probs, ids),
    ]
    known = [e for e in estimates if e is not None]
    return Patients(ids, max(known) if known else 1.0)


def proportion_interval(
    hit: np.ndarray, used: np.ndarray, patients: Patients | None, level: float
) -> list[float] | None:
    """Interval of the proportion of `hit` among the scans where `used` ((N,) bool each).

    Independent scans (no `patients`): the Wilson interval. Patients with several scans: the
    Wilson interval at the effective sample size n / deff, with the design effect
    deff = 1 + (m − 1)·ρ, where m = Σ m_i² / Σ m_i is the size-weighted mean number of scans per
    patient among the used scans and ρ the set's intraclass correlation (``scan_patients``). At
    ρ = 1 this is Kish's effective size (Σ m_i)² / Σ m_i², the number of patients when each has as
    many scans; at ρ = 0, the plain Wilson interval. The effective size does not depend on the
    hits, so the interval moves monotonically with them and never collapses at 0 or 1."""
    hit, used = np.asarray(hit, dtype=bool), np.asarray(used, dtype=bool)
    n = int(used.sum())
    if n == 0:
        return None
    successes = int((hit & used).sum())
    if patients is None:
        return wilson_interval(successes, n, level)
    _, patient = np.unique(patients.ids[used], return_inverse=True)
    scans = np.bincount(patient).astype(np.float64)
    effective = n / (1 + ((scans**2).sum() / n - 1) * patients.correlation)
    return wilson_interval(successes / n * effective, effective, level)


def screen_proportions(positive: np.ndarray, flagged: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(hit, used) per scan of each screen metric of `screen_metrics`: the metric is the share of
    `hit` among the scans `used` (its denominator)."""
    return {
        "sensitivity": (flagged, positive),
        "specificity": (~flagged, ~positive),
        "ppv": (positive, flagged),
        "npv": (~positive, ~flagged),
    }


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


def resample_weights(resamples: list[np.ndarray] | np.ndarray, n: int) -> np.ndarray:
    """(R, n) how often each scan is drawn in each bootstrap resample."""
    rows = np.repeat(np.arange(len(resamples)), [len(idx) for idx in resamples])
    flat = np.concatenate(list(resamples)) if len(resamples) else np.zeros(0, dtype=np.int64)
    return (
        np.bincount(rows * n + flat, minlength=len(resamples) * n)
        .reshape(len(resamples), n)
        .astype(np.float64)
    )


def weighted_auc(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(R,) `auc_score` of every resample given by its scan counts `weights` (R, n), at once: the
    Mann–Whitney count over tie groups of the score (NaN where a resample lacks a class). Equal to
    ``auc_score`` on the drawn scans, bit for bit (both count exactly, then divide once)."""
    _, group = np.unique(score, return_inverse=True)
    pos = np.zeros((len(weights), group.max(initial=-1) + 1))
    neg = np.zeros_like(pos)
    np.add.at(pos.T, group[positive], weights[:, positive].T)
    np.add.at(neg.T, group[~positive], weights[:, ~positive].T)
    below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


def weighted_macro_f1(
    weights: np.ndarray, labels: np.ndarray, preds: np.ndarray, n_classes: int
) -> np.ndarray:
    """(R,) `macro_f1` of every resample given by its scan counts `weights` (R, n), at once (equal up
    to the order of the final floating sum)."""
    cells = np.zeros((labels.size, n_classes * n_classes))
    cells[np.arange(labels.size), labels * n_classes + preds] = 1.0
    confusion = (weights @ cells).reshape(len(weights), n_classes, n_classes)
    rows, cols = confusion.sum(axis=2), confusion.sum(axis=1)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    present = rows > 0
    denom = rows + cols
    f1 = np.where(present & (denom > 0), 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(axis=1) / present.sum(axis=1)


def metric_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    high_risk: np.ndarray,
    score: np.ndarray,
    resamples: int,
    level: float,
    seed: int,
    patients: Patients | None = None,
) -> dict[str, Any]:
    """Intervals of every metric of `point_metrics`: Wilson (cluster-adjusted with `patients`) for
    the proportions, and percentile bootstrap for macro-F1 and the AUC (resampling scans or,
    with `patients`, patients; None for both when `resamples` is 0)."""
    preds = probs.argmax(axis=1)
    positive, flagged = high_risk[labels], high_risk[preds]
    every = np.ones(len(labels), dtype=bool)
    boot: dict[str, list[float | None]] = {"macro_f1": [], "auc": []}
    if resamples > 0:
        rng = np.random.default_rng(seed)
        ids = None if patients is None else patients.ids
        weights = resample_weights(resample_indices(ids, len(labels), resamples, rng), len(labels))
        boot["macro_f1"] = weighted_macro_f1(weights, labels, preds, probs.shape[1]).tolist()
        boot["auc"] = [None if np.isnan(a) else float(a) for a in weighted_auc(weights, positive, score)]
    return {
        "accuracy": proportion_interval(preds == labels, every, patients, level),
        "macro_f1": _percentile_interval(boot["macro_f1"], level),
        "binary": {
            "accuracy": proportion_interval(positive == flagged, every, patients, level),
            "auc": _percentile_interval(boot["auc"], level),
            **screen_intervals(positive, flagged, patients, level),
        },
    }


def interval_methods(patients: Patients | None, resamples: int) -> dict[str, Any]:
    """How a center's intervals were computed, in words (metrics.json's "interval_methods"), with
    the intraclass correlation behind the effective sample sizes when patients have several scans."""
    unit = "scans" if patients is None else "patients"
    methods: dict[str, Any] = {
        "proportions": "Wilson score"
        if patients is None
        else f"Wilson score, at the effective sample size of the patients (intraclass correlation "
        f"{patients.correlation:.2f})",
        "auc_macro_f1": f"percentile bootstrap over {unit}, {resamples} resamples" if resamples else "none",
    }
    if patients is not None:
        methods["intraclass_correlation"] = patients.correlation
    return methods


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
    score: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of one center from its class logits (N, C), in the metrics.json layout
    (fractions in [0, 1]), with intervals (``metric_intervals``) that take the patients into
    account when `groups` (a patient id per scan) puts some scans together. The logits are those
    whose softmax is delivered (calibrated ones, logits / T, for a calibrated run), so every metric
    can be recomputed from the delivered probabilities; the AUC ranks `score` when given (see
    ``savlt.engine.calibration.screen_scores``), else ``risk_scores`` of them."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    probs = probabilities(logits)
    n_classes = len(class_names)
    risk = high_risk_mask(class_names, high_risk)
    score = risk_scores(logits, risk, screen_score) if score is None else score
    confusion = np.bincount(labels * n_classes + probs.argmax(1), minlength=n_classes**2).reshape(
        n_classes, n_classes
    )
    result = {
        "n": int(len(labels)),
        **point_metrics(labels, probs, risk, score),
        "confusion": confusion.tolist(),
    }
    patients = scan_patients(groups, labels, probs)
    result[ci_key(level)] = metric_intervals(labels, probs, risk, score, resamples, level, seed, patients)
    result["interval_methods"] = interval_methods(patients, resamples)
    return result


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
    positive: np.ndarray, flagged: np.ndarray, patients: Patients | None, level: float
) -> dict[str, list[float] | None]:
    """Intervals of `screen_metrics` (``proportion_interval``: Wilson, cluster-adjusted with `patients`)."""
    return {
        key: proportion_interval(hit, used, patients, level)
        for key, (hit, used) in screen_proportions(positive, flagged).items()
    }


def referred(probs: np.ndarray, high_risk: np.ndarray, threshold_log_odds: float | None) -> np.ndarray:
    """(N,) bool: the referral of each scan (or patient) from its calibrated class probabilities
    (N, C). The rule: refer when the predicted class (the argmax) is high-risk, or when the
    high-risk log-odds reach the referral threshold (when there is one). So the screen never
    contradicts the diagnosis: a scan diagnosed high-risk is always referred."""
    flagged = high_risk[np.asarray(probs).argmax(axis=1)]
    if threshold_log_odds is not None:
        flagged = flagged | (high_risk_log_odds(probs, high_risk) >= threshold_log_odds)
    return flagged


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
    screen: bool = False,
    threshold: float | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """metrics.json's "patient" block: the patients' accuracy and binary screen (argmax of the
    aggregated probabilities, AUC on their high-risk log-odds), with intervals over patients, and,
    with `screen`, the referral screen (``referred``, at the high-risk log-odds `threshold` when
    there is one) of the aggregated probabilities."""
    _, patient_labels, patient_probs = aggregate_patients(labels, probs, groups, high_risk, how)
    score = high_risk_log_odds(patient_probs, high_risk)
    block: dict[str, Any] = {"n": int(len(patient_labels)), "aggregate": how}
    block.update(point_metrics(patient_labels, patient_probs, high_risk, score))
    block[ci_key(level)] = metric_intervals(
        patient_labels, patient_probs, high_risk, score, resamples, level, seed
    )
    if screen:
        positive = high_risk[patient_labels]
        flagged = referred(patient_probs, high_risk, threshold)
        block["operating_point"] = {
            **screen_metrics(positive, flagged),
            ci_key(level): screen_intervals(positive, flagged, None, level),
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
