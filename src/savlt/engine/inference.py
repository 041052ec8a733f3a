"""Batched, deterministic inference over a list of scans, sharded over processes.

Each process scores a contiguous shard of the records and the results are gathered, so under
``accelerate launch`` every scan is scored exactly once and ``n`` equals the set's size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from savlt.config import Config
from savlt.data.dataset import OCTDataset
from savlt.data.discover import ImageRecord
from savlt.data.masks import MaskStore
from savlt.data.transforms import eval_transform, train_transform
from savlt.models.savlt import SavltModel
from savlt.normalization import normalization
from savlt.processes import start_worker_server, worker_context, worker_started


@dataclass
class Inference:
    records: list[ImageRecord]
    labels: np.ndarray  # (N,) label indices
    logits: np.ndarray  # (N, C) prediction logits
    features: np.ndarray  # (N, E) normalised image features
    boxes: np.ndarray  # (N, 4) ROI boxes
    fallback: np.ndarray  # (N,) bool


class FeatureSource(Protocol):
    """Where a frozen model's image features come from instead of its forward pass
    (``savlt.engine.features.FeatureCache``)."""

    def features(self, records: Sequence[ImageRecord], view: int = 0, progress: bool = False) -> np.ndarray:
        """(N, E) normalised features of `records` at `view` (0: the evaluation view)."""


def view_seed(record: ImageRecord, view: int) -> int:
    """The augmentation seed of training view `view` of a scan: its path and the view number, so a
    view is the same in every run, process and order."""
    digest = hashlib.sha256(f"{record.center}/{record.rel}\0{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class _ViewSeeds(Sampler[tuple[int, int]]):
    """Every index in order, each with the seed of its `view` (see ``view_seed``)."""

    def __init__(self, records: Sequence[ImageRecord], view: int) -> None:
        self.seeds = [view_seed(r, view) for r in records]

    def __len__(self) -> int:
        return len(self.seeds)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(enumerate(self.seeds))


def start_loader_workers(cfg: Config, dataset: type[Dataset]) -> None:
    """When the data loaders use worker processes (``data.num_workers``), start the fork server
    they come from now (see ``savlt.processes``): it imports torch and `dataset`'s module once,
    while this process reads the data, and the decode check's workers come from it too."""
    if cfg.data.num_workers:
        start_worker_server(dataset.__module__)


def loader_for(dataset: Dataset, cfg: Config, batch_size: int, device: torch.device, **kwargs) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size if "batch_sampler" not in kwargs else 1,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        multiprocessing_context=worker_context(type(dataset).__module__) if workers else None,
        worker_init_fn=partial(worker_started, os.getpid()) if workers else None,
        **kwargs,
    )


@torch.no_grad()
def run_inference(
    model: SavltModel,
    records: Sequence[ImageRecord],
    cfg: Config,
    accelerator: Accelerator,
    masks: MaskStore | None,
    desc: str = "scoring",
    progress: bool = True,
    view: int = 0,
    features: FeatureSource | None = None,
) -> Inference:
    """Score `records` at `view` (0: the evaluation view, the deterministic resize, or with
    ``eval.transform=train`` the training transform seeded by ``view_seed(record, 0)`` as the
    published evaluation; 1, 2, …: seeded training views, see ``view_seed``). A frozen model (``SavltModel.frozen_features``) given a feature source is scored
    from its features, without a forward pass through the backbone."""
    records = list(records)
    if features is not None and model.frozen_features:
        return _from_features(model, records, cfg, features.features(records, view, progress), accelerator)
    shards = np.array_split(np.arange(len(records)), accelerator.num_processes)
    mine = shards[accelerator.process_index].tolist()
    stats = normalization(cfg.data.normalize, model.clip_model.normalization)
    augmented = view > 0 or cfg.eval.transform == "train"
    transform = (
        train_transform(cfg.data.image_size, cfg.train.crop_scale, cfg.train.hflip, stats)
        if augmented
        else eval_transform(cfg.data.image_size, stats)
    )
    dataset = OCTDataset([records[i] for i in mine], cfg.class_names, transform, masks)
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("logits", "features", "boxes", "fallback")}
    show = progress and accelerator.is_main_process
    order = {"sampler": _ViewSeeds(dataset.records, view)} if augmented else {"shuffle": False}
    loader = loader_for(dataset, cfg, cfg.eval.batch_size, accelerator.device, **order)
    for pixels, mask, _, _ in tqdm(loader, desc=desc, unit="batch", disable=not show, leave=False):
        pixels = pixels.to(accelerator.device, non_blocking=True)
        mask = mask.to(accelerator.device, non_blocking=True) if model.uses_masks else None
        with accelerator.autocast():
            out = model(pixels, mask)
            logits = model.logits(out)
        parts["logits"].append(logits.float().cpu().numpy())
        parts["features"].append(out.features.float().cpu().numpy())
        parts["boxes"].append(out.boxes.cpu().numpy())
        parts["fallback"].append(out.fallback.cpu().numpy())
    model.train(was_training)
    local = {k: (np.concatenate(v) if v else None) for k, v in parts.items()}
    if accelerator.num_processes > 1:
        shards_out = gather_object([(mine, local)])  # one entry per process, in rank order
        # the shards are contiguous and gathered in rank order, so concatenation is record order
        if [i for idx, _ in shards_out for i in idx] != list(range(len(records))):
            raise RuntimeError(
                f"the {accelerator.num_processes} processes did not score every image exactly once"
            )
        merged = {
            k: np.concatenate([part[k] for _, part in shards_out if part[k] is not None]) for k in parts
        }
    else:
        merged = local
    labels = np.array([dataset.label_index[r.label] for r in records], dtype=np.int64)
    return Inference(
        records, labels, merged["logits"], merged["features"], merged["boxes"], merged["fallback"]
    )


@torch.no_grad()
def _from_features(
    model: SavltModel, records: list[ImageRecord], cfg: Config, features: np.ndarray, accelerator: Accelerator
) -> Inference:
    """The Inference of a frozen model from its (N, E) image features (the whole image is its ROI)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = [
            model.logits_of(torch.from_numpy(chunk).to(accelerator.device)).float().cpu().numpy()
            for chunk in np.array_split(features, max(1, -(-len(features) // 4096)))
        ]
    model.train(was_training)
    index = {name: i for i, name in enumerate(cfg.class_names)}
    n = len(records)
    return Inference(
        records,
        np.array([index[r.label] for r in records], dtype=np.int64),
        np.concatenate(logits) if n else np.zeros((0, len(cfg.class_names)), dtype=np.float32),
        features,
        np.tile(np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32), (n, 1)),
        np.zeros(n, dtype=bool),
    )
