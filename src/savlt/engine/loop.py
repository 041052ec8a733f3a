"""The one training-step loop: few-shot training (``engine.fit``), contrastive pretraining
(``engine.pretrain``) and any later trained method run their optimiser steps through ``run_steps``.

One optimiser step = ``grad_accum`` micro-batches; under several processes the gradients are
exchanged once per step (``no_sync`` on the other micro-batches). The loop knows no model, loss or
adapter type: a ``StepTask`` gives each micro-batch's loss and what happens around each update
(learning rate, extra updates, validation, history, checkpoints). The step's loss is the sum of its
micro-batch losses, averaged over the processes (so all of them stop together when it diverges).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from tqdm import tqdm


class StepTask(Protocol):
    def loss(self, batch: Any, micro: int) -> torch.Tensor:
        """The loss of micro-batch `micro` (counted from 0 over the whole run), computed under
        autocast; its gradients are accumulated into the step's."""

    def before_update(self, step: int) -> None:
        """Just before optimiser step `step` (counted from 1), e.g. set its learning rate."""

    def after_update(self, step: int) -> dict[str, Any]:
        """Just after the update, while the gradients are still there; returns the history
        entry's keys after step and loss (e.g. the learning rate used)."""

    def end_step(self, step: int, entry: dict[str, Any]) -> dict[str, str]:
        """The finished step's history `entry` (validate, record, save); returns the figures the
        progress bar shows besides the loss."""


def run_steps(
    task: StepTask,
    accelerator: Accelerator,
    wrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    grad_accum: int,
    steps: tuple[int, int],
    name: str,
    setting: str,
    progress: bool = True,
) -> None:
    """Optimiser steps ``steps[0] + 1 .. steps[1]`` over `batches` (the micro-batches from the
    first step on). `name` labels the progress bar and the divergence error, which suggests a
    lower `setting` (the learning rate's key)."""
    first, last_step = steps
    show = progress and accelerator.is_main_process
    bar = tqdm(total=last_step, initial=first, desc=name, unit="step", disable=not show)
    running = 0.0
    for micro, batch in enumerate(batches, start=first * grad_accum):
        last = (micro + 1) % grad_accum == 0
        with nullcontext() if last else accelerator.no_sync(wrapped):
            with accelerator.autocast():
                loss = task.loss(batch, micro)
            accelerator.backward(loss)
        running += float(loss.detach())
        if not last:
            continue
        step = (micro + 1) // grad_accum
        task.before_update(step)
        optimizer.step()
        extras = task.after_update(step)
        optimizer.zero_grad(set_to_none=True)
        if accelerator.num_processes > 1:  # each process holds its share of the step's loss
            running = float(accelerator.reduce(torch.tensor(running, device=accelerator.device), "mean"))
        entry = {"step": step, "loss": running, **extras}
        running = 0.0
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(
                f"{name} diverged at step {step} (loss {entry['loss']}); try a lower {setting}"
            )
        shown = task.end_step(step, entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", **shown)
        bar.update(1)
    bar.close()
