"""Scoring a run's sets of scans into predictions, metrics and a report (``score_sets`` with a
``Scoring`` context), and the first keys of metrics.json (``run_header``). The files it writes are
described once, in ``engine.runfolder.RunPaths``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from savlt.config import Config
from savlt.data.discover import ImageRecord
from savlt.data.masks import TissueMasks
from savlt.engine.calibration import (
    REFERRAL,
    SET_SEPARATOR,
    Calibration,
    decision_blocks,
    delivered_logits,
    referrals,
    screen_scores,
)
from savlt.engine.inference import FeatureSource, Inference, run_inference
from savlt.engine.inputs import RunInputs
from savlt.engine.metrics import (
    center_metrics,
    high_risk_mask,
    probabilities,
    reliability_bins,
)
from savlt.engine.runfolder import RunPaths
from savlt.io import write_csv, write_json
from savlt.models.savlt import SavltModel
from savlt.report.summary import write_report

log = logging.getLogger("savlt")


def structure_prior(cfg: Config, masks: TissueMasks, centers: Sequence[str]) -> dict[str, Any]:
    """Where the evaluated scans' tissue masks came from, and whether the structure prior saw any
    of the evaluated centers: a segmenter trained on a center's masks, or annotated masks used at
    test time (``roi.mask_source=files``), is recorded, never silent."""
    record: dict[str, Any] = {"mask_source": masks.kind}
    if masks.kind == "segmenter":
        record["mask_timing"] = cfg.roi.mask_timing
        trained = getattr(getattr(masks.segmenter, "spec", None), "trained", {}) or {}
        seen = trained.get("centers")
        record["segmenter"] = str(cfg.roi.segmenter)
        record["segmenter_centers"] = seen  # None: not recorded (e.g. an imported segmenter)
        record["evaluated_centers_seen"] = None if seen is None else [c for c in centers if c in seen]
    elif masks.kind == "files":
        record["annotated_masks_at_test_time"] = list(centers)
    return record


def run_header(
    cfg: Config, backbone: str, inputs: RunInputs, masks: TissueMasks, calibration: Calibration | None = None
) -> dict[str, Any]:
    """The first keys of metrics.json: what was trained, on what, with which structure prior, how
    the training center was split, and what the calibration was fitted on."""
    header = {
        "method": cfg.method,
        "protocol": cfg.protocol,
        "backbone": backbone,
        "shots": cfg.train.shots,
        "seed": cfg.train.seed,
        "train_center": inputs.train_center,
        "high_risk": list(cfg.data.high_risk),
        "structure_prior": structure_prior(cfg, masks, list(inputs.eval_sets())),
        "split": inputs.split_summary(),
    }
    if calibration is not None:
        header["validation_fit"] = calibration.to_json()
    return header


@dataclass
class Scoring:
    """What scoring a run's sets needs besides the model and the scans: where results go
    (`out`), the first keys of metrics.json (`header`, see ``run_header``), the scans that cannot be
    assessed (path -> reason), the calibration when one was fitted, and where each center's patients
    came from (center -> "metadata.csv", "data.patient_pattern" or None), and the feature cache of
    a model with frozen image features."""

    cfg: Config
    accelerator: Accelerator
    masks: TissueMasks
    out: RunPaths
    header: dict[str, Any]
    calibration: Calibration | None = None
    unassessable: Mapping[Path, str] = field(default_factory=dict)
    patient_sources: Mapping[str, str | None] = field(default_factory=dict)
    progress: bool = True
    features: FeatureSource | None = None


def score_sets(
    model: SavltModel, sets: dict[str, list[ImageRecord]], scoring: Scoring
) -> tuple[dict[str, Any], dict[str, Inference]]:
    """Score every set, writing predictions and metrics.json after each center. Scans that
    cannot be assessed are counted per center and scored as ``eval.unassessable`` says (left out
    by default). Every metric comes from the delivered probabilities (calibrated when there is a
    calibration, which adds the calibration, operating-point, prediction-set and patient blocks,
    see ``engine.calibration``), so it can be recomputed from the predictions CSV."""
    cfg, accelerator, masks, out = scoring.cfg, scoring.accelerator, scoring.masks, scoring.out
    header, progress, calibration = scoring.header, scoring.progress, scoring.calibration
    patient_sources = scoring.patient_sources
    flagged = scoring.unassessable
    metrics: dict[str, Any] = {
        **header,
        "unassessable_policy": cfg.eval.unassessable,
        "ci_level": cfg.eval.ci_level,
        "centers": {},
    }
    results: dict[str, Inference] = {}
    risk_classes = high_risk_mask(cfg.class_names, cfg.data.high_risk)
    for center, records in sets.items():
        if not records:
            log.warning("center %s has no test images: skipped", center)
            continue
        store = (
            masks.masks_for(records, progress=progress and accelerator.is_main_process)
            if model.uses_masks
            else None
        )
        result = run_inference(
            model,
            records,
            cfg,
            accelerator,
            store,
            f"evaluating {center}",
            progress,
            features=scoring.features,
        )
        del store
        unusable = np.array([r.path in flagged for r in result.records], dtype=bool)
        if accelerator.is_main_process:
            write_predictions(out.predictions / f"{center}.csv", result, cfg, flagged, calibration)
        if cfg.eval.unassessable == "exclude" and unusable.any():
            result = _subset(result, ~unusable)
            if not result.records:
                log.warning("center %s: none of its %d scans can be assessed: skipped", center, len(unusable))
                continue
        groups = [r.patient_id for r in result.records]
        scored = center_metrics(
            result.labels,
            delivered_logits(calibration, result.logits),
            cfg.class_names,
            cfg.data.high_risk,
            resamples=cfg.eval.bootstrap,
            level=cfg.eval.ci_level,
            seed=cfg.train.seed,
            groups=groups,
            score=screen_scores(calibration, result.logits, risk_classes, cfg.eval.auc_score),
        )
        source = patient_sources.get(center)
        scored.update(
            decision_blocks(result.labels, result.logits, groups, source, cfg, calibration, cfg.train.seed)
        )
        scored["unassessable"] = int(unusable.sum())
        if model.uses_masks:
            scored["roi_fallback"] = int(result.fallback.sum())
        metrics["centers"][center] = scored
        results[center] = result
        if accelerator.is_main_process:
            write_json(out.metrics, metrics)
        log.info("%s: n=%d accuracy=%.3f", center, scored["n"], scored["accuracy"])
    return metrics, results


def _subset(result: Inference, keep: np.ndarray) -> Inference:
    """The scans of `result` where `keep` is true."""
    records = [r for r, k in zip(result.records, keep, strict=True) if k]
    arrays = {
        f.name: getattr(result, f.name)[keep] for f in dataclasses.fields(result) if f.name != "records"
    }
    return dataclasses.replace(result, records=records, **arrays)


def write_predictions(
    path: Path,
    result: Inference,
    cfg: Config,
    unassessable: Mapping[Path, str] | None = None,
    calibration: Calibration | None = None,
) -> None:
    """Per-scan CSV: the delivered (calibrated, with a `calibration`) class probabilities, the
    high-risk probability, the referral and the prediction set as ``predict`` gives them, the ROI,
    and at full precision the score the AUC ranks and the model's logits before the temperature,
    so every metric can be recomputed from the file; then whether the scan could be assessed and
    its patient, volume and other metadata.csv columns. A scan that cannot be assessed gets no
    diagnosis (its model columns are empty) unless ``eval.unassessable=include`` scores it."""
    class_names = cfg.class_names
    risk = high_risk_mask(class_names, cfg.data.high_risk)
    delivered = delivered_logits(calibration, result.logits)
    probs = probabilities(delivered)
    refer = referrals(calibration, probs, risk)
    sets = None if calibration is None else calibration.prediction_sets(result.logits)
    score = screen_scores(calibration, result.logits, risk, cfg.eval.auc_score)
    flagged = unassessable or {}
    extra = list(dict.fromkeys(key for record in result.records for key, _ in record.metadata))
    header = [
        "path",
        "label",
        "predicted",
        *[f"p_{n}" for n in class_names],
        "roi_y0",
        "roi_fallback",
        "assessable",
        "not_assessable_because",
        "p_high_risk",
        "referral",
        "prediction_set",
        "auc_score",
        *[f"logit_{n}" for n in class_names],
        "patient",
        "volume",
        *extra,
    ]

    def model_cells(i: int) -> tuple[list[Any], list[Any]]:
        """The diagnosis columns of scan `i`: (before the assessability columns, after them)."""
        chosen = (
            ""
            if sets is None
            else SET_SEPARATOR.join(n for n, c in zip(class_names, sets[i], strict=True) if c)
        )
        return (
            [
                class_names[int(probs[i].argmax())],
                *(f"{p:.6f}" for p in probs[i]),
                f"{result.boxes[i, 1]:.4f}",
                int(result.fallback[i]),
            ],
            [
                f"{probs[i][risk].sum():.6f}",
                REFERRAL[bool(refer[i])],
                chosen,
                f"{score[i]:.9g}",
                *(f"{z:.9g}" for z in result.logits[i]),
            ],
        )

    blank = ([""] * (3 + len(class_names)), [""] * (4 + len(class_names)))
    rows = []
    for i, record in enumerate(result.records):
        diagnosed = record.path not in flagged or cfg.eval.unassessable == "include"
        before, after = model_cells(i) if diagnosed else blank
        rows.append(
            [
                str(record.path),
                record.label,
                *before,
                int(record.path not in flagged),
                flagged.get(record.path, ""),
                *after,
                record.patient or "",
                record.volume or "",
                *(dict(record.metadata).get(key, "") for key in extra),
            ]
        )
    write_csv(path, header, rows)


def write_run_report(
    folder: Path,
    metrics: dict[str, Any],
    results: dict[str, Inference],
    cfg: Config,
    history: Sequence[dict[str, Any]],
    title: str,
    calibration: Calibration | None = None,
) -> Path:
    risk = high_risk_mask(cfg.class_names, cfg.data.high_risk)
    scores = {
        c: (
            risk[r.labels],
            screen_scores(calibration, r.logits, risk, cfg.eval.auc_score),
        )
        for c, r in results.items()
    }
    reliability = (
        {
            c: (
                reliability_bins(probabilities(r.logits), r.labels),
                reliability_bins(calibration.probabilities(r.logits), r.labels),
            )
            for c, r in results.items()
        }
        if calibration is not None
        else None
    )
    return write_report(
        folder,
        metrics,
        cfg.class_names,
        scores,
        history,
        title=title,
        reliability=reliability,
        figures=cfg.eval.figures,
    )
