"""Sweeps: a grid of ordinary, resumable runs, summarised as mean ± std over seeds.

Python API (``savlt sweep SWEEP.yaml --out DIR [--jobs N]`` is a thin layer over it)::

    from savlt.sweep import aggregate, load_sweep, run_sweep, run_sweep_file
    sweep = load_sweep("configs/sweep_paper.yaml", ["model=tiny", "train.n_iters=3"])  # validated
    result = run_sweep(sweep, "sweeps/paper", jobs=2)  # trains unfinished points, skips finished
    summary = aggregate("sweeps/paper")                 # summary.csv / .md / .png (partial is fine)
    result, summary = run_sweep_file("configs/sweep_paper.yaml", "sweeps/paper", jobs=2)  # all three

See ``savlt.sweep.grid`` (the sweep file), ``savlt.sweep.runner`` (folders, resume, parallel jobs)
and ``savlt.sweep.aggregate`` (the statistics and the summary files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from savlt.sweep.aggregate import Summary, aggregate
from savlt.sweep.grid import SHORTHANDS, Sweep, SweepPoint, build_sweep, load_sweep
from savlt.sweep.runner import PointFailure, SweepError, SweepResult, is_complete, run_sweep

__all__ = [
    "SHORTHANDS",
    "PointFailure",
    "Summary",
    "Sweep",
    "SweepError",
    "SweepPoint",
    "SweepResult",
    "aggregate",
    "build_sweep",
    "is_complete",
    "load_sweep",
    "run_sweep",
    "run_sweep_file",
]


def run_sweep_file(
    path: str | Path,
    out: str | Path,
    jobs: int = 1,
    overrides: Sequence[str] = (),
    progress: bool = True,
    on_failure: Callable[[PointFailure], None] | None = None,
) -> tuple[SweepResult, Summary]:
    """Validate the sweep file, train its unfinished points, then (always) write the summary."""
    sweep = load_sweep(path, overrides)
    result = run_sweep(sweep, out, jobs=jobs, progress=progress, on_failure=on_failure)  # handles Ctrl-C
    return result, aggregate(out)
