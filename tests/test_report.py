"""The run report and the heat maps: every interval, per-class tables, absent classes, a fixed
colour scale with its bar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from savlt.report.plots import heatmap_png, relative_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_shows_every_interval_per_class_tables_and_absent_classes(export_run) -> None:
    _, run = export_run
    report = (run / "report.md").read_text()
    for title in ("sensitivity [95% CI]", "specificity [95% CI]", "PPV [95% CI]", "NPV [95% CI]"):
        assert title in report
    metrics = json.loads((run / "metrics.json").read_text())
    ci = metrics["centers"]["newhosp"]["ci95"]["binary"]["sensitivity"]
    assert f"[{ci[0]:.3f}, {ci[1]:.3f}]" in report
    assert report.count("| class | scans | recall | precision | F1 |") == 2  # one per center
    assert "No scans of cyst in this center" in report
    section = report.split("## newhosp")[1]
    assert "| cyst | 0 | n/a |" in section and "| HSIL | 8 |" in section


def test_heat_maps_use_a_fixed_scale_with_a_colour_bar(tmp_path: Path) -> None:
    uniform = np.zeros((14, 14))
    uniform[4:] = 1 / (10 * 14)  # attention spread evenly over the ROI rows
    relative = relative_attention(uniform)
    assert np.allclose(relative[4:], 1.0) and np.all(relative[:4] == 0)  # "1 = uniform", not a hot spot
    peaked = uniform.copy()
    peaked[8, 8] += 0.2
    peaked /= peaked.sum()
    assert relative_attention(peaked)[8, 8] > 4 * relative_attention(peaked)[5, 5]
    image = np.full((96, 128, 3), 120, np.uint8)
    heatmap_png(image, uniform, (0.0, 0.3, 1.0, 1.0), tmp_path / "uniform.png")
    with Image.open(tmp_path / "uniform.png") as png:
        assert png.width > 2 * image.shape[1]  # the scan, a colour bar and its label
