"""What training a run and loading it back share: the folder layout, the accelerator, the model
and mask source of a configuration, and scoring sets of scans into predictions, metrics and a
report.

RUN/config.yaml        the full resolved configuration (a run is reproduced from it)
RUN/split.json         the training center's split; RUN/fewshot.json the K-shot draw
RUN/train.log          the log; RUN/history.jsonl loss / validation per step (written as it goes)
RUN/adapter.safetensors  the trained tensors only (see engine.checkpoint)
RUN/metrics.json       per-center metrics (written after each center)
RUN/predictions/<center>.csv  per-scan predictions; RUN/report.md + PNGs
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from savlt.config import Config, ConfigError
from savlt.data.discover import ImageRecord
from savlt.data.masks import TissueMasks
from savlt.engine.inference import Inference, run_inference
from savlt.engine.inputs import RunInputs
from savlt.engine.metrics import center_metrics
from savlt.io import atomic_path, write_json
from savlt.models.backbone import load_backbone
from savlt.models.savlt import SavltModel, model_from_config
from savlt.report.summary import write_report

log = logging.getLogger("savlt")


class RunPaths:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.split = self.root / "split.json"
        self.few_shot = self.root / "fewshot.json"
        self.log = self.root / "train.log"
        self.history = self.root / "history.jsonl"
        self.checkpoint = self.root / "adapter.safetensors"
        self.metrics = self.root / "metrics.json"
        self.predictions = self.root / "predictions"


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    return Accelerator(mixed_precision=precision, cpu=not cuda)


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
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


def build_model(cfg: Config, device: torch.device) -> tuple[SavltModel, str]:
    """The run's backbone and model (initialised from ``train.seed``); returns the backbone's name."""
    backbone = load_backbone(cfg.model.backbone, cfg.model.allow_download)
    if cfg.data.image_size != backbone.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but backbone {backbone.name!r} takes "
            f"{backbone.image_size}×{backbone.image_size} inputs: set data.image_size={backbone.image_size}"
        )
    torch.manual_seed(cfg.train.seed)
    return model_from_config(cfg, backbone).to(device), backbone.name


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


def run_header(cfg: Config, backbone: str, inputs: RunInputs) -> dict[str, Any]:
    """The first keys of metrics.json: what was trained, on what."""
    return {
        "method": cfg.method,
        "backbone": backbone,
        "shots": cfg.train.shots,
        "seed": cfg.train.seed,
        "train_center": inputs.train_center,
        "high_risk": list(cfg.data.high_risk),
    }


def score_sets(
    model: SavltModel,
    sets: dict[str, list[ImageRecord]],
    cfg: Config,
    accelerator: Accelerator,
    masks: TissueMasks,
    out: RunPaths,
    header: dict[str, Any],
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Inference]]:
    """Score every set, writing predictions and metrics.json after each center."""
    metrics: dict[str, Any] = {**header, "centers": {}}
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
        scored = center_metrics(
            result.labels,
            result.probs,
            cfg.class_names,
            cfg.data.high_risk,
            resamples=cfg.eval.bootstrap,
            level=cfg.eval.ci_level,
            seed=cfg.train.seed,
        )
        if model.uses_masks:
            scored["roi_fallback"] = int(result.fallback.sum())
        metrics["centers"][center] = scored
        results[center] = result
        if accelerator.is_main_process:
            write_predictions(out.predictions / f"{center}.csv", result, cfg.class_names)
            write_json(out.metrics, metrics)
        log.info("%s: n=%d accuracy=%.3f", center, scored["n"], scored["accuracy"])
    return metrics, results


def write_predictions(path: Path, result: Inference, class_names: Sequence[str]) -> None:
    probs = result.probs
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "label", "predicted", *[f"p_{n}" for n in class_names], "roi_y0", "roi_fallback"]
        )
        for i, record in enumerate(result.records):
            writer.writerow(
                [
                    str(record.path),
                    record.label,
                    class_names[int(probs[i].argmax())],
                    *(f"{p:.6f}" for p in probs[i]),
                    f"{result.boxes[i, 1]:.4f}",
                    int(result.fallback[i]),
                ]
            )


def write_run_report(
    folder: Path,
    metrics: dict[str, Any],
    results: dict[str, Inference],
    cfg: Config,
    history: Sequence[dict[str, Any]],
    title: str,
) -> Path:
    risk = np.array([n in cfg.data.high_risk for n in cfg.class_names])
    scores = {c: (risk[r.labels], r.probs[:, risk].sum(axis=1)) for c, r in results.items()}
    return write_report(folder, metrics, cfg.class_names, scores, history, title=title)
