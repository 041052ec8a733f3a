"""The one training-step loop (engine.loop): accumulation, the task's hooks in order, resuming,
the divergence error; and the adapters' step hooks (models.adapters.training_hooks)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from savlt.config import load_config
from savlt.engine.loop import run_steps
from savlt.models.adapters import training_hooks
from savlt.models.backbone import build_random
from savlt.models.savlt import model_from_config


class Regression:
    """Least squares on fixed batches, recording every call the loop makes."""

    def __init__(self, model: torch.nn.Module, grad_accum: int, diverge_at: int | None = None) -> None:
        self.model, self.grad_accum, self.diverge_at = model, grad_accum, diverge_at
        self.calls: list[tuple[str, int]] = []
        self.entries: list[dict[str, Any]] = []

    def loss(self, batch: Any, micro: int) -> torch.Tensor:
        self.calls.append(("loss", micro))
        x, y = batch
        loss = ((self.model(x) - y) ** 2).sum() / self.grad_accum
        return loss * math.nan if micro // self.grad_accum + 1 == self.diverge_at else loss

    def before_update(self, step: int) -> None:
        self.calls.append(("before", step))

    def after_update(self, step: int) -> dict[str, Any]:
        self.calls.append(("after", step))
        return {"extra": step * 10}

    def end_step(self, step: int, entry: dict[str, Any]) -> dict[str, str]:
        self.calls.append(("end", step))
        self.entries.append(dict(entry))
        return {}


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(n)
    ]


def run(
    task: Regression, model: torch.nn.Module, data: list, grad_accum: int, steps: tuple[int, int]
) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run_steps(
        task, Accelerator(cpu=True), model, optimizer, data, grad_accum, steps, "training", "train.lr", False
    )


def test_accumulated_micro_batches_make_one_update_of_the_whole_batch() -> None:
    torch.manual_seed(0)
    accumulated = torch.nn.Linear(3, 1)
    whole = torch.nn.Linear(3, 1)
    whole.load_state_dict(accumulated.state_dict())
    initial = copy.deepcopy(accumulated)
    data = batches(4)
    task = Regression(accumulated, grad_accum=2)
    run(task, accumulated, data, 2, (0, 2))
    merged = [
        (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(data[::2], data[1::2], strict=True)
    ]
    run(Regression(whole, grad_accum=2), whole, merged, 1, (0, 2))  # the same scale: sums over 8 scans / 2
    for a, b in zip(accumulated.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert task.calls == [
        ("loss", 0), ("loss", 1), ("before", 1), ("after", 1), ("end", 1),
        ("loss", 2), ("loss", 3), ("before", 2), ("after", 2), ("end", 2),
    ]  # fmt: skip
    assert [(e["step"], e["extra"]) for e in task.entries] == [(1, 10), (2, 20)]
    # the step's loss is the sum of its micro-batch losses (each already divided by grad_accum)
    with torch.no_grad():
        expected = sum(float(((initial(x) - y) ** 2).sum()) / 2 for x, y in data[:2])
    assert task.entries[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_a_resumed_run_counts_its_steps_from_where_it_stopped() -> None:
    model = torch.nn.Linear(3, 1)
    task = Regression(model, grad_accum=2)
    run(task, model, batches(4), 2, (3, 5))  # the micro-batches of steps 4 and 5
    assert [c for c in task.calls if c[0] != "loss"] == [
        ("before", 4), ("after", 4), ("end", 4), ("before", 5), ("after", 5), ("end", 5)
    ]  # fmt: skip
    assert [c[1] for c in task.calls if c[0] == "loss"] == [6, 7, 8, 9]


def test_a_diverged_step_stops_with_the_step_and_the_setting_to_lower() -> None:
    model = torch.nn.Linear(3, 1)
    task = Regression(model, grad_accum=1, diverge_at=2)
    with pytest.raises(
        FloatingPointError, match=r"training diverged at step 2 \(loss nan\); try a lower train.lr"
    ):
        run(task, model, batches(3), 1, (0, 3))
    assert [e["step"] for e in task.entries] == [1]  # the diverged step is never recorded


def test_adalora_brings_its_penalty_and_rank_update_and_lora_nothing() -> None:
    def hooks(*overrides: str):
        cfg = load_config(overrides=["model.backbone=tiny", "train.max_steps=20", *overrides])
        return training_hooks(model_from_config(cfg, build_random("tiny")).clip, cfg.peft, 2)

    lora = hooks()
    assert lora.penalty is None and lora.after_update is None
    adalora = hooks("peft.type=adalora")
    assert adalora.penalty is not None and float(adalora.penalty().detach()) > 0
    assert callable(adalora.after_update)
    published = hooks("peft.type=adalora", "peft.variant=published")  # the published code uses neither
    assert published.penalty is None and published.after_update is None
