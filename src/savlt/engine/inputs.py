"""What a run reads: the scanned data set, the training center's split and few-shot draw, the
evaluation sets, and the deterministic step-wise batch sampler.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from savlt.config import Config, ConfigError
from savlt.data.discover import DataError, DatasetScan, ImageRecord, scan_data
from savlt.data.prepare import cache_folder, resolve_few_shot, resolve_split
from savlt.data.splits import FewShot, Split, load_few_shot, load_split


@dataclass
class RunInputs:
    scan: DatasetScan
    split: Split
    few_shot: FewShot
    test_centers: list[str]

    @property
    def train_center(self) -> str:
        return self.split.center

    def _records(self, rels: list[str]) -> list[ImageRecord]:
        by_rel = self.scan.center(self.train_center).by_rel()
        return [by_rel[r] for r in rels]

    def train_records(self) -> list[ImageRecord]:
        return self._records(self.few_shot.train)

    def val_records(self) -> list[ImageRecord]:
        return self._records(self.few_shot.val)

    def eval_sets(self) -> dict[str, list[ImageRecord]]:
        """The internal test split (under its center's name) and every image of each external center."""
        sets = {self.train_center: self._records(self.split.test)}
        for name in self.test_centers:
            if name != self.train_center:
                sets[name] = list(self.scan.center(name).records)
        return sets


def _test_centers(cfg: Config, scan: DatasetScan) -> list[str]:
    if cfg.data.test_centers is not None:
        return list(cfg.data.test_centers)
    return [name for name in scan.centers if name != cfg.data.train_center]


def prepare_inputs(cfg: Config) -> RunInputs:
    """Scan the data, then split the training center and draw the few-shot lists (cached)."""
    data = cfg.data
    scan = scan_data(data.root, cfg.class_map())
    tests = _test_centers(cfg, scan)
    scan.require_usable([data.train_center, *tests])
    train_center = scan.center(data.train_center)
    cache = cache_folder(data.root, data.cache_dir)
    split = resolve_split(train_center, cache, data.split_ratios, data.split_seed, data.split_file)
    few = resolve_few_shot(split, train_center, cfg.train.shots, cfg.train.seed, cache)
    return RunInputs(scan, split, few, tests)


def reload_inputs(cfg: Config, split_file: Path, few_shot_file: Path, centers: list[str] | None) -> RunInputs:
    """The inputs of a saved run, re-read against a (possibly moved) data root."""
    scan = scan_data(cfg.data.root, cfg.class_map())
    tests = centers if centers is not None else _test_centers(cfg, scan)
    scan.require_usable(tests)
    if cfg.data.train_center not in scan.centers:
        raise DataError(f"the run's training center {cfg.data.train_center!r} is not under {cfg.data.root}")
    train_center = scan.center(cfg.data.train_center)
    split = load_split(split_file, train_center)
    return RunInputs(scan, split, load_few_shot(few_shot_file, train_center), tests)


class StepBatches(Sampler[list[tuple[int, int]]]):
    """`steps` batches of (dataset index, augmentation seed), drawn from a seeded stream of
    epoch permutations; every batch is full. Rank r of `world` processes gets items r::world
    of each global batch, so any number of processes trains on the same global batches."""

    def __init__(
        self, size: int, batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        if size < 1:
            raise DataError("no training images")
        self.size, self.steps, self.seed = size, steps, seed
        self.batch_size = min(batch_size, size)
        if self.batch_size < world:
            raise ConfigError(f"a batch of {self.batch_size} images cannot be split over {world} processes")
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng(self.seed)
        queue: list[int] = []
        for _ in range(self.steps):
            while len(queue) < self.batch_size:
                queue += rng.permutation(self.size).tolist()
            batch, queue = queue[: self.batch_size], queue[self.batch_size :]
            seeds = rng.integers(0, 2**31 - 1, size=self.batch_size).tolist()
            yield list(zip(batch, seeds, strict=True))[self.rank :: self.world]
