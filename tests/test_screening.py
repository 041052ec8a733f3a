"""The screening answer: the referral rule (never contradicting the diagnosis), the operating point
that is or is not established, prediction sets (split conformal), and the figures and wording a
reader looks at first."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from conftest import fast_config
from PIL import Image

from savlt.cli import main
from savlt.engine.calibration import (
    Calibration,
    conformal_quantile,
    decision_blocks,
    fit_calibration,
    prediction_sets,
)
from savlt.engine.loaded import load_run
from savlt.engine.training import train
from savlt.report.plots import heatmap_png, heatmap_title
from savlt.report.summary import decision_table, results_table

NAMES = ["mild_inflammation", "cyst", "ectropion", "high-grade_squamous_intraepithelial_lesion", "cancer"]
HIGH_RISK = NAMES[3:]

# ---------------------------------------------------------------- prediction sets


def test_set_rules_and_the_quantile_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.1, 0.06, 0.04], [0.22, 0.2, 0.2, 0.19, 0.19]])
    # LAC: the classes with 1 − p <= q, i.e. p >= 1 − q
    assert prediction_sets(probs, 0.75, "lac").tolist() == [
        [True, True, False, False, False],
        [False, False, False, False, False],  # no class reaches 0.25: an empty set, as it is
    ]
    assert prediction_sets(probs, 0.81, "lac")[1].tolist() == [True, True, True, True, True]
    # APS: the classes whose mass with those ranked above is within q (0.5, 0.8, 0.9, 0.96, 1.0 for
    # the first scan), and always the top class
    assert prediction_sets(probs, 0.85, "aps")[0].tolist() == [True, True, False, False, False]
    assert prediction_sets(probs, 0.9, "aps")[0].tolist() == [True, True, True, False, False]
    assert prediction_sets(probs, 0.4, "aps")[0].tolist() == [True, False, False, False, False]
    assert prediction_sets(probs, 0.62, "aps")[1].tolist() == [True, True, True, False, False]
    # the ⌈(n + 1)(1 − α)⌉-th smallest true-class score: n = 9 at α = 0.1 takes the 9th (the largest)
    labels = np.zeros(9, dtype=int)
    probs = np.tile([0.5, 0.5, 0, 0, 0], (9, 1)).astype(float)
    probs[:, 0] = np.linspace(0.1, 0.9, 9)
    probs[:, 1] = 1 - probs[:, 0]
    assert conformal_quantile(probs, labels, 0.1, "lac") == pytest.approx(0.9)  # 1 − 0.1
    assert conformal_quantile(probs, labels, 0.2, "lac") == pytest.approx(0.8)  # ⌈10 · 0.8⌉ = 8th
    assert conformal_quantile(probs[:8], labels[:8], 0.1, "lac") == 1.0  # ⌈9 · 0.9⌉ = 9 > 8: every class


def test_an_aps_set_is_never_empty_even_for_a_confident_scan() -> None:
    """APS always holds the top class: a scan surer than the validation scans gets that class,
    not an empty set (a LAC set may be empty, and then means the opposite: no class is probable
    enough)."""
    labels = np.zeros(20, dtype=int)
    probs = np.tile([0.7, 0.2, 0.1, 0.0, 0.0], (20, 1))
    probs[:, 0] = np.linspace(0.6, 0.85, 20)
    probs[:, 1] = 0.9 - probs[:, 0]
    q = conformal_quantile(probs, labels, 0.1, "aps")
    assert 0.6 < q < 0.85
    confident = np.array([[0.99, 0.005, 0.005, 0.0, 0.0], [0.5, 0.3, 0.2, 0.0, 0.0]])
    sets = prediction_sets(confident, q, "aps")
    assert sets[0].tolist() == [True, False, False, False, False]  # 0.99 > q, yet not empty
    assert sets[1].tolist() == [True, True, False, False, False]  # 0.5 and 0.8 within q


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_coverage_on_exchangeable_data_lies_within_the_finite_sample_bound(score: str) -> None:
    """Calibration and test scans drawn alike: the mean coverage over many draws lies in
    [1 − α, 1 − α + 1/(n + 1)] (up to the Monte-Carlo error of the mean)."""
    rng = np.random.default_rng(7)
    alpha, n, test, rounds = 0.1, 60, 400, 300
    coverage = []
    for _ in range(rounds):
        logits = rng.normal(0, 1.5, (n + test, 5))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        labels = (probs.cumsum(axis=1) < rng.random((n + test, 1))).sum(axis=1)  # y ~ probs: calibrated
        q = conformal_quantile(probs[:n], labels[:n], alpha, score)
        sets = prediction_sets(probs[n:], q, score)
        coverage.append(sets[np.arange(test), labels[n:]].mean())
    mean, error = np.mean(coverage), 3 * np.std(coverage) / math.sqrt(rounds)
    assert 1 - alpha - error <= mean <= 1 - alpha + 1 / (n + 1) + error
    assert np.mean(coverage) < 0.99  # the sets are not simply every class


def test_the_operating_point_counts_high_risk_patients_not_scans() -> None:
    """Twenty neighbouring B-scans of two patients are not twenty independent high-risk scans."""
    labels = np.array([3] * 20 + [0] * 20)
    logits = 1.5 * np.eye(5)[labels] + np.random.default_rng(1).normal(0, 1, (40, 5))  # not separated
    two = np.array(["a"] * 10 + ["b"] * 10 + [f"n{i}" for i in range(20)])
    fitted = fit_calibration(logits, labels, two, NAMES, HIGH_RISK, 0.95)
    assert (fitted.positives, fitted.positive_patients) == (20, 2) and not fitted.established
    assert "20 high-risk scans from 2 patients, fewer than the 20" in fitted.not_established_because
    each = fit_calibration(logits, labels, [str(i) for i in range(40)], NAMES, HIGH_RISK, 0.95)
    assert each.positive_patients == 20 and each.established


def test_a_screen_that_misses_its_target_beyond_doubt_is_marked_failed(synth_root: Path) -> None:
    """decision_blocks computes the verdict: failed only when the sensitivity and the upper end of
    its interval are below the target."""
    cfg = fast_config(synth_root)
    fitted = Calibration(threshold=0.5, threshold_log_odds=0.0, scans=60, positives=30, positive_patients=30)
    assert fitted.established and fitted.target_sensitivity == 0.95
    labels = np.array([3] * 40 + [0] * 40)
    called = np.array([3] * 10 + [0] * 30 + [0] * 40)  # 10 of 40 high-risk scans called high-risk
    logits = np.log(np.eye(5)[called] * 0.9 + 0.02)
    ids = [str(i) for i in range(80)]
    op = decision_blocks(labels, logits, ids, None, cfg, fitted, 0)["operating_point"]
    assert op["sensitivity"] == 0.25 and op["ci95"]["sensitivity"][1] < 0.95 and op["screen_failed"] is True
    called[:39] = 3  # 39 of 40 found: below the target, but not beyond doubt
    op = decision_blocks(labels, np.log(np.eye(5)[called] * 0.9 + 0.02), ids, None, cfg, fitted, 0)
    op = op["operating_point"]
    assert op["sensitivity"] == 39 / 40 > 0.95 or op["ci95"]["sensitivity"][1] >= 0.95
    assert op["screen_failed"] is False


def test_the_fit_records_the_sets_and_warns_when_the_draw_is_too_small() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 8)
    logits = rng.normal(0, 1, (8, 5)) + 3 * np.eye(5)[labels]
    fitted = fit_calibration(logits, labels, [str(i) for i in range(8)], NAMES, HIGH_RISK, 0.95, 0.1, "aps")
    assert (fitted.conformal_alpha, fitted.conformal_score, fitted.conformal_quantile) == (0.1, "aps", 1.0)
    assert any("too few for prediction sets" in w for w in fitted.warnings)
    assert fitted.prediction_sets(logits).all()


# ---------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def run_folder(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A tiny run whose validation draw has 2 high-risk scans: its operating point (target 0.95)
    is not established."""
    out = tmp_path_factory.mktemp("screening") / "run"
    train(fast_config(synth_root, "data.test_centers=[huaxi]"), out, progress=False)
    return out


@pytest.mark.slow
def test_a_high_risk_diagnosis_is_always_referred(run_folder: Path, synth_root: Path) -> None:
    run = load_run(run_folder)
    scans = sorted((synth_root / "huaxi" / "images").rglob("*.jpg"))
    # an established operating point whose threshold refers nothing by itself
    strict = dataclasses.replace(
        run.calibration,
        threshold=0.9999,
        threshold_log_odds=math.log(0.9999 / 0.0001),
        positives=40,
        positive_patients=40,
        scans=80,
    )
    run.calibration = strict
    assert strict.established
    predictions = run.predict(scans)
    high = [p for p in predictions if p.predicted in HIGH_RISK]
    assert high and all(p.referral == "refer" for p in high)  # below the threshold, yet referred
    assert all(p.high_risk_probability < 0.9999 for p in predictions)
    assert all(p.referral == "no referral" for p in predictions if p.predicted not in HIGH_RISK)
    assert all(p.referral_threshold == 0.9999 and p.operating_point_established for p in predictions)


@pytest.mark.slow
def test_an_operating_point_that_is_not_established_is_said_next_to_the_verdict(
    run_folder: Path, synth_root: Path, capsys
) -> None:
    run = load_run(run_folder)
    assert not run.calibration.established and "fewer than the 20" in run.calibration.not_established_because
    scan = sorted((synth_root / "huaxi" / "images" / "cancer").iterdir())[0]
    (prediction,) = run.predict([scan])
    assert prediction.operating_point_established is False and prediction.referral_threshold is None
    assert "operating point not established" in prediction.referral_rule
    assert "falls back to the predicted class" in prediction.referral_rule
    assert prediction.referral == ("refer" if prediction.predicted in HIGH_RISK else "no referral")
    assert main(["predict", str(run_folder), str(scan), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"{prediction.referral} (predicted class; operating point not established)" in printed
    assert "falls back to the predicted class" in printed
    metrics = run.evaluate(progress=False)
    op = metrics["centers"]["huaxi"]["operating_point"]
    assert op["established"] is False and op["threshold"] is None and "not established" in op["rule"]
    table = decision_table(metrics)
    assert table.startswith("Referral screen (operating point not established") and "not established" in table
    assert results_table(metrics).startswith("Results per center (screen: the predicted class is high-risk)")


@pytest.mark.slow
def test_a_failed_screen_is_marked_and_the_report_says_research_use(run_folder: Path) -> None:
    metrics = load_run(run_folder).evaluate(progress=False)
    for center, m in metrics["centers"].items():
        op = m["operating_point"]
        upper = op["ci95"]["sensitivity"][1]
        assert op["screen_failed"] == (op["sensitivity"] < 0.95 and upper < 0.95), center
        failed_here = op["screen_failed"]
        assert ("FAILED" in decision_table(metrics).split(center, 1)[1].splitlines()[0]) == failed_here
    # a screen that misses most high-risk scans fails, and the terminal and the report say so
    forced = {
        **metrics,
        "centers": {
            "huaxi": {
                **metrics["centers"]["huaxi"],
                "operating_point": {
                    **metrics["centers"]["huaxi"]["operating_point"],
                    "sensitivity": 0.1,
                    "ci95": {"sensitivity": [0.03, 0.3]},
                    "screen_failed": True,
                },
            }
        },
    }
    assert "The screen FAILED on huaxi" in decision_table(forced)
    report = (run_folder / "evaluation" / "report.md").read_text()
    assert "Research use only, not a medical device" in report and "Wilson score" in report
    assert "**Referral rule**: operating point not established" in report
    assert "## Prediction sets" in report


@pytest.mark.slow
def test_predict_skips_the_mask_folders_of_a_center(
    run_folder: Path, synth_root: Path, tmp_path: Path, capsys
) -> None:
    center = tmp_path / "mixed"
    shutil.copytree(synth_root / "mixed", center)
    scans = len(list((center / "images").rglob("*.png")))
    masks = len(list((center / "masks").rglob("*.png")))
    assert masks > 0
    assert main(["predict", str(run_folder), str(center), "--json", "-q"]) == 0
    captured = capsys.readouterr()
    predicted = json.loads(captured.out)
    assert len(predicted) == scans and not any("/masks/" in p["path"] for p in predicted)
    assert f"{masks} file(s) in masks/ folders skipped (tissue masks, not scans)" in captured.err


def test_a_test_center_named_like_the_validation_predictions_is_refused(
    synth_root: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth_root / "mixed", root / "mixed")
    shutil.copytree(synth_root / "huaxi", root / "validation")
    args = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "-q"]
    args += [f"--set={o}" for o in ("model.backbone=tiny", "train.shots=4", "train.max_steps=1")]
    assert main(args) == 2
    assert "a test center is named 'validation'" in capsys.readouterr().err


def test_heat_maps_are_titled_on_a_perceptually_uniform_scale(tmp_path: Path) -> None:
    uniform = np.zeros((14, 14))
    uniform[4:] = 1 / (10 * 14)  # attention spread evenly: 1 on the 0–4 scale
    image = np.full((96, 128, 3), 120, np.uint8)
    title = heatmap_title("/data/scan.png", "cancer", 0.4)
    assert title == "scan.png: cancer 40.0 %"
    heatmap_png(image, uniform, (0.0, 0.3, 1.0, 1.0), tmp_path / "heat.png", title)
    pixels = np.asarray(Image.open(tmp_path / "heat.png").convert("RGB")).astype(float)
    height, width, _ = pixels.shape
    # the middle of the scan: 45 % of magma at 1/4 of its scale over the grey scan
    expected = 0.45 * 255 * np.array(matplotlib.colormaps["magma"](0.25)[:3]) + 0.55 * 120
    assert np.abs(pixels[height // 2, int(0.41 * width)] - expected).max() <= 2
    untitled = tmp_path / "untitled.png"
    heatmap_png(image, uniform, (0.0, 0.3, 1.0, 1.0), untitled)
    top = slice(0, int(0.05 * height))
    assert (pixels[top] < 128).any() and (np.asarray(Image.open(untitled).convert("RGB"))[top] > 250).all()
