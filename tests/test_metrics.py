"""Metrics against hand-computed values and scikit-learn, undefined cases and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from savlt.engine.metrics import auc_score, center_metrics
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
    assert m["ci95"] is None


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
    low, high = first["ci95"]["accuracy"]
    assert low < first["accuracy"] < high and high - low < 0.15
    assert center_metrics(labels, probs, CLASSES, HIGH_RISK, resamples=300, seed=1)["ci95"] == first["ci95"]
    assert all(0 <= v <= 1 for v in first["ci95"]["binary"]["auc"])


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
