"""Calibrated probabilities, the screening decision and prediction sets, fitted on the validation
draw only.

Temperature scaling: the class logits are divided by the one temperature T that minimises the
negative log-likelihood of the validation draw (never worse there than T = 1). The calibrated
probabilities are the ones SAVLT delivers, and every metric is computed from them.

The referral rule: refer when the predicted class is high-risk, or when the calibrated high-risk
probability reaches the referral threshold (``savlt.engine.metrics.referred``), so the screen never
contradicts the diagnosis. The threshold is the highest at which the validation draw's sensitivity
reaches ``eval.target_sensitivity``. The operating point is *established* only when the draw can
support that target: at least ⌈1 / (1 − target)⌉ high-risk scans (20 at 0.95) and a temperature
inside its range (at an end, the draw is separated perfectly and places no threshold). Otherwise
the screen falls back to the predicted class alone, and every answer says so.

Prediction sets: split-conformal sets at coverage 1 − ``eval.conformal_alpha`` (LAC or APS score,
``eval.conformal_score``), their score threshold the ⌈(n + 1)(1 − α)⌉-th smallest score of the n
validation scans, computed on the model's uncalibrated probabilities so that the temperature,
fitted on the same draw, does not touch the guarantee. A set may be empty (no class scores as well
as the validation scans' true classes did): that is reported, not filled with the top class.

All of it is saved in ``RUN/calibration.json``, so a loaded run predicts with it, and every
evaluated center gets its calibration error before and after, the screen, the prediction sets'
coverage and the per-patient results (``decision_blocks``). The validation draw is small
(min(K, 16) scans per class): the fit says how many scans, high-risk scans and patients it rests
on, and warns when they are too few.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from scipy.optimize import brentq
from scipy.special import expit, log_softmax

from savlt.config import Config
from savlt.data.discover import ImageRecord
from savlt.data.masks import TissueMasks
from savlt.engine.inference import FeatureSource, Inference, run_inference
from savlt.engine.metrics import (
    calibration_error,
    ci_key,
    high_risk_log_odds,
    high_risk_mask,
    patient_metrics,
    probabilities,
    proportion_interval,
    referred,
    risk_scores,
    scan_patients,
    screen_intervals,
    screen_metrics,
)
from savlt.errors import SavltError
from savlt.io import write_json
from savlt.models.savlt import SavltModel

log = logging.getLogger(__name__)

# The temperature is searched in [1/100, 1000] (log scale).
TEMPERATURE_RANGE = (1e-2, 1e3)
# A temperature fitted on fewer validation scans than this is flagged as possibly unstable.
STABLE_SCANS = 50
# The referral decision, in words (predict, predictions CSV, the service).
REFERRAL = {True: "refer", False: "no referral"}
# The referral rule of a run made before calibration existed.
UNCALIBRATED_RULE = "refer when the predicted class is high-risk (this run predates calibration)"
# What the screen is when the operating point is not established (or the run has no threshold).
FALLBACK = "the screen falls back to the predicted class: refer when it is high-risk"
# How a prediction set is written in a CSV cell: its class names joined by this.
SET_SEPARATOR = ";"
# Set membership is score <= quantile, with this slack for float noise in the cumulative sums.
SET_SLACK = 1e-9


class CalibrationError(SavltError):
    """A run's calibration.json that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Calibration:
    """The temperature and the referral threshold of a run, and what they were fitted on."""

    temperature: float = 1.0
    target_sensitivity: float = 0.95
    threshold: float | None = None  # on the calibrated high-risk probability; None: no threshold
    threshold_log_odds: float | None = None  # the same threshold as log p(high-risk) − log p(other)
    scans: int = 0  # validation scans the fit rests on
    positives: int = 0  # of them high-risk
    patients: int = 0
    positive_patients: int | None = None  # patients with a high-risk validation scan (None: not recorded)
    nll_before: float | None = None  # validation NLL at T = 1 and at the fitted T
    nll_after: float | None = None
    warnings: list[str] = field(default_factory=list)
    # Prediction sets (None: fitted before they existed): alpha, score and the score's threshold
    conformal_alpha: float | None = None
    conformal_score: str | None = None
    conformal_quantile: float | None = None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) calibrated class probabilities (float64) from logits."""
        return probabilities(delivered_logits(self, logits))

    @property
    def not_established_because(self) -> str | None:
        """Why the validation draw cannot support the referral threshold (None: it can)."""
        target = self.target_sensitivity
        if self.scans == 0:
            return "there were no validation scans"
        if self.threshold_log_odds is None:
            return "the validation draw had no high-risk scan"
        needed = high_risk_scans_needed(target)
        if math.isinf(needed):
            return "a sensitivity target of 1 cannot be supported by a finite validation draw"
        independent = self.positives if self.positive_patients is None else self.positive_patients
        if independent < needed:
            scans = f"{self.positives} high-risk scans"
            if independent < self.positives:  # neighbouring scans of one patient count once
                scans += f" from {independent} patients"
            return f"the validation draw had {scans}, fewer than the {needed} a sensitivity target of {target:g} needs"
        if any(math.isclose(self.temperature, end, rel_tol=1e-3) for end in TEMPERATURE_RANGE):
            return (
                f"the temperature reached the end of its range ({self.temperature:g}): the validation draw "
                "is separated perfectly, so it cannot place a threshold"
            )
        return None

    @property
    def established(self) -> bool:
        return self.not_established_because is None

    def operating_point(self) -> dict[str, Any]:
        """The referral screen of the run: its rule in words, whether the operating point is
        established (and why not), the threshold in use (None when not) and the target."""
        return {
            "rule": self.rule(),
            "established": self.established,
            "not_established_because": self.not_established_because,
            "threshold": self.threshold if self.established else None,
            "target_sensitivity": self.target_sensitivity,
        }

    @property
    def threshold_in_use(self) -> float | None:
        """The referral threshold the screen uses (on the high-risk log-odds); None when the
        operating point is not established."""
        return self.threshold_log_odds if self.established else None

    def rule(self) -> str:
        """The referral rule in use, in words."""
        if self.established:
            return (
                f"refer when the predicted class is high-risk or p(high-risk) >= {self.threshold:.3f} "
                f"(sensitivity {self.target_sensitivity:g} on {self.positives} high-risk validation scans)"
            )
        return f"operating point not established ({self.not_established_because}); {FALLBACK}"

    def prediction_sets(self, logits: np.ndarray) -> np.ndarray | None:
        """(N, C) bool: each scan's prediction set, from its (uncalibrated) logits; None for a run
        fitted before prediction sets existed."""
        if self.conformal_quantile is None or self.conformal_score is None:
            return None
        return prediction_sets(probabilities(logits), self.conformal_quantile, self.conformal_score)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())


def delivered_logits(calibration: Calibration | None, logits: np.ndarray) -> np.ndarray:
    """(N, C) float64 logits whose softmax is what a run delivers: logits / T with a
    `calibration`, the model's own without one (a run made before calibration existed)."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits if calibration is None else logits / calibration.temperature


def screen_scores(
    calibration: Calibration | None, logits: np.ndarray, high_risk: np.ndarray, kind: str
) -> np.ndarray:
    """(N,) the score the high-risk AUC ranks (``eval.auc_score``): of the delivered logits, except
    the published float32 score, which saturates and so depends on the scale: it is taken from the
    model's own logits, as the published code (which has no temperature) takes it."""
    return risk_scores(
        logits if kind == "logit_sum_float32" else delivered_logits(calibration, logits), high_risk, kind
    )


def referrals(calibration: Calibration | None, probs: np.ndarray, high_risk: np.ndarray) -> np.ndarray:
    """(N,) bool: the run's referral of each scan from its delivered class probabilities (N, C):
    ``referred`` at the threshold in use (none without an established operating point)."""
    return referred(probs, high_risk, None if calibration is None else calibration.threshold_in_use)


def high_risk_scans_needed(target: float) -> float:
    """High-risk validation scans a threshold at sensitivity `target` needs: ⌈1 / (1 − target)⌉,
    the fewest for which missing one scan still meets the target (infinite at a target of 1)."""
    return math.inf if target >= 1 else math.ceil(round(1 / (1 - target), 9))


def conformal_scores(probs: np.ndarray, kind: str) -> np.ndarray:
    """(N, C) nonconformity score of every class: LAC (least ambiguous set-valued classifier)
    1 − p; APS (adaptive prediction sets) the probability mass of the classes ranked at or above it
    (ties in the order of the classes)."""
    probs = np.asarray(probs, dtype=np.float64)
    if kind == "lac":
        return 1 - probs
    order = np.argsort(-probs, axis=1, kind="stable")
    mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    scores = np.empty_like(probs)
    np.put_along_axis(scores, order, mass, axis=1)
    return scores


def conformal_quantile(probs: np.ndarray, labels: np.ndarray, alpha: float, kind: str) -> float:
    """The split-conformal threshold: the ⌈(n + 1)(1 − alpha)⌉-th smallest score of the true
    classes of n calibration scans; 1.0 (every class in every set) when that exceeds n."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.sort(conformal_scores(probs, kind)[np.arange(len(labels)), labels])
    rank = math.ceil(round((len(labels) + 1) * (1 - alpha), 9))
    return 1.0 if rank > len(labels) else float(scores[rank - 1])


def prediction_sets(probs: np.ndarray, quantile: float, kind: str) -> np.ndarray:
    """(N, C) bool: the prediction sets at the conformal threshold `quantile`.

    LAC: the classes whose score 1 − p is at most `quantile`. Such a set may be empty: no class of
    the scan is as probable as the true classes of 1 − alpha of the validation scans were (the
    model is less sure of it than of them), which is said, not hidden by adding the top class.
    APS: the classes whose mass, with the classes ranked above them, is at most `quantile`, and
    always the top class: a scan surer than the validation scans (its top class alone above the
    threshold) gets that class, not an empty set; adding it can only raise the coverage."""
    probs = np.asarray(probs, dtype=np.float64)
    sets = conformal_scores(probs, kind) <= quantile + SET_SLACK
    if kind == "aps":
        sets[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return sets


def load_calibration(path: Path, required: str | None = None) -> Calibration | None:
    """The calibration saved in a run folder; None when it is missing from a run made before
    calibration existed. `required`: why the run must have it (a missing file is then an error
    saying so)."""
    if not path.is_file():
        if required is not None:
            raise CalibrationError(f"calibration file {path} is missing: {required}")
        return None
    try:
        return Calibration(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CalibrationError(
            f"{path} is corrupt ({type(exc).__name__}: {exc}): train the run again"
        ) from None


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    scaled = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-scaled[np.arange(len(labels)), labels].mean())


def _nll_slope(logits: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """d NLL / d beta of softmax(beta · logits): the mean of E_p[z] − z_label."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(log_softmax(beta * z, axis=1))
    return float(((p * z).sum(axis=1) - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in TEMPERATURE_RANGE minimising the NLL of (logits, labels); 1 when that
    would not lower the NLL. The NLL is convex in beta = 1/T, so its minimum is where the slope
    crosses 0 (found to machine precision, so logits equal up to float noise give temperatures
    equal up to float noise), or at an end of the range."""
    low, high = 1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0]
    if _nll_slope(logits, labels, low) >= 0:
        beta = low
    elif _nll_slope(logits, labels, high) <= 0:
        beta = high
    else:
        beta = brentq(lambda b: _nll_slope(logits, labels, b), low, high, xtol=1e-15, rtol=1e-14)
    temperature = 1 / beta
    return temperature if nll(logits, labels, temperature) < nll(logits, labels) else 1.0


def fit_threshold(log_odds: np.ndarray, positive: np.ndarray, target: float) -> float | None:
    """The highest threshold on `log_odds` at which the sensitivity (scans at or above it among
    the positives) reaches `target`: the ⌈target·P⌉-th highest positive score; None without
    positives."""
    scores = np.sort(np.asarray(log_odds)[positive])[::-1]
    if scores.size == 0:
        return None
    return float(scores[math.ceil(target * scores.size - 1e-9) - 1])


def _warnings(fitted: Calibration) -> list[str]:
    warnings = []
    if fitted.scans < STABLE_SCANS:
        warnings.append(
            f"the temperature was fitted on {fitted.scans} validation scans (fewer than {STABLE_SCANS}): "
            "the calibrated probabilities may be unstable"
        )
    if not fitted.established:
        warnings.append(f"operating point not established: {fitted.not_established_because}; {FALLBACK}")
    if fitted.conformal_quantile == 1.0 and fitted.conformal_alpha is not None:
        warnings.append(
            f"{fitted.scans} validation scans are too few for prediction sets at coverage "
            f"{1 - fitted.conformal_alpha:g} (at least {math.ceil(1 / fitted.conformal_alpha) - 1} are "
            "needed): every set holds every class"
        )
    return warnings


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    class_names: Sequence[str],
    high_risk: Sequence[str],
    target: float,
    alpha: float = 0.1,
    score: str = "lac",
) -> Calibration:
    """The temperature, referral threshold and prediction sets fitted on the validation draw's
    logits (N, C), labels (N,) and patient ids (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        warnings = [
            "no validation scans: probabilities are not calibrated, there is no referral threshold "
            f"and no prediction set; {FALLBACK}"
        ]
        return Calibration(target_sensitivity=target, warnings=warnings)
    risk = high_risk_mask(class_names, high_risk)
    temperature = fit_temperature(logits, labels)
    calibrated = probabilities(np.asarray(logits, dtype=np.float64) / temperature)
    positive = risk[labels]
    threshold = fit_threshold(high_risk_log_odds(calibrated, risk), positive, target)
    fitted = Calibration(
        temperature=temperature,
        target_sensitivity=target,
        threshold=None if threshold is None else float(expit(threshold)),
        threshold_log_odds=threshold,
        scans=len(labels),
        positives=int(positive.sum()),
        patients=len(set(groups)),
        positive_patients=len(set(np.asarray(groups)[positive])),
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        conformal_alpha=alpha,
        conformal_score=score,
        conformal_quantile=conformal_quantile(probabilities(logits), labels, alpha, score),
    )
    return replace(fitted, warnings=_warnings(fitted))


def calibrate(
    model: SavltModel,
    records: list[ImageRecord],
    cfg: Config,
    accelerator: Accelerator,
    masks: TissueMasks,
    progress: bool = True,
    unassessable: Mapping[Path, str] | None = None,
    features: FeatureSource | None = None,
) -> tuple[Calibration, Inference | None]:
    """Score the validation draw `records` with the trained model and fit the calibration on it,
    leaving out the scans that cannot be assessed (`unassessable`) unless ``eval.unassessable``
    is "include"; returns it with the validation predictions (None without validation scans)."""
    logits, labels, groups = np.zeros((0, len(cfg.class_names))), np.zeros(0, dtype=np.int64), []
    result = None
    if records:
        show = progress and accelerator.is_main_process
        store = masks.masks_for(records, progress=show) if model.uses_masks else None
        result = run_inference(
            model, records, cfg, accelerator, store, "calibrating", progress, features=features
        )
        flagged = unassessable or {}
        keep = np.array(
            [cfg.eval.unassessable == "include" or r.path not in flagged for r in result.records], dtype=bool
        )
        logits, labels = result.logits[keep], result.labels[keep]
        groups = [r.patient_id for r, k in zip(result.records, keep, strict=True) if k]
    ev = cfg.eval
    fitted = fit_calibration(
        logits,
        labels,
        groups,
        cfg.class_names,
        cfg.data.high_risk,
        ev.target_sensitivity,
        ev.conformal_alpha,
        ev.conformal_score,
    )
    threshold = "none" if fitted.threshold is None else f"{fitted.threshold:.3f}"
    log.info(
        "calibration on %d validation scans (%d high-risk, %d patients): temperature %.3g, NLL %s -> %s, "
        "referral threshold %s on p(high-risk) for sensitivity %g",
        fitted.scans,
        fitted.positives,
        fitted.patients,
        fitted.temperature,
        "n/a" if fitted.nll_before is None else f"{fitted.nll_before:.3f}",
        "n/a" if fitted.nll_after is None else f"{fitted.nll_after:.3f}",
        threshold,
        fitted.target_sensitivity,
    )
    for warning in fitted.warnings:
        log.warning("calibration: %s", warning)
    return fitted, result


def screen_failed(block: dict[str, Any], key: str) -> bool | None:
    """Whether a screen's sensitivity (an "operating_point" block, intervals under `key`) fails its
    target beyond doubt: below it, and the upper end of its interval below it too. None when the
    sensitivity is undefined (no high-risk scans)."""
    sensitivity = block.get("sensitivity")
    if sensitivity is None:
        return None
    upper = ((block.get(key) or {}).get("sensitivity") or [None, sensitivity])[1]
    target = block["target_sensitivity"]
    return bool(sensitivity < target and upper < target)


def decision_blocks(
    labels: np.ndarray,
    logits: np.ndarray,
    groups: Sequence[str],
    patient_source: str | None,
    cfg: Config,
    calibration: Calibration | None,
    seed: int,
) -> dict[str, Any]:
    """A center's "calibration" (temperature, ECE before and after), "operating_point" (the
    referral screen as delivered, with intervals that account for patients with several scans),
    "prediction_sets" (coverage and mean size) and "patient" blocks (`patient_source`: where its
    patients came from, None: every scan its own patient); without a calibration (a run made
    before it existed) only the patient block, from the uncalibrated probabilities."""
    ev = cfg.eval
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.asarray(groups)
    risk = high_risk_mask(cfg.class_names, cfg.data.high_risk)
    raw = probabilities(logits)
    probs = probabilities(delivered_logits(calibration, logits))
    key = ci_key(ev.ci_level)
    patients = scan_patients(ids, labels, probs)
    blocks: dict[str, Any] = {}
    if calibration is not None:
        blocks["calibration"] = {
            "temperature": calibration.temperature,
            "ece_before": calibration_error(raw, labels),
            "ece_after": calibration_error(probs, labels),
        }
        positive = risk[labels]
        flagged = referrals(calibration, probs, risk)
        op = {
            **calibration.operating_point(),
            **screen_metrics(positive, flagged),
            key: screen_intervals(positive, flagged, patients, ev.ci_level),
        }
        blocks["operating_point"] = {**op, "screen_failed": screen_failed(op, key)}
        sets = calibration.prediction_sets(logits)
        if sets is not None:
            covered = sets[np.arange(len(labels)), labels]
            blocks["prediction_sets"] = {
                "alpha": calibration.conformal_alpha,
                "score": calibration.conformal_score,
                "coverage": float(covered.mean()),
                "mean_size": float(sets.sum(axis=1).mean()),
                "empty": float((~sets.any(axis=1)).mean()),
                key: {"coverage": proportion_interval(covered, np.ones_like(covered), patients, ev.ci_level)},
            }
    blocks["patient"] = {
        "source": patient_source,
        **patient_metrics(
            labels,
            probs,
            ids,
            risk,
            ev.patient_aggregate,
            calibration is not None,
            None if calibration is None else calibration.threshold_in_use,
            ev.bootstrap,
            ev.ci_level,
            seed,
        ),
    }
    return blocks
