"""A run folder: train into it, re-evaluate it, load it back and predict with it.

RUN/config.yaml        the full resolved configuration (a run is reproduced from it)
RUN/split.json         the training center's split; RUN/fewshot.json the K-shot draw
RUN/train.log          the log; RUN/history.jsonl loss / validation per step (written as it goes)
RUN/adapter.safetensors  the trained tensors only (see engine.checkpoint)
RUN/metrics.json       per-center metrics (written after each center)
RUN/predictions/<center>.csv  per-scan predictions; RUN/report.md + PNGs
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from savlt.config import Config, ConfigError, load_config
from savlt.data.discover import ImageRecord
from savlt.data.imageio import ImageDecodeError, read_image
from savlt.data.splits import write_json
from savlt.data.transforms import eval_transform
from savlt.engine.checkpoint import load_checkpoint, save_checkpoint
from savlt.engine.inference import Inference, run_inference
from savlt.engine.inputs import RunInputs, prepare_inputs, reload_inputs
from savlt.engine.metrics import center_metrics
from savlt.engine.train import fit, fit_linear_probe, total_steps
from savlt.errors import SavltError
from savlt.models.adapters import parameter_counts
from savlt.models.backbone import load_backbone
from savlt.models.savlt import SavltModel
from savlt.models.tissue import MaskSource
from savlt.report.plots import heatmap_png
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


def _build_model(cfg: Config, accelerator: Accelerator) -> tuple[SavltModel, str]:
    backbone = load_backbone(cfg.model.backbone, cfg.model.allow_download)
    if cfg.data.image_size != backbone.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but backbone {backbone.name!r} takes "
            f"{backbone.image_size}×{backbone.image_size} inputs: set data.image_size={backbone.image_size}"
        )
    torch.manual_seed(cfg.train.seed)
    model = SavltModel(cfg, backbone, total_steps(cfg)).to(accelerator.device)
    return model, backbone.name


def _score_sets(
    model: SavltModel,
    sets: dict[str, list[ImageRecord]],
    cfg: Config,
    accelerator: Accelerator,
    masks: MaskSource,
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
            _write_predictions(out.predictions / f"{center}.csv", result, cfg.class_names)
            write_json(out.metrics, metrics)
        log.info("%s: n=%d accuracy=%.3f", center, scored["n"], scored["accuracy"])
    return metrics, results


def _write_predictions(path: Path, result: Inference, class_names: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = result.probs
    with path.open("w", newline="") as handle:
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


def _write_report(
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


def _header(cfg: Config, backbone: str, inputs: RunInputs) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "backbone": backbone,
        "shots": cfg.train.shots,
        "seed": cfg.train.seed,
        "train_center": inputs.train_center,
        "high_risk": list(cfg.data.high_risk),
    }


def train(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train on the few-shot draw, save the run folder, evaluate every center; returns metrics."""
    paths = RunPaths(out)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if main:
        paths.root.mkdir(parents=True, exist_ok=True)
        for stale in (paths.metrics, paths.history, paths.checkpoint):
            stale.unlink(missing_ok=True)
        cfg.save(paths.config)
    accelerator.wait_for_everyone()
    with log_to(paths.log, main):
        started = time.time()
        seed_everything(cfg.train.seed)
        if main:  # the cache is written by one process; the others then read it
            inputs = prepare_inputs(cfg)
        accelerator.wait_for_everyone()
        if not main:
            inputs = prepare_inputs(cfg)
        if main:
            write_json(paths.split, inputs.split.to_json())
            write_json(paths.few_shot, inputs.few_shot.to_json())
        log.info(
            "method %s, %d-shot, seed %d, training center %s (%d train / %d val images), test centers %s",
            cfg.method,
            cfg.train.shots,
            cfg.train.seed,
            inputs.train_center,
            len(inputs.few_shot.train),
            len(inputs.few_shot.val),
            ", ".join(inputs.eval_sets()),
        )
        model, backbone_name = _build_model(cfg, accelerator)
        trainable, total = parameter_counts(model)
        log.info(
            "parameters: %s trainable of %s (%.2f %%)",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
        masks = MaskSource(cfg.roi.mask_source, cfg.roi.segmenter, device=str(accelerator.device))
        train_records, val_records = inputs.train_records(), inputs.val_records()
        history: list[dict[str, Any]] = []

        def record(entry: dict[str, Any]) -> None:
            history.append(entry)
            if main:
                with paths.history.open("a") as handle:
                    handle.write(json.dumps(entry) + "\n")

        if cfg.method == "zero_shot":
            log.info("zero-shot: no training")
        elif cfg.method == "linear_probe":
            record(fit_linear_probe(model, cfg, accelerator, train_records, val_records, progress))
        else:
            store = (
                masks.masks_for(train_records + val_records, progress=progress and main)
                if model.uses_masks
                else None
            )
            state = fit(model, cfg, accelerator, train_records, val_records, store, record, progress)
            if model.uses_masks:
                log.info(
                    "ROI fell back to the whole image for %d of %d training crops",
                    state.roi_fallbacks,
                    state.samples_seen,
                )
        if main:
            save_checkpoint(model, paths.checkpoint, backbone_name)
        log.info("training took %.1f s", time.time() - started)
        metrics, results = _score_sets(
            model,
            inputs.eval_sets(),
            cfg,
            accelerator,
            masks,
            paths,
            _header(cfg, backbone_name, inputs),
            progress,
        )
        if main:
            report = _write_report(
                paths.root, metrics, results, cfg, history, f"SAVLT run: {paths.root.name}"
            )
            log.info("report: %s", report)
            metrics["complete"] = True  # the marker a sweep uses to skip a finished point
            write_json(paths.metrics, metrics)
    accelerator.wait_for_everyone()
    return metrics


@dataclass
class Prediction:
    path: str
    predicted: str
    probabilities: dict[str, float]
    high_risk_probability: float
    roi_box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1
    roi_fallback: bool
    heatmap: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Run:
    """A trained run loaded back from its folder (``savlt.load_run``)."""

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        self.paths = RunPaths(folder)
        if not self.paths.config.is_file():
            raise SavltError(f"{self.paths.root} is not a SAVLT run folder (no config.yaml)")
        self.cfg = load_config(self.paths.config)
        self.accelerator = make_accelerator(self.cfg) if device is None else Accelerator(cpu=device == "cpu")
        self.model, self.backbone_name = _build_model(self.cfg, self.accelerator)
        load_checkpoint(self.model, self.paths.checkpoint)
        self.model.eval()
        self.masks = MaskSource(
            self.cfg.roi.mask_source, self.cfg.roi.segmenter, device=str(self.accelerator.device)
        )
        self.transform = eval_transform(self.cfg.data.image_size)

    @property
    def class_names(self) -> list[str]:
        return self.cfg.class_names

    def evaluate(
        self,
        data_root: str | Path | None = None,
        centers: list[str] | None = None,
        out: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Re-score the run (internal test split + external centers) on a data root."""
        cfg = self.cfg
        if data_root is not None:
            cfg = load_config(self.paths.config, [f"data.root={Path(data_root)}"])
        inputs = reload_inputs(cfg, self.paths.split, self.paths.few_shot, centers)
        sets = inputs.eval_sets()
        if centers is not None:
            sets = {c: r for c, r in sets.items() if c in centers}
        target = RunPaths(out or self.paths.root / "evaluation")
        target.root.mkdir(parents=True, exist_ok=True)
        header = _header(cfg, self.backbone_name, inputs)
        with log_to(target.root / "evaluate.log", self.accelerator.is_main_process):
            metrics, results = _score_sets(
                self.model, sets, cfg, self.accelerator, self.masks, target, header, progress
            )
            if self.accelerator.is_main_process:
                _write_report(
                    target.root, metrics, results, cfg, [], f"SAVLT evaluation: {self.paths.root.name}"
                )
        return metrics

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[str | Path | np.ndarray],
        heatmap_dir: str | Path | None = None,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Class, probabilities, high-risk probability and ROI of each scan (path or H×W[×3] array)."""
        if heatmap_dir is not None and self.model.pool is None:
            raise SavltError("heat maps need attention pooling; this run uses model.pooling=cls")
        predictions: list[Prediction] = []
        risk = [n in self.cfg.data.high_risk for n in self.class_names]
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            arrays = [_as_rgb(item, start + i) for i, item in enumerate(chunk)]
            masks = (
                self.masks.masks_for_images(arrays)
                if self.model.uses_masks
                else [np.ones(a.shape[:2], bool) for a in arrays]
            )
            batch = [
                self.transform(image=a, mask=m.astype(np.uint8)) for a, m in zip(arrays, masks, strict=True)
            ]
            pixels = torch.stack([b["image"] for b in batch]).to(self.accelerator.device)
            mask = torch.stack([b["mask"] for b in batch]).to(self.accelerator.device)
            with self.accelerator.autocast():
                out = self.model(pixels, mask)
                probs = self.model.logits(out).float().softmax(dim=1).cpu().numpy()
            for i, item in enumerate(chunk):
                name = str(item) if isinstance(item, str | Path) else f"array-{start + i}"
                box = tuple(float(v) for v in out.boxes[i].cpu())
                heatmap = None
                if heatmap_dir is not None:
                    grid = self.model.grid
                    attention = out.attention[i].float().mean(dim=0).reshape(grid, grid).cpu().numpy()
                    Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
                    stem = Path(name).stem if isinstance(item, str | Path) else name
                    heatmap = str(Path(heatmap_dir) / f"{start + i:04d}_{stem}_heatmap.png")
                    heatmap_png(arrays[i], attention, box, Path(heatmap))
                predictions.append(
                    Prediction(
                        path=name,
                        predicted=self.class_names[int(probs[i].argmax())],
                        probabilities={n: float(p) for n, p in zip(self.class_names, probs[i], strict=True)},
                        high_risk_probability=float(probs[i][risk].sum()),
                        roi_box=box,  # type: ignore[arg-type]
                        roi_fallback=bool(out.fallback[i]),
                        heatmap=heatmap,
                    )
                )
        return predictions


def _as_rgb(item: str | Path | np.ndarray, position: int) -> np.ndarray:
    if isinstance(item, str | Path):
        return read_image(item)
    array = np.asarray(item)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageDecodeError(
            f"array #{position}", f"expected a uint8 H×W or H×W×3 array, got {array.dtype} {array.shape}"
        )
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array


def load_run(folder: str | Path, device: str | None = None) -> Run:
    return Run(folder, device)
