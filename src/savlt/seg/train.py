"""k-fold cross-validated training of the tissue segmenter (``savlt seg train``).

Folds split the masked images (seeded); each fold trains a fresh network with Dice loss, halves
the learning rate when validation Dice stops improving (ReduceLROnPlateau), and keeps its best
epoch as a checkpoint folder (``OUT/fold<k>``). History is written after every epoch, so an
interrupted run keeps what it learnt. All randomness (folds, initialisation, batch order,
augmentation) comes from ``seg.seed``, so a CPU run is repeatable.

OUT is written only when it is missing or empty, or, with ``overwrite``, holds an earlier
segmenter training and nothing else (``savlt.outputs``); never inside, around or over the data
root. A user error leaves OUT as it was found.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segmentation_models_pytorch.losses import DiceLoss
from sklearn.model_selection import KFold
from tqdm import tqdm

from savlt.config import Config
from savlt.data.discover import DataError, scan_data
from savlt.io import markdown_table, text_table, write_json, write_text
from savlt.normalization import Stats
from savlt.outputs import claim_folder
from savlt.seg.metrics import dice_iou
from savlt.seg.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmenterError,
    SegmenterSpec,
    TissueSegmenter,
    build_model,
    default_device,
    normalise,
    save_segmenter,
    to_unit_batch,
)
from savlt.seg.plots import plot_curves
from savlt.seg.pretrained import load_encoder_weights
from savlt.seg.samples import PairArrays, load_pairs, masked_records

log = logging.getLogger(__name__)

BRIGHTNESS = 0.1  # additive, on the 0..1 scale
CONTRAST = 0.1  # multiplicative, 1 ± this
PLATEAU_FACTOR = 0.5


@dataclass(frozen=True)
class FoldResult:
    fold: int
    best_epoch: int
    dice: float  # validation Dice of the best epoch
    iou: float
    n_train: int
    n_val: int
    checkpoint: str


@dataclass
class TrainSummary:
    out: Path
    folds: list[FoldResult]
    images: int
    skipped: int  # images without a mask
    seconds: float

    def _stat(self, name: str) -> tuple[float, float]:
        values = np.array([getattr(f, name) for f in self.folds])
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    @property
    def best_fold(self) -> int:
        return max(self.folds, key=lambda f: f.dice).fold

    def header(self) -> list[str]:
        return ["fold", "best epoch", "train", "val", "Dice", "IoU"]

    def rows(self) -> list[list[str]]:
        rows = [
            [
                f"fold{f.fold}",
                str(f.best_epoch),
                str(f.n_train),
                str(f.n_val),
                f"{f.dice:.4f}",
                f"{f.iou:.4f}",
            ]
            for f in self.folds
        ]
        (dm, ds), (im, is_) = self._stat("dice"), self._stat("iou")
        rows.append(["mean ± std", "", "", "", f"{dm:.4f} ± {ds:.4f}", f"{im:.4f} ± {is_:.4f}"])
        return rows

    def table(self) -> str:
        return text_table(self.header(), self.rows())

    def to_json(self) -> dict[str, Any]:
        (dm, ds), (im, is_) = self._stat("dice"), self._stat("iou")
        return {
            "dice": {"mean": dm, "std": ds},
            "iou": {"mean": im, "std": is_},
            "std": "sample standard deviation over folds (ddof=1)",
            "best_fold": self.best_fold,
            "folds": [asdict(f) for f in self.folds],
            "images": self.images,
            "skipped_without_mask": self.skipped,
            "seconds": round(self.seconds, 1),
        }


def _batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive chunks; a last chunk of one joins the previous one (BatchNorm needs two samples)."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [np.concatenate(chunks[-2:])]
    return chunks


def augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip (image and mask together) and small brightness/contrast, per sample.

    images (B, 3, H, W) in 0..1, masks (B, 1, H, W); the random draws come from `generator` (CPU).
    """
    b = images.shape[0]
    draws = torch.rand(3, b, generator=generator).to(images.device)  # (3, B)
    flip = (draws[0] < 0.5).view(b, 1, 1, 1)
    images = torch.where(flip, images.flip(-1), images)
    masks = torch.where(flip, masks.flip(-1), masks)
    contrast = (1 + CONTRAST * (2 * draws[1] - 1)).view(b, 1, 1, 1)
    brightness = (BRIGHTNESS * (2 * draws[2] - 1)).view(b, 1, 1, 1)
    return (images * contrast + brightness).clamp_(0, 1), masks


def _tensors(pairs: PairArrays, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = to_unit_batch(pairs.images[idx], device)  # (b, 3, H, W)
    masks = torch.from_numpy(pairs.masks[idx]).to(device).float().unsqueeze(1)  # (b, 1, H, W)
    return images, masks


@dataclass
class _FoldRun:
    """One fold's network and optimiser state."""

    spec: SegmenterSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    batch_size: int
    loss_fn: torch.nn.Module

    def train_epoch(self, pairs: PairArrays, indices: np.ndarray, generator: torch.Generator) -> float:
        self.model.train()
        order = indices[torch.randperm(len(indices), generator=generator).numpy()]
        total = 0.0
        for idx in _batches(order, self.batch_size):
            images, masks = augment(*_tensors(pairs, idx, self.device), generator)
            logits = self.model(normalise(images, self.spec))  # (b, 1, H, W)
            loss = self.loss_fn(logits, masks)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(idx)
        return total / len(indices)

    def validate(self, pairs: PairArrays, indices: np.ndarray) -> tuple[float, float, float]:
        """Mean Dice loss, and mean per-image Dice and IoU of the thresholded masks."""
        self.model.eval()
        loss = dice = iou = 0.0
        with torch.inference_mode():
            for idx in _batches(indices, self.batch_size):
                images, masks = _tensors(pairs, idx, self.device)
                logits = self.model(normalise(images, self.spec))  # (b, 1, H, W)
                loss += float(self.loss_fn(logits, masks)) * len(idx)
                pred = torch.sigmoid(logits[:, 0]) >= self.spec.threshold  # (b, H, W)
                d, i = dice_iou(pred, masks[:, 0] > 0.5)
                dice += float(d.sum())
                iou += float(i.sum())
        n = len(indices)
        return loss / n, dice / n, iou / n


def _encoder_init(cfg: Config) -> tuple[dict[str, torch.Tensor] | None, Stats, str | None]:
    """Pretrained encoder weights, their normalisation and their name (None: from scratch),
    checked before any data is loaded. "auto" is ImageNet when those weights are in the local
    cache, else from scratch with a warning."""
    weights = cfg.seg.encoder_weights
    probe = build_model(cfg.seg.arch, cfg.seg.encoder)  # fails early on an unknown arch or encoder
    if weights in (None, "none"):
        return None, (IMAGENET_MEAN, IMAGENET_STD), None
    try:
        stats = load_encoder_weights(probe, cfg.seg.encoder, "imagenet" if weights == "auto" else weights)
    except SegmenterError as exc:
        if weights != "auto":
            raise
        log.warning("training the segmenter from scratch: %s", exc)
        return None, (IMAGENET_MEAN, IMAGENET_STD), None
    state = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    return state, stats, "imagenet" if weights == "auto" else weights


def _train_fold(
    cfg: Config,
    pairs: PairArrays,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    fold: int,
    encoder_init: tuple[dict[str, torch.Tensor] | None, Stats],
    provenance: dict[str, Any],
    out: Path,
    progress: bool,
) -> tuple[FoldResult, list[dict[str, Any]]]:
    seg = cfg.seg
    torch.manual_seed(seg.seed * 1000 + fold)  # network initialisation and dropout
    generator = torch.Generator().manual_seed(seg.seed * 1000 + fold)  # batch order and augmentation
    encoder_state, (mean, std) = encoder_init
    model = build_model(seg.arch, seg.encoder)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    device = default_device()
    spec = SegmenterSpec(
        arch=seg.arch,
        encoder=seg.encoder,
        input_size=(seg.image_size, seg.image_size),
        mean=mean,
        std=std,
        threshold=seg.threshold,
        encoder_weights=seg.encoder_weights,
    )
    run = _FoldRun(
        spec=spec,
        model=model.to(device),
        optimizer=torch.optim.Adam(model.parameters(), lr=seg.lr),
        device=device,
        batch_size=seg.batch_size,
        loss_fn=DiceLoss("binary", from_logits=True),
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        run.optimizer, mode="max", factor=PLATEAU_FACTOR, patience=seg.plateau_patience
    )
    fold_dir = out / f"fold{fold}"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_dice": -1.0}
    bar = tqdm(
        range(1, seg.epochs + 1),
        desc=f"fold{fold} ({fold + 1} of {seg.folds})",
        unit="epoch",
        disable=not progress,
    )
    for epoch in bar:
        start = time.perf_counter()
        train_loss = run.train_epoch(pairs, train_idx, generator)
        val_loss, val_dice, val_iou = run.validate(pairs, val_idx)
        lr = run.optimizer.param_groups[0]["lr"]
        scheduler.step(val_dice)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_dice": val_dice,
            "val_iou": val_iou,
            "lr": lr,
            "seconds": round(time.perf_counter() - start, 2),
        }
        history.append(row)
        if val_dice > best["val_dice"]:
            best = row
            trained = {**provenance, "fold": fold, "epoch": epoch, "val_dice": val_dice, "val_iou": val_iou}
            save_segmenter(
                TissueSegmenter(run.model, replace(spec, trained=trained), device=device), fold_dir
            )
        write_json(
            fold_dir / "history.json",
            {
                "fold": fold,
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "best_epoch": best["epoch"],
                "epochs": history,
            },
        )
        bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{val_dice:.3f}", best=f"{best['val_dice']:.3f}")
    result = FoldResult(
        fold=fold,
        best_epoch=best["epoch"],
        dice=best["val_dice"],
        iou=best["val_iou"],
        n_train=len(train_idx),
        n_val=len(val_idx),
        checkpoint=str(fold_dir),
    )
    return result, history


def _write_report(cfg: Config, summary: TrainSummary, centers: list[str]) -> Path:
    seg = cfg.seg
    weights = seg.encoder_weights or "none (trained from scratch)"
    lines = [
        "# Tissue segmenter: cross-validation",
        "",
        f"- data: `{cfg.data.root}`, centers: {', '.join(centers)}",
        f"- images with masks: {summary.images} (skipped without a mask: {summary.skipped})",
        f"- model: {seg.arch}, encoder {seg.encoder}, encoder weights: {weights}",
        f"- {seg.folds} folds × {seg.epochs} epochs, input {seg.image_size}×{seg.image_size}, batch {seg.batch_size}, "
        f"lr {seg.lr:g} (halved after {seg.plateau_patience} epochs without a better validation Dice), seed {seg.seed}",
        f"- scores: validation Dice/IoU of each fold's best epoch at threshold {seg.threshold}, at the input size; "
        "± is the sample standard deviation over folds",
        "",
        markdown_table(summary.header(), summary.rows()),
        "",
        f"Best fold: `fold{summary.best_fold}` — use it with `load_segmenter('{summary.out}/fold{summary.best_fold}')` "
        f"or `--segmenter {summary.out}/fold{summary.best_fold}`.",
        "",
        "![training curves](curves.png)",
        "",
    ]
    path = summary.out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def train_segmenter(
    cfg: Config,
    out: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    inputs: dict[str, str | Path] | None = None,
) -> TrainSummary:
    """Cross-validate a segmenter on every masked image under cfg.data.root (centers:
    cfg.seg.centers) into `out` (see the module's docstring for when it is written; `inputs`: other
    files read, name -> path, e.g. the --config file)."""
    started = time.perf_counter()
    out = Path(out)
    encoder_state, stats, used = _encoder_init(cfg)
    encoder_init = (encoder_state, stats)
    centers = cfg.seg.centers if cfg.seg.centers is not None else [cfg.data.train_center]
    others = [c for c in centers if c != cfg.data.train_center]
    if others:
        log.warning(
            "the segmenter also learns from center(s) %s (seg.centers): the structure prior of a run "
            "evaluated there has seen those centers' masks; the runs record it",
            ", ".join(others),
        )
    # the saved configuration says what was used: the centers and the encoder weights
    cfg = replace(cfg, seg=replace(cfg.seg, centers=centers, encoder_weights=used))
    seg = cfg.seg
    scan = scan_data(cfg.data.root, cfg.class_map(), centers)
    records = masked_records(scan)
    total = sum(len(c.records) for c in scan.centers.values())
    n, k = len(records), seg.folds
    if n < k or n - math.ceil(n / k) < 2:
        raise DataError(
            f"{n} image(s) with masks are too few for {k}-fold cross-validation (every fold needs at least "
            "2 training images and 1 validation image); add masks or lower --folds"
        )
    weights = used if used not in (None, "imagenet") else None
    with claim_folder(
        out,
        "segmenter-training",
        overwrite=overwrite,
        replaceable=("segmenter-training",),
        roots={"the data root": [cfg.data.root]},
        inputs={"seg.encoder_weights": weights, **(inputs or {})},
    ):
        cfg.save(out / "config.yaml")
        pairs = load_pairs(records, (seg.image_size, seg.image_size), progress=progress)
        splits = list(KFold(n_splits=k, shuffle=True, random_state=seg.seed).split(np.arange(n)))
        names = [f"{r.center}/{r.rel}" for r in records]
        write_json(
            out / "folds.json",
            {
                f"fold{i}": {"train": [names[j] for j in tr], "val": [names[j] for j in va]}
                for i, (tr, va) in enumerate(splits)
            },
        )
        provenance = {"data_root": str(cfg.data.root), "centers": list(scan.centers), "images": n}
        results, histories = [], []
        for fold, (train_idx, val_idx) in enumerate(splits):
            result, history = _train_fold(
                cfg, pairs, train_idx, val_idx, fold, encoder_init, provenance, out, progress
            )
            results.append(result)
            histories.append(history)
        summary = TrainSummary(
            out, results, images=n, skipped=total - n, seconds=time.perf_counter() - started
        )
        write_json(out / "summary.json", summary.to_json())
        plot_curves(histories, out / "curves.png")
        _write_report(cfg, summary, list(scan.centers))
    return summary
