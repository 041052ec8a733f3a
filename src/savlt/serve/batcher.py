"""Micro-batching: concurrent requests' scans go through one queue to one worker thread, which
runs the model on up to `max_batch` scans at a time, waiting at most `max_wait` seconds after the
first scan of a batch for others to join. Under load, scans queue while the model is busy and
the next batch takes them all, so the model runs on batches; a lone request waits `max_wait`."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# The model on a batch: scans -> one result per scan, in order. A scan is whatever the model
# function takes (the service passes scans prepared by ``Run.prepare``).
PredictBatch = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class _Job:
    image: Any
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the worker has done: batches run, scans predicted, the largest batch."""

    batches: int = 0
    images: int = 0
    largest: int = 0

    def add(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.largest = max(self.largest, size)

    def to_json(self) -> dict[str, float]:
        mean = self.images / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "images": self.images,
            "largest": self.largest,
            "mean": round(mean, 2),
        }


class MicroBatcher:
    def __init__(self, predict: PredictBatch, max_batch: int = 16, max_wait: float = 0.005) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0 (got {max_batch}, {max_wait})")
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="savlt-batcher", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued scans, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def submit(self, images: Sequence[Any]) -> list[Future]:
        """Queue scans; each future gets its scan's result (or the model's exception)."""
        if not self.running:
            raise RuntimeError("the prediction worker is not running")
        jobs = [_Job(image) for image in images]
        for job in jobs:
            self._queue.put(job)
        return [job.future for job in jobs]

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            # A job whose request went away (its future cancelled) is dropped; the others can no
            # longer be cancelled, so their results can always be set.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, group: list[_Job]) -> None:
        """One model call for the group; if it fails, each scan alone, so one bad scan fails only
        its own request."""
        try:
            results = self.predict([job.image for job in group])
        except Exception as exc:  # noqa: BLE001 - reported to the waiting requests, the worker lives on
            if len(group) > 1:
                for job in group:
                    self._run([job])
                return
            log.exception("prediction failed")
            group[0].future.set_exception(exc)
            return
        self.stats.add(len(group))
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)
