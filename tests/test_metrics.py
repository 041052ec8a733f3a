"""Metrics against hand-computed values and scikit-learn, undefined cases, Wilson intervals for
proportions (cluster-adjusted for patients) and bootstrap intervals for AUC and macro-F1."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from savlt.engine.metrics import (
    Patients,
    auc_score,
    center_metrics,
    intraclass_correlation,
    proportion_interval,
    scan_patients,
    wilson_interval,
)
from savlt.report.summary import intervals, results_rows

CLASSES = ["inflammation", "cyst", "ectropion", "hsil", "cancer"]
HIGH_RISK = ["hsil", "cancer"]


def one_hot_probs(preds: list[int], n: int = 5, confidence: float = 0.6) -> np.ndarray:
    probs = np.full((len(preds), n), (1 - confidence) / (n - 1))
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def logits_of(probs: np.ndarray) -> np.ndarray:
    """Logits whose softmax is `probs` (center_metrics takes logits)."""
    return np.log(probs)


def test_hand_computed_example() -> None:
    labels = [0, 1, 3, 4, 4, 2]
    preds = [0, 3, 3, 4, 1, 2]
    m = center_metrics(labels, logits_of(one_hot_probs(preds)), CLASSES, HIGH_RISK, resamples=0)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["confusion"][1][3] == 1 and m["confusion"][4][1] == 1 and np.trace(m["confusion"]) == 4
    b = m["binary"]
    # positives: idx 2 (hsil, flagged), 3 (cancer, flagged), 4 (cancer -> cyst, missed)
    # negatives: idx 0 (ok), 1 (cyst -> hsil, false alarm), 5 (ok)
    assert b["sensitivity"] == pytest.approx(2 / 3)
    assert b["specificity"] == pytest.approx(2 / 3)
    assert b["ppv"] == pytest.approx(2 / 3) and b["npv"] == pytest.approx(2 / 3)
    assert b["accuracy"] == pytest.approx(4 / 6)
    score = one_hot_probs(preds)[:, 3:].sum(axis=1)
    assert b["auc"] == pytest.approx(roc_auc_score([0, 0, 1, 1, 1, 0], score))
    # no resamples: no bootstrap intervals, but the proportions keep their Wilson intervals
    assert m["ci95"]["macro_f1"] is None and m["ci95"]["binary"]["auc"] is None
    assert m["ci95"]["accuracy"] == wilson_interval(4, 6, 0.95)
    assert m["ci95"]["binary"]["sensitivity"] == wilson_interval(2, 3, 0.95)
    assert m["interval_methods"] == {"proportions": "Wilson score", "auc_macro_f1": "none"}


def test_wilson_intervals_at_0_3_and_7_of_7_by_hand() -> None:
    """The Wilson interval (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.96: at 0/n it
    is [0, z²/(n + z²)] and at n/n [n/(n + z²), 1], never a single point."""
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 7, 0.95) == [0.0, pytest.approx(z2 / (7 + z2))]  # [0, 0.3543]
    assert wilson_interval(7, 7, 0.95) == [pytest.approx(7 / (7 + z2)), 1.0]  # [0.6457, 1]
    assert wilson_interval(3, 7, 0.95) == pytest.approx([0.158220, 0.749542], abs=1e-6)
    assert wilson_interval(0, 7, 0.95)[1] == pytest.approx(0.354330, abs=1e-6)
    assert wilson_interval(3, 0, 0.95) is None
    # a center's sensitivity of 7/7 and 0/7 through center_metrics: the same intervals
    labels = [3] * 7 + [0] * 7
    m = center_metrics(labels, logits_of(one_hot_probs([3] * 7 + [0] * 7)), CLASSES, HIGH_RISK, resamples=0)
    assert m["binary"]["sensitivity"] == 1.0
    assert m["ci95"]["binary"]["sensitivity"] == wilson_interval(7, 7, 0.95)
    m = center_metrics(labels, logits_of(one_hot_probs([0] * 14)), CLASSES, HIGH_RISK, resamples=0)
    assert m["binary"]["sensitivity"] == 0.0
    assert m["ci95"]["binary"]["sensitivity"] == wilson_interval(0, 7, 0.95)


def test_patients_with_several_scans_widen_the_interval_without_collapsing_at_0_or_1() -> None:
    """Scans of one patient are alike: the proportion's interval is that of fewer, effective scans,
    n / (1 + (m − 1)·ρ), monotone in the hits."""
    every = np.ones(40, dtype=bool)
    patients = np.repeat([f"p{i}" for i in range(8)], 5)  # 8 patients × 5 scans
    hit = np.repeat([True, False, True, True, False, True, True, True], 5)
    alike = Patients(patients, 1.0)  # ρ = 1: as wide as 8 independent scans
    assert proportion_interval(hit, every, alike, 0.95) == pytest.approx(wilson_interval(6, 8, 0.95))
    assert proportion_interval(every, every, alike, 0.95) == pytest.approx(wilson_interval(8, 8, 0.95))
    assert proportion_interval(hit, every, Patients(patients, 0.0), 0.95) == wilson_interval(30, 40, 0.95)
    half = proportion_interval(hit, every, Patients(patients, 0.5), 0.95)  # deff 3: 40 / 3 scans
    assert half == pytest.approx(wilson_interval(30 / 3, 40 / 3, 0.95))
    # unequal patients, ρ = 1: Kish's effective size (Σm)² / Σm² = 10² / (36 + 4)
    groups = np.repeat([f"q{i}" for i in range(5)], [6, 1, 1, 1, 1])
    none = np.zeros(10, dtype=bool)
    assert proportion_interval(none, ~none, Patients(groups, 1.0), 0.95) == pytest.approx(
        wilson_interval(0, 100 / 40, 0.95)
    )
    # more hits never lower either end (10 patients × 4 scans, whatever ρ)
    groups = np.repeat(np.arange(10).astype(str), 4)
    for rho in (0.0, 0.3, 1.0):
        bounds = [
            proportion_interval(np.arange(40) < hits, np.ones(40, bool), Patients(groups, rho), 0.95)
            for hits in range(41)
        ]
        assert all(b[0] <= c[0] + 1e-12 and b[1] <= c[1] + 1e-12 for b, c in itertools.pairwise(bounds))


def test_the_intraclass_correlation_by_hand() -> None:
    """One-way ANOVA: ρ = (MSB − MSW) / (MSB + (n0 − 1)·MSW)."""
    ids = np.array(["a", "a", "b", "b", "c", "c"])
    values = np.array([1.0, 2.0, 4.0, 5.0, 7.0, 9.0])
    means, grand = np.array([1.5, 4.5, 8.0]), values.mean()
    msb = 2 * ((means - grand) ** 2).sum() / 2
    msw = (0.25 * 4 + 1 + 1) / 3
    assert intraclass_correlation(values, ids) == pytest.approx((msb - msw) / (msb + (2 - 1) * msw))
    assert intraclass_correlation(np.repeat([0.0, 1.0, 0.0], 2), ids) == 1.0  # alike within patients
    assert intraclass_correlation(np.ones(6), ids) is None  # no spread: nothing to estimate
    assert intraclass_correlation(values, np.arange(6).astype(str)) is None  # one scan each
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(4000, 3))
    assert intraclass_correlation(noise, np.repeat(np.arange(1000), 4)) < 0.05  # independent scans
    # a center: classified right or wrong patient by patient, whatever the probabilities say
    labels = rng.integers(0, 5, 40)
    right = np.repeat(rng.random(10) < 0.6, 4)
    probs = one_hot_probs(np.where(right, labels, (labels + 1) % 5).tolist())
    found = scan_patients(np.repeat(np.arange(10).astype(str), 4), labels, probs)
    assert found is not None and found.correlation == 1.0
    assert scan_patients(np.arange(40).astype(str), labels, probs) is None


def test_auc_handles_ties_like_sklearn() -> None:
    rng = np.random.default_rng(0)
    positive = rng.random(200) > 0.6
    score = np.round(rng.random(200) + positive * 0.3, 1)  # many ties
    assert auc_score(positive, score) == pytest.approx(roc_auc_score(positive, score))


def test_a_center_without_high_risk_cases_gets_nulls_not_a_crash() -> None:
    labels = [0, 1, 2, 0]
    m = center_metrics(labels, logits_of(one_hot_probs([0, 1, 1, 3])), CLASSES, HIGH_RISK, resamples=50)
    b = m["binary"]
    assert b["auc"] is None and b["sensitivity"] is None
    assert b["specificity"] == pytest.approx(3 / 4) and b["npv"] == pytest.approx(1.0) and b["ppv"] == 0.0
    assert m["macro_f1"] == pytest.approx(f1_score(labels, [0, 1, 1, 3], average="macro", labels=[0, 1, 2]))
    assert m["ci95"]["binary"]["auc"] is None and m["ci95"]["binary"]["specificity"] is not None


def test_bootstrap_interval_contains_the_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 300)
    preds = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))
    probs = logits_of(one_hot_probs(preds.tolist()))
    first = center_metrics(labels, probs, CLASSES, HIGH_RISK, resamples=300, seed=1)
    low, high = first["ci95"]["macro_f1"]
    assert low < first["macro_f1"] < high and high - low < 0.2
    assert center_metrics(labels, probs, CLASSES, HIGH_RISK, resamples=300, seed=1)["ci95"] == first["ci95"]
    assert center_metrics(labels, probs, CLASSES, HIGH_RISK, resamples=300, seed=2)["ci95"] != first["ci95"]
    assert all(0 <= v <= 1 for v in first["ci95"]["binary"]["auc"])
    assert first["interval_methods"]["auc_macro_f1"] == "percentile bootstrap over scans, 300 resamples"


def test_no_predictions_is_an_error() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        center_metrics([], np.zeros((0, 5)), CLASSES, HIGH_RISK)


@pytest.mark.parametrize("recorded", [True, False])
def test_tables_show_the_intervals_at_the_level_they_were_computed(recorded: bool) -> None:
    """At eval.ci_level=0.9 the intervals are under "ci90"; the tables find them and say 90%
    (from metrics.json's ci_level, or from the key in a file written before it was recorded)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 120)
    preds = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 5, 120))
    m = center_metrics(
        labels, logits_of(one_hot_probs(preds.tolist())), CLASSES, HIGH_RISK, resamples=100, level=0.9
    )
    metrics = {"centers": {"a": {**m, "unassessable": 0}}, **({"ci_level": 0.9} if recorded else {})}
    assert "ci95" not in m and intervals(metrics) == ("ci90", "90%")
    header, rows = results_rows(metrics, every_interval=True)
    assert "accuracy [90% CI]" in header and "sensitivity [90% CI]" in header
    low, high = m["ci90"]["accuracy"]
    assert rows[0][header.index("accuracy [90% CI]")] == f"{m['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
    assert [low, high] == wilson_interval(round(m["accuracy"] * 120), 120, 0.9)


def test_the_vectorised_bootstrap_equals_the_loop_bit_for_bit() -> None:
    """``weighted_auc`` over resample counts gives exactly what ``auc_score`` gives on each drawn
    sample, ``weighted_macro_f1`` ``macro_f1`` up to the order of a floating sum (ties, patients,
    a missing class)."""
    from savlt.engine.metrics import (
        auc_score,
        macro_f1,
        resample_indices,
        resample_weights,
        weighted_auc,
        weighted_macro_f1,
    )

    rng = np.random.default_rng(0)
    for trial in range(12):
        n, classes = int(rng.integers(5, 120)), int(rng.integers(2, 13))
        labels, preds = rng.integers(0, classes, n), rng.integers(0, classes, n)
        score = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # rounded: many ties
        positive = labels == classes - 1
        groups = rng.integers(0, max(1, n // 2), n).astype(str) if trial % 2 else None
        draws = resample_indices(groups, n, 100, np.random.default_rng(trial))
        weights = resample_weights(draws, n)
        aucs, f1s = weighted_auc(weights, positive, score), weighted_macro_f1(weights, labels, preds, classes)
        for r, idx in enumerate(draws):
            expected = auc_score(positive[idx], score[idx])
            assert np.isnan(aucs[r]) if expected is None else aucs[r] == expected, (trial, r)
            assert f1s[r] == pytest.approx(macro_f1(labels[idx], preds[idx], classes), rel=1e-15, abs=0)
