"""What training a run and loading it back share: the folder layout (``engine.runfolder``), the
accelerator, the model and mask source of a configuration, checking the scans before they are
used, and scoring sets of scans into predictions, metrics and a report.

RUN/config.yaml        the full resolved configuration (a run is reproduced from it)
RUN/split.json         the training center's split; RUN/fewshot.json the K-shot draw
RUN/train.log          the log; RUN/history.jsonl loss / validation per step (written as it goes)
RUN/adapter.safetensors  the trained tensors only (see engine.checkpoint)
RUN/calibration.json   temperature and referral threshold (see engine.calibration)
RUN/metrics.json       per-center metrics (written after each center)
RUN/predictions/<center>.csv  per-scan predictions; RUN/report.md + PNGs
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from savlt.config import Config, ConfigError
from savlt.data.discover import ImageRecord
from savlt.data.masks import TissueMasks
from savlt.data.quality import Thresholds, check_scans, unreadable_error
from savlt.engine.calibration import (
    REFERRAL,
    SET_SEPARATOR,
    Calibration,
    decision_blocks,
    delivered_logits,
    referrals,
)
from savlt.engine.inference import Inference, run_inference
from savlt.engine.inputs import RunInputs
from savlt.engine.metrics import (
    center_metrics,
    high_risk_mask,
    probabilities,
    reliability_bins,
    risk_scores,
)
from savlt.engine.runfolder import RunPaths
from savlt.errors import SavltError
from savlt.io import PlainTextFormatter, write_csv, write_json
from savlt.models.backbone import load_backbone
from savlt.models.savlt import SavltModel, model_from_config
from savlt.models.vision_language import VisionLanguage
from savlt.processes import refuse_in_a_starting_worker
from savlt.report.summary import write_report

log = logging.getLogger("savlt")

T = TypeVar("T")


def on_main(accelerator: Accelerator, step: Callable[[], T], share: bool = False) -> T | None:
    """Run `step` on the main process only (its result is returned there, and on every process
    with `share`); a user error (SavltError) there is raised on every process, so no process
    waits for one that stopped."""
    result: T | None = None
    error: SavltError | None = None
    if accelerator.is_main_process:
        try:
            result = step()
        except SavltError as exc:
            error = exc
    if accelerator.num_processes > 1:
        shared: list[Any] = [None if error is None else str(error), result if share else None]
        broadcast_object_list(shared)
        if shared[0] is not None and error is None:
            error = SavltError(shared[0])
        if share:
            result = shared[1]
    if error is not None:
        raise error
    return result


def check_images(
    cfg: Config, records: Sequence[ImageRecord], progress: bool, consequence: str
) -> dict[Path, str]:
    """Decode every scan a run will read (and its mask when ``roi.mask_source=files``), in
    parallel, before the first step: an unreadable file stops the run with the full list. Returns
    the scans that cannot be assessed (path -> reason)."""
    masks = cfg.roi.mask_source == "files"
    unique = list({r.path: r for r in records}.values())
    checks = check_scans(
        [(r.path, r.mask_path if masks else None) for r in unique], Thresholds.of(cfg), progress
    )
    bad = [c.problem for c in checks if c.problem is not None]
    if bad:
        for problem in bad:
            log.error("%s", problem.message)
        raise unreadable_error(bad, consequence, cfg.data.root)
    flagged = {c.path: c.unassessable for c in checks if c.unassessable is not None}
    if flagged:
        scored = "left out of the metrics" if cfg.eval.unassessable == "exclude" else "scored all the same"
        log.warning(
            "%d scan(s) cannot be assessed and are %s (eval.unassessable=%s), e.g. %s: %s",
            len(flagged),
            scored,
            cfg.eval.unassessable,
            next(iter(flagged)),
            next(iter(flagged.values())),
        )
    return flagged


def make_accelerator(cfg: Config, device: str | None = None) -> Accelerator:
    """The accelerator of a command: a GPU when there is one, or `device` ("cpu" or "cuda") when
    given; either way at the precision ``train.mixed_precision`` resolves to there."""
    refuse_in_a_starting_worker()  # before joining the other processes of a distributed run
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    precision = resolved_precision(cfg, cuda)
    try:
        return Accelerator(mixed_precision=precision, cpu=not cuda)
    except ValueError as exc:  # accelerate holds one device and precision per process
        if "already been initialized" not in str(exc):
            raise
        raise SavltError(
            f"this process already runs models on another device or at another precision than this run's "
            f"({'cuda' if cuda else 'cpu'}, mixed precision {precision!r}): load it in a process of its own, "
            "or make --device and train.mixed_precision match"
        ) from None


def resolved_precision(cfg: Config, cuda: bool) -> str:
    """``train.mixed_precision`` with "auto" resolved: bf16 on a GPU that has it, else none."""
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def log_to(path: Path, enabled: bool):
    """Copy the savlt log into the run folder for the duration of a command."""
    if not enabled:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PlainTextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("savlt")
    root.addHandler(handler)
    previous = root.level
    root.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def backbone_for(cfg: Config) -> VisionLanguage:
    """The configured backbone, checked against data.image_size."""
    backbone = load_backbone(cfg.model.backbone, cfg.model.allow_download, cfg.model.weights)
    if cfg.data.image_size != backbone.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but backbone {backbone.source!r} takes "
            f"{backbone.image_size}×{backbone.image_size} inputs: set data.image_size={backbone.image_size}"
        )
    return backbone


def build_model(
    cfg: Config, device: torch.device, backbone: VisionLanguage | None = None
) -> tuple[SavltModel, str]:
    """The run's model (initialised from ``train.seed``) on `backbone`, loaded here when not given;
    returns the backbone's name."""
    backbone = backbone or backbone_for(cfg)
    torch.manual_seed(cfg.train.seed)
    return model_from_config(cfg, backbone).to(device), backbone.source


def tissue_masks(cfg: Config, device: torch.device) -> TissueMasks:
    """The run's mask source: ``roi.mask_source``, where ``auto`` is the segmenter when one is
    given and the classical mask otherwise; a segmenter is loaded once, here."""
    kind = cfg.roi.mask_source
    if kind == "auto":
        kind = "segmenter" if cfg.roi.segmenter else "classical"
    if kind != "segmenter":
        return TissueMasks(kind)
    from savlt.seg import load_segmenter  # the segmenter stack is imported only when used

    return TissueMasks(kind, load_segmenter(cfg.roi.segmenter, device=str(device)))


def structure_prior(cfg: Config, masks: TissueMasks, centers: Sequence[str]) -> dict[str, Any]:
    """Where the evaluated scans' tissue masks came from, and whether the structure prior saw any
    of the evaluated centers: a segmenter trained on a center's masks, or annotated masks used at
    test time (``roi.mask_source=files``), is recorded, never silent."""
    record: dict[str, Any] = {"mask_source": masks.kind}
    if masks.kind == "segmenter":
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


def score_sets(
    model: SavltModel,
    sets: dict[str, list[ImageRecord]],
    cfg: Config,
    accelerator: Accelerator,
    masks: TissueMasks,
    out: RunPaths,
    header: dict[str, Any],
    progress: bool,
    unassessable: Mapping[Path, str] | None = None,
    calibration: Calibration | None = None,
    patient_sources: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, Any], dict[str, Inference]]:
    """Score every set, writing predictions and metrics.json after each center. Scans that
    cannot be assessed (`unassessable`, path -> reason) are counted per center and scored as
    ``eval.unassessable`` says (left out by default). Every metric comes from the delivered
    probabilities (calibrated with `calibration`, which adds the calibration, operating-point,
    prediction-set and patient blocks, see ``engine.calibration``), so it can be recomputed from
    the predictions CSV; the centers' `patient_sources` (center -> "metadata.csv",
    "data.patient_pattern" or None) say where their patients came from."""
    flagged = unassessable or {}
    metrics: dict[str, Any] = {
        **header,
        "unassessable_policy": cfg.eval.unassessable,
        "ci_level": cfg.eval.ci_level,
        "centers": {},
    }
    results: dict[str, Inference] = {}
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
            model, records, cfg, accelerator, store, desc=f"evaluating {center}", progress=progress
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
            screen_score=cfg.eval.auc_score,
            groups=groups,
        )
        source = (patient_sources or {}).get(center)
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
    score = risk_scores(delivered, risk, cfg.eval.auc_score)
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
            risk_scores(delivered_logits(calibration, r.logits), risk, cfg.eval.auc_score),
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
        folder, metrics, cfg.class_names, scores, history, title=title, reliability=reliability
    )
