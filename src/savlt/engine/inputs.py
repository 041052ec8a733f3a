"""What a run reads: the scanned data set, the training center's split and few-shot draw, the
evaluation sets, and the deterministic step-wise batch sampler.
"""

from __future__ import annotations

import itertools
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
        """The internal test split (under its center's name; left out when the training center is
        not in the data, e.g. a new hospital's export) and every image of each external center."""
        sets = {}
        if self.train_center in self.scan.centers:
            sets[self.train_center] = self._records(self.split.test)
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
    draw_seed = cfg.train.seed if data.fewshot_seed is None else data.fewshot_seed
    few = resolve_few_shot(split, train_center, cfg.train.shots, draw_seed, cache)
    return RunInputs(scan, split, few, tests)


def reload_inputs(cfg: Config, split_file: Path, few_shot_file: Path, centers: list[str] | None) -> RunInputs:
    """The inputs of a saved run, re-read against a (possibly moved) data root."""
    scan = scan_data(cfg.data.root, cfg.class_map())
    tests = centers if centers is not None else _test_centers(cfg, scan)
    name = cfg.data.train_center
    if name not in scan.centers and centers is not None and name in centers:
        raise DataError(
            f"the run's training center {name!r} is not under {cfg.data.root}: leave it out of "
            "--centers to evaluate the other centers only"
        )
    scan.require_usable(tests)
    if name not in scan.centers:
        # another hospital's export: only its own centers are scored, not the internal test split
        return RunInputs(scan, Split(name, [], [], [], source="absent"), FewShot(name, 0, 0, [], []), tests)
    train_center = scan.center(cfg.data.train_center)
    split = load_split(split_file, train_center)
    return RunInputs(scan, split, load_few_shot(few_shot_file, train_center), tests)


class StepBatches(Sampler[list[tuple[int, int]]]):
    """`steps` batches of (dataset index, augmentation seed), all drawn up front from one seed.

    ``epochs=False`` (default): a stream of epoch permutations cut into full batches, an epoch's
    remainder carried into the next. ``epochs=True`` (the published code's loader): every epoch
    is reshuffled and cut into batches of `batch_size`, the last one short.
    Rank r of `world` processes gets items r::world of each global batch, so any number of
    processes trains on the same global batches; ``sizes`` holds each global batch's size and
    ``epoch_end`` whether it closes an epoch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        steps: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        epochs: bool = False,
    ) -> None:
        if size < 1:
            raise DataError("no training images")
        self.steps, self.rank, self.world = steps, rank, world
        self.batch_size = min(batch_size, size)
        rng = np.random.default_rng(seed)
        draw = (
            self._epochs(rng, size, self.batch_size) if epochs else self._stream(rng, size, self.batch_size)
        )
        self.batches: list[list[tuple[int, int]]] = []
        self.epoch_end: list[bool] = []
        for batch, end in itertools.islice(draw, steps):
            self.batches.append(batch)
            self.epoch_end.append(end)
        self.sizes = [len(b) for b in self.batches]
        smallest = min(self.sizes, default=world)
        if smallest < world:
            what = (
                "the last batch of an epoch holds" if epochs and smallest < self.batch_size else "a batch of"
            )
            raise ConfigError(
                f"{what} {smallest} images, which cannot be split over {world} processes: "
                "change train.batch_size or the number of processes"
            )

    @staticmethod
    def _stream(rng: np.random.Generator, size: int, batch_size: int) -> Iterator[tuple[list, bool]]:
        queue: list[int] = []
        while True:
            while len(queue) < batch_size:
                queue += rng.permutation(size).tolist()
            batch, queue = queue[:batch_size], queue[batch_size:]
            seeds = rng.integers(0, 2**31 - 1, size=batch_size).tolist()
            yield list(zip(batch, seeds, strict=True)), True

    @staticmethod
    def _epochs(rng: np.random.Generator, size: int, batch_size: int) -> Iterator[tuple[list, bool]]:
        while True:
            order = rng.permutation(size).tolist()
            for start in range(0, size, batch_size):
                batch = order[start : start + batch_size]
                seeds = rng.integers(0, 2**31 - 1, size=len(batch)).tolist()
                yield list(zip(batch, seeds, strict=True)), start + batch_size >= size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield batch[self.rank :: self.world]
