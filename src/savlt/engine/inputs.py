"""What a run reads: the scanned data set, the training center's split and few-shot draw, the
evaluation sets, and the deterministic step-wise batch sampler.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from savlt.config import Config, ConfigError
from savlt.data.discover import CenterData, DataError, DatasetScan, ImageRecord, scan_data
from savlt.data.prepare import cache_folder, resolve_few_shot, resolve_split
from savlt.data.splits import PARTS, FewShot, Split, load_few_shot, load_split, patients_across_parts

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    scan: DatasetScan
    split: Split
    few_shot: FewShot
    test_centers: list[str]
    split_by: str = "patient"
    # Patients the split puts in several parts (only with data.split_by=image) -> those parts.
    across: dict[str, list[str]] = field(default_factory=dict)

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

    def patient_sources(self) -> dict[str, str | None]:
        """center -> where its patients came from ("metadata.csv", "data.patient_pattern"; None)."""
        return {name: center.patient_source for name, center in self.scan.centers.items()}

    def split_summary(self) -> dict[str, Any]:
        """metrics.json's "split": split by patient or image, where the training center's patients
        came from, scans and patients per part, and the patients found in several parts."""
        summary: dict[str, Any] = {"by": self.split_by}
        center = self.scan.centers.get(self.train_center)
        if center is None:  # another hospital's export, without the training center
            return summary
        records = center.by_rel()
        summary["patient_source"] = center.patient_source
        summary["parts"] = {
            part: {
                "scans": len(self.split.part(part)),
                "patients": len({records[r].patient_id for r in self.split.part(part)}),
            }
            for part in PARTS
        }
        if self.across:
            summary["patients_in_several_parts"] = len(self.across)
            summary["examples"] = {p: parts for p, parts in list(self.across.items())[:10]}
            summary["warning"] = (
                f"{len(self.across)} patient(s) have scans in several parts (data.split_by=image): "
                "the internal test results are optimistic"
            )
        return summary


def _test_centers(cfg: Config, scan: DatasetScan) -> list[str]:
    if cfg.data.test_centers is not None:
        return list(cfg.data.test_centers)
    return [name for name in scan.centers if name != cfg.data.train_center]


def patient_note(center: CenterData) -> str:
    """Where a center's patients come from, in words (the run log and the report say it)."""
    patients = len({r.patient_id for r in center.records})
    if center.patient_source is not None:
        return f"{len(center.records)} scans of {patients} patients (from {center.patient_source})"
    volumes = len({r.volume for r in center.records if r.page is not None})
    pages = f", the pages of each of its {volumes} volume(s) one patient" if volumes else ""
    return (
        f"{len(center.records)} scans, no patient information (no metadata.csv, no data.patient_pattern): "
        f"every scan is its own patient{pages}"
    )


def _log_patients(inputs: RunInputs) -> None:
    for name in dict.fromkeys([inputs.train_center, *inputs.test_centers]):
        if name in inputs.scan.centers:
            log.info("center %s: %s", name, patient_note(inputs.scan.center(name)))
    if inputs.across:
        patient, parts = next(iter(inputs.across.items()))
        log.warning(
            "the split puts %d patient(s) of center %s in several parts (e.g. %s in %s): accepted because "
            "data.split_by=image; the internal test results are optimistic",
            len(inputs.across),
            inputs.train_center,
            patient,
            " and ".join(parts),
        )


def prepare_inputs(cfg: Config) -> RunInputs:
    """Scan the data, then split the training center and draw the few-shot lists (cached), by
    patient unless ``data.split_by=image``."""
    data = cfg.data
    scan = scan_data(data.root, cfg.class_map(), patient_pattern=data.patient_pattern)
    tests = _test_centers(cfg, scan)
    scan.require_usable([data.train_center, *tests])
    train_center = scan.center(data.train_center)
    cache = cache_folder(data.root, data.cache_dir)
    split = resolve_split(
        train_center, cache, data.split_ratios, data.split_seed, data.split_file, data.split_by
    )
    draw_seed = cfg.train.seed if data.fewshot_seed is None else data.fewshot_seed
    few = resolve_few_shot(
        split,
        train_center,
        cfg.train.shots,
        draw_seed,
        cache,
        data.split_by,
        cfg.protocol,
        data.shot_imbalance,
        data.fewshot_sampler,
        data.fewshot_file,
    )
    inputs = RunInputs(scan, split, few, tests, data.split_by, patients_across_parts(split, train_center))
    _log_patients(inputs)
    return inputs


def reload_inputs(cfg: Config, split_file: Path, few_shot_file: Path, centers: list[str] | None) -> RunInputs:
    """The inputs of a saved run, re-read against a (possibly moved) data root. A patient the
    run's split puts in several parts (metadata added since) is recorded, not refused: the run
    was trained on that split."""
    scan = scan_data(cfg.data.root, cfg.class_map(), patient_pattern=cfg.data.patient_pattern)
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
        empty = Split(name, [], [], [], source="absent")
        return RunInputs(scan, empty, FewShot(name, 0, 0, [], []), tests, cfg.data.split_by)
    scan.require_usable([name])
    train_center = scan.center(name)
    split = load_split(split_file, train_center)
    few = load_few_shot(few_shot_file, train_center)
    inputs = RunInputs(scan, split, few, tests, cfg.data.split_by, patients_across_parts(split, train_center))
    _log_patients(inputs)
    return inputs


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
