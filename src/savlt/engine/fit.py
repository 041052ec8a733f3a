"""Fitting a model on the few-shot draw: one function per way of fitting, in ``FITS``.

A method (``savlt.methods``) names its fit: ``gradient`` (the adapters, pooling and head trained
with AdamW), ``closed_form`` (the linear probe: logistic regression on frozen features),
``none`` (zero-shot), one of the feature-based baselines (``savlt.engine.baselines``) or one of
the prompt-learning baselines (``savlt.engine.prompting``). Every
fit takes the same arguments and reports into the run's history.

Gradient training runs on ``accelerate``. One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` scans. The global batches
come from a seeded sampler and each process takes its share of every batch, with the loss
summed and divided by the global batch size, so one process or several follow the same
trajectory. AdamW with a cosine schedule to ``min_lr`` over ``n_iters × shots`` steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from sklearn.linear_model import LogisticRegression

from savlt.config import Config
from savlt.data.dataset import OCTDataset
from savlt.data.discover import ImageRecord
from savlt.data.masks import MaskStore, TissueMasks
from savlt.data.transforms import train_transform
from savlt.engine import baselines, prompting
from savlt.engine.features import FeatureCache
from savlt.engine.inference import loader_for, run_inference
from savlt.engine.inputs import StepBatches
from savlt.engine.loop import run_steps
from savlt.models.adapters import training_hooks
from savlt.models.heads import LinearHead
from savlt.models.savlt import SavltModel
from savlt.normalization import normalization

log = logging.getLogger(__name__)


History = Callable[[dict[str, Any]], None]


@dataclass
class FitJob:
    """What every fit gets: the model, the run's configuration and accelerator, the few-shot
    draw, the run's mask source, where each history entry goes, and the feature cache of a model
    whose image features are frozen (``SavltModel.frozen_features``)."""

    model: SavltModel
    cfg: Config
    accelerator: Accelerator
    train_records: list[ImageRecord]
    val_records: list[ImageRecord]
    masks: TissueMasks
    on_history: History
    progress: bool = True
    features: FeatureCache | None = None


@dataclass
class TrainState:
    roi_fallbacks: int = 0
    samples_seen: int = 0


def _validate(model, records, cfg, accelerator, masks, step: int) -> dict[str, Any]:
    result = run_inference(model, records, cfg, accelerator, masks, desc="validating", progress=False)
    logits = torch.from_numpy(result.logits)
    labels = torch.from_numpy(result.labels)
    return {
        "step": step,
        "val_accuracy": float((logits.argmax(1) == labels).float().mean()),
        "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def train_steps(
    model: SavltModel,
    cfg: Config,
    accelerator: Accelerator,
    train_records: list[ImageRecord],
    val_records: list[ImageRecord],
    masks: MaskStore | None,
    on_history: History = lambda entry: None,
    progress: bool = True,
) -> TrainState:
    """Train everything trainable (adapters, projection, pooling, head) for ``train.total_steps``
    optimiser steps; each step's loss (and validation) goes to `on_history`."""
    t = cfg.train
    steps = t.total_steps
    dataset = OCTDataset(
        train_records,
        cfg.class_names,
        train_transform(
            cfg.data.image_size,
            t.crop_scale,
            t.hflip,
            normalization(cfg.data.normalize, model.clip_model.normalization),
        ),
        masks,
    )
    sampler = StepBatches(
        len(dataset),
        t.batch_size,
        steps * t.grad_accum,
        seed=t.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        epochs=t.batches == "epoch",
    )
    loader = loader_for(dataset, cfg, 1, accelerator.device, batch_sampler=sampler)
    backbone = [p for p in model.clip.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip.")]
    groups = [{"params": backbone}, {"params": rest}] if t.double_adapter_update else backbone + rest
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=t.min_lr)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    task = _FewShotSteps(
        model, wrapped, cfg, accelerator, sampler, optimizer, schedule, rest, val_records, masks, on_history
    )
    model.train()
    run_steps(
        task,
        accelerator,
        wrapped,
        optimizer,
        loader,
        t.grad_accum,
        (0, steps),
        "training",
        "train.lr",
        progress,
    )
    model.eval()
    return task.state


class _FewShotSteps:
    """The few-shot training step (see ``engine.loop``): the model's loss on each process's share of
    the global batch, plus what the adapters add (``training_hooks``), AdamW on a cosine schedule,
    validation every ``train.val_every`` steps and at the end."""

    def __init__(
        self,
        model: SavltModel,
        wrapped: torch.nn.Module,
        cfg: Config,
        accelerator: Accelerator,
        sampler: StepBatches,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        rest: list[torch.nn.Parameter],
        val_records: list[ImageRecord],
        masks: MaskStore | None,
        on_history: History,
    ) -> None:
        self.model, self.wrapped, self.cfg, self.accelerator = model, wrapped, cfg, accelerator
        self.sampler, self.optimizer, self.schedule, self.rest = sampler, optimizer, schedule, rest
        self.val_records, self.masks, self.on_history = val_records, masks, on_history
        self.hooks = training_hooks(model.clip, cfg.peft, cfg.train.grad_accum)
        self.state = TrainState()

    def loss(self, batch: Any, micro: int) -> torch.Tensor:
        pixels, mask, labels, _ = batch
        device = self.accelerator.device
        pixels = pixels.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True) if self.model.uses_masks else None
        # Each process holds its share of the global batch; summing and dividing by the global
        # batch size makes the DDP-averaged gradient equal to the single-process mean.
        scale = self.accelerator.num_processes / (self.sampler.sizes[micro] * self.cfg.train.grad_accum)
        out = self.wrapped(pixels, mask)
        loss = self.model.loss(out, labels) * scale
        if self.hooks.penalty is not None:
            loss = loss + self.hooks.penalty()
        self.state.roi_fallbacks += int(out.fallback.sum())
        self.state.samples_seen += len(labels)
        return loss

    def before_update(self, step: int) -> None:
        """The learning rate comes from the schedule (stepped in ``after_update``)."""

    def after_update(self, step: int) -> dict[str, Any]:
        if self.cfg.train.double_adapter_update:
            _update_again(self.optimizer, self.rest)
        if self.hooks.after_update is not None:
            self.hooks.after_update(step)
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step()
        return {"lr": lr}

    def end_step(self, step: int, entry: dict[str, Any]) -> dict[str, str]:
        t = self.cfg.train
        end_of_epoch = self.sampler.epoch_end[step * t.grad_accum - 1]
        if self.val_records and ((step % t.val_every == 0 and end_of_epoch) or step == t.total_steps):
            entry.update(
                _validate(self.model, self.val_records, self.cfg, self.accelerator, self.masks, step)
            )
            self.model.train(not t.eval_mode_after_validation)
        self.on_history(entry)
        return {"val_acc": f"{entry['val_accuracy']:.2f}"} if "val_accuracy" in entry else {}


def _update_again(optimizer: torch.optim.Optimizer, keep: list[torch.nn.Parameter]) -> None:
    """A second AdamW update of every parameter except `keep`, with the same gradients: what the
    published code's optimiser does to the backbone tensors it lists twice
    (``train.double_adapter_update``)."""
    saved = [p.grad for p in keep]
    for p in keep:
        p.grad = None  # AdamW skips a parameter without a gradient
    optimizer.step()
    for p, grad in zip(keep, saved, strict=True):
        p.grad = grad


def fit_closed_form(job: FitJob) -> None:
    """The linear probe: logistic regression on frozen, normalised CLIP image features, C picked
    on validation, copied into the model's linear head."""
    model, cfg, accelerator, progress = job.model, job.cfg, job.accelerator, job.progress
    train_records, val_records = job.train_records, job.val_records
    if not isinstance(model.head, LinearHead):
        raise TypeError("the closed-form fit needs the linear head")
    cache = job.features
    train = run_inference(
        model, train_records, cfg, accelerator, None, "features (train)", progress, features=cache
    )
    val = (
        run_inference(model, val_records, cfg, accelerator, None, "features (val)", progress, features=cache)
        if val_records
        else None
    )
    best: tuple[float, float] | None = None
    grid = [10.0**k for k in range(-2, 4)]
    for c in grid if val is not None else [1.0]:
        clf = LogisticRegression(C=c, max_iter=2000).fit(train.features, train.labels)
        score = float((clf.predict(val.features) == val.labels).mean()) if val is not None else 0.0
        if best is None or score > best[1]:
            best = (c, score)
    clf = LogisticRegression(C=best[0], max_iter=2000).fit(train.features, train.labels)
    weight = np.zeros((len(cfg.class_names), train.features.shape[1]), dtype=np.float32)
    bias = np.full(len(cfg.class_names), -1e4, dtype=np.float32)  # classes never seen stay impossible
    rows = clf.classes_
    if len(rows) == 2:  # sklearn keeps a single decision row for two classes
        weight[rows[1]], bias[rows[1]] = clf.coef_[0], clf.intercept_[0]
        bias[rows[0]] = 0.0
    else:
        weight[rows], bias[rows] = clf.coef_, clf.intercept_
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.from_numpy(weight))
        model.head.linear.bias.copy_(torch.from_numpy(bias))
    entry = {"step": 0, "linear_probe_C": best[0]}
    if val is not None:
        entry["val_accuracy"] = best[1]
    job.on_history(entry)


def fit_gradient(job: FitJob) -> None:
    """Masks of the draw computed once, then `train_steps`."""
    model = job.model
    show = job.progress and job.accelerator.is_main_process
    records = job.train_records + job.val_records
    store = job.masks.masks_for(records, progress=show) if model.uses_masks else None
    state = train_steps(
        model,
        job.cfg,
        job.accelerator,
        job.train_records,
        job.val_records,
        store,
        job.on_history,
        job.progress,
    )
    if model.uses_masks:
        log.info(
            "ROI fell back to the whole image for %d of %d training crops",
            state.roi_fallbacks,
            state.samples_seen,
        )


def fit_none(job: FitJob) -> None:
    """Zero-shot: nothing is trained."""
    log.info("%s: no training", job.cfg.method)


FITS: dict[str, Callable[[FitJob], None]] = {
    "gradient": fit_gradient,
    "closed_form": fit_closed_form,
    "none": fit_none,
    "tip_adapter": baselines.fit_tip_adapter,
    "tip_adapter_f": baselines.fit_tip_adapter_f,
    "clip_adapter": baselines.fit_clip_adapter,
    "lp_pp": baselines.fit_lp_pp,
    "clap": baselines.fit_clap,
    "ss_text": baselines.fit_ss_text,
    **dict.fromkeys(prompting.SCHEDULES, prompting.fit_prompts),
}
