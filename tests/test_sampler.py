"""The step-wise batch sampler of training: full seeded batches, shared by ranks, checked sizes."""

from __future__ import annotations

import pytest

from savlt.config import ConfigError
from savlt.data.discover import DataError
from savlt.engine.inputs import StepBatches


def test_batches_are_full_seeded_and_cover_each_epoch() -> None:
    batches = list(StepBatches(size=10, batch_size=4, steps=5, seed=3))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    indices = [i for b in batches for i, _ in b]
    assert sorted(indices[:10]) == list(range(10))  # the first epoch is a permutation
    assert batches == list(StepBatches(size=10, batch_size=4, steps=5, seed=3))
    assert batches != list(StepBatches(size=10, batch_size=4, steps=5, seed=4))
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)  # one augmentation seed per draw


def test_ranks_share_every_global_batch() -> None:
    whole = list(StepBatches(size=12, batch_size=6, steps=4, seed=0))
    parts = [list(StepBatches(size=12, batch_size=6, steps=4, seed=0, rank=r, world=3)) for r in range(3)]
    for step, batch in enumerate(whole):
        shards = [parts[r][step] for r in range(3)]
        assert sorted(x for shard in shards for x in shard) == sorted(batch)
        assert all(len(shard) == 2 for shard in shards)


def test_small_data_and_bad_sizes() -> None:
    assert all(len(b) == 3 for b in StepBatches(size=3, batch_size=32, steps=2, seed=0))  # batch capped
    with pytest.raises(DataError, match="no training images"):
        StepBatches(size=0, batch_size=4, steps=1, seed=0)
    with pytest.raises(ConfigError, match="cannot be split over 4 processes"):
        StepBatches(size=2, batch_size=8, steps=1, seed=0, world=4)
