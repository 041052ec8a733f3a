"""Runs side by side: accuracy and AUC of each run on each center (``savlt compare``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from savlt.errors import SavltError
from savlt.io import text_table


def read_metrics(run: str | Path) -> dict[str, Any]:
    """A run folder's metrics.json; a folder without one is a one-line error."""
    path = Path(run) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SavltError(
            f"{run} holds no readable metrics.json ({exc}); is it a finished run folder?"
        ) from None


def comparison_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Rows: the centers of the runs (the internal test marked); columns: accuracy and AUC per run."""
    centers: dict[str, None] = {}
    for _, metrics in runs:
        centers.update(dict.fromkeys(metrics.get("centers", {})))
    header = ["center", *(f"{label} {what}" for label, _ in runs for what in ("accuracy", "AUC"))]
    rows = []
    for center in centers:
        internal = any(m.get("train_center") == center for _, m in runs)
        cells = [center + (" (internal test)" if internal else "")]
        for _, metrics in runs:
            m = metrics.get("centers", {}).get(center)
            auc = m["binary"]["auc"] if m else None
            cells += ["n/a" if m is None else f"{m['accuracy']:.3f}", "n/a" if auc is None else f"{auc:.3f}"]
        rows.append(cells)
    return text_table(header, rows)
