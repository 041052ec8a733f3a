"""The step-wise batch sampler of training and the device plan of sweeps."""

from __future__ import annotations

import pytest

from savlt.config import ConfigError
from savlt.data.discover import DataError
from savlt.engine.inputs import StepBatches
from savlt.sweep.runner import DevicePlan


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


def test_device_plan_on_cpu_splits_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    plan = DevicePlan.detect(jobs=3)
    assert (plan.gpus, plan.threads) == ([], 2)
    env = plan.env(1)
    assert env["OMP_NUM_THREADS"] == "2" and "CUDA_VISIBLE_DEVICES" not in env
    assert plan.summary() == "3 job(s) on the CPU, 2 thread(s) each"
    assert DevicePlan.detect(jobs=16).threads == 1  # never zero


def test_device_plan_gives_each_job_a_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    plan = DevicePlan.detect(jobs=3)
    assert plan.gpus == ["4", "6"]
    assert [plan.env(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["4", "6", "4"]
    assert plan.summary() == "3 job(s) on 2 GPU(s) (jobs share GPUs)" and plan.describe(1) == "GPU 6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert DevicePlan.detect(jobs=1).gpus == ["0", "1"]
