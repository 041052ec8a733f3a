"""Calibrated probabilities and the screening decision, fitted on the validation draw only.

Temperature scaling: the class logits are divided by the one temperature T that minimises the
negative log-likelihood of the validation draw (never worse there than T = 1). The referral
threshold: the highest threshold on the calibrated high-risk probability at which the validation
draw's sensitivity reaches ``eval.target_sensitivity`` (scans at or above it are referred). Both
are saved in ``RUN/calibration.json``, so a loaded run predicts with them, and every evaluated
center gets its calibration error before and after, the screen at the threshold and the per-patient
results (``decision_blocks``).

The validation draw is small (min(K, 16) scans per class): the fit says how many scans, high-risk
scans and patients it rests on, and warns when they are too few to be stable.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from scipy.optimize import brentq
from scipy.special import expit, log_softmax

from savlt.config import Config
from savlt.data.discover import ImageRecord
from savlt.data.masks import TissueMasks
from savlt.engine.inference import run_inference
from savlt.engine.metrics import (
    calibration_error,
    ci_key,
    high_risk_log_odds,
    high_risk_mask,
    patient_metrics,
    probabilities,
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
# The decision at the referral threshold, in words (predict, predictions CSV).
REFERRAL = {True: "refer", False: "no referral"}


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
    nll_before: float | None = None  # validation NLL at T = 1 and at the fitted T
    nll_after: float | None = None
    warnings: list[str] = field(default_factory=list)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) calibrated class probabilities (float64) from logits."""
        return probabilities(np.asarray(logits, dtype=np.float64) / self.temperature)

    def refer(self, log_odds: np.ndarray) -> np.ndarray | None:
        """(N,) bool: referred at the threshold (high-risk log-odds at or above it); None without one."""
        return None if self.threshold_log_odds is None else np.asarray(log_odds) >= self.threshold_log_odds

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())


def load_calibration(path: Path) -> Calibration | None:
    """The calibration saved in a run folder; None for a run made before calibration existed."""
    if not path.is_file():
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


def _warnings(scans: int, positives: int, target: float, temperature: float) -> list[str]:
    warnings = []
    if scans < STABLE_SCANS:
        warnings.append(
            f"the temperature was fitted on {scans} validation scans (fewer than {STABLE_SCANS}): "
            "the calibrated probabilities may be unstable"
        )
    if any(math.isclose(temperature, end, rel_tol=1e-3) for end in TEMPERATURE_RANGE):
        warnings.append(
            f"the temperature reached the end of its range ({temperature:g}): the validation draw "
            "is separated (almost) perfectly, so it says little about calibration"
        )
    if positives == 0:
        warnings.append("no high-risk scan in the validation draw: no referral threshold")
    elif target < 1 and positives < math.ceil(1 / (1 - target)):
        warnings.append(
            f"the referral threshold rests on {positives} high-risk validation scans (fewer than "
            f"{math.ceil(1 / (1 - target))} for a sensitivity target of {target:g}): it is set by the "
            "lowest-scoring one, and the sensitivity on new patients may fall short of the target"
        )
    return warnings


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    class_names: Sequence[str],
    high_risk: Sequence[str],
    target: float,
) -> Calibration:
    """The temperature and referral threshold fitted on the validation draw's logits (N, C),
    labels (N,) and patient ids (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        warnings = [
            "no validation scans: probabilities are not calibrated and there is no referral threshold"
        ]
        return Calibration(target_sensitivity=target, warnings=warnings)
    risk = high_risk_mask(class_names, high_risk)
    temperature = fit_temperature(logits, labels)
    calibrated = probabilities(np.asarray(logits, dtype=np.float64) / temperature)
    positive = risk[labels]
    threshold = fit_threshold(high_risk_log_odds(calibrated, risk), positive, target)
    return Calibration(
        temperature=temperature,
        target_sensitivity=target,
        threshold=None if threshold is None else float(expit(threshold)),
        threshold_log_odds=threshold,
        scans=len(labels),
        positives=int(positive.sum()),
        patients=len(set(groups)),
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        warnings=_warnings(len(labels), int(positive.sum()), target, temperature),
    )


def calibrate(
    model: SavltModel,
    records: list[ImageRecord],
    cfg: Config,
    accelerator: Accelerator,
    masks: TissueMasks,
    progress: bool = True,
) -> Calibration:
    """Score the validation draw `records` with the trained model and fit the calibration on it."""
    logits, labels, groups = np.zeros((0, len(cfg.class_names))), np.zeros(0, dtype=np.int64), []
    if records:
        show = progress and accelerator.is_main_process
        store = masks.masks_for(records, progress=show) if model.uses_masks else None
        result = run_inference(model, records, cfg, accelerator, store, desc="calibrating", progress=progress)
        logits, labels, groups = result.logits, result.labels, [r.patient_id for r in result.records]
    fitted = fit_calibration(
        logits, labels, groups, cfg.class_names, cfg.data.high_risk, cfg.eval.target_sensitivity
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
    return fitted


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
    screen at the referral threshold, with intervals resampling patients) and "patient" blocks
    (`patient_source`: where its patients came from, None: every scan its own patient); without a
    calibration (a run made before it existed) only the patient block, from the uncalibrated
    probabilities."""
    ev = cfg.eval
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.asarray(groups)
    risk = high_risk_mask(cfg.class_names, cfg.data.high_risk)
    raw = probabilities(logits)
    probs = raw if calibration is None else calibration.probabilities(logits)
    threshold = None if calibration is None else calibration.threshold_log_odds
    blocks: dict[str, Any] = {}
    if calibration is not None:
        blocks["calibration"] = {
            "temperature": calibration.temperature,
            "ece_before": calibration_error(raw, labels),
            "ece_after": calibration_error(probs, labels),
        }
    if calibration is not None and threshold is not None:
        positive = risk[labels]
        flagged = high_risk_log_odds(probs, risk) >= threshold
        blocks["operating_point"] = {
            "threshold": calibration.threshold,
            "target_sensitivity": calibration.target_sensitivity,
            **screen_metrics(positive, flagged),
            ci_key(ev.ci_level): screen_intervals(positive, flagged, ids, ev.bootstrap, ev.ci_level, seed),
        }
    blocks["patient"] = {
        "source": patient_source,
        **patient_metrics(
            labels, probs, ids, risk, ev.patient_aggregate, threshold, ev.bootstrap, ev.ci_level, seed
        ),
    }
    return blocks
