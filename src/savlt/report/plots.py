"""The PNG figures of a report: confusion matrices, ROC curves, training curves, heat maps."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from savlt.classes import short_name  # noqa: E402
from savlt.io import atomic_path  # noqa: E402


def save_png(fig: Figure, path: Path) -> None:
    """Write a figure as a PNG file atomically (a full disk is an error naming it), and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def confusion_png(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path
) -> None:
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(matrix, cmap="Blues")
    labels = [short_name(n) for n in class_names]
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)


def roc_curve_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every distinct threshold."""
    order = np.argsort(-score, kind="stable")
    positive, score = positive[order], score[order]
    distinct = np.r_[np.nonzero(np.diff(score))[0], len(score) - 1]
    tps = np.cumsum(positive)[distinct]
    fps = (distinct + 1) - tps
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def roc_png(
    positive: np.ndarray,
    score: np.ndarray,
    auc: float | None,
    title: str,
    path: Path,
    operating_point: tuple[float, float] | None = None,
) -> None:
    """The ROC curve, with the referral screen's (1 − specificity, sensitivity) marked when given.
    That screen refers on the predicted class or the threshold, not on the score alone, so its
    point need not lie on the curve (the legend says so)."""
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    if auc is not None:
        fpr, tpr = roc_curve_points(positive, score)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {auc:.3f}")
        if operating_point is not None:
            ax.plot(*operating_point, "o", color="C3", ms=8, label="referral screen\n(class or threshold)")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one binary class present", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)


Bins = tuple[np.ndarray, np.ndarray, np.ndarray]  # scans, mean confidence, accuracy per bin


def reliability_png(before: Bins, after: Bins, title: str, path: Path) -> None:
    """Reliability diagrams before and after calibration, side by side: per equal-width bin of the
    top-class confidence, a bar of the accuracy of its scans (the scans counted above it), the
    mean confidence marked in the bar, and the diagonal of perfect calibration. An empty bin has
    no bar."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2), sharey=True)
    for ax, (counts, confidence, accuracy), label, colour in (
        (axes[0], before, "before calibration", "C1"),
        (axes[1], after, "after (temperature)", "C0"),
    ):
        width = 1 / len(counts)
        left = np.arange(len(counts)) * width
        filled = counts > 0
        ax.bar(
            left[filled], accuracy[filled], width, align="edge", color=colour, alpha=0.75, edgecolor="white"
        )
        ax.hlines(
            confidence[filled],
            left[filled],
            left[filled] + width,
            color="black",
            lw=1.5,
            label="mean confidence",
        )
        for x, acc, n in zip(left[filled], accuracy[filled], counts[filled], strict=True):
            ax.text(x + width / 2, min(acc, 0.93) + 0.015, str(int(n)), ha="center", va="bottom", fontsize=7)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_title(f"{label} (scans per bin above the bars)", fontsize=9)
    axes[0].set_ylabel("accuracy of the bin's scans")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)


def training_curves_png(history: Sequence[dict[str, Any]], path: Path) -> None:
    steps = [h["step"] for h in history if "loss" in h]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(steps, [h["loss"] for h in history if "loss" in h], lw=1, label="train loss")
    val = [h for h in history if "val_loss" in h]
    if val:
        axes[0].plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="val loss")
        axes[1].plot([h["step"] for h in val], [h["val_accuracy"] for h in val], "o-", color="C2")
    axes[0].set_xlabel("optimiser step")
    axes[0].set_ylabel("loss (cross-entropy)")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].set_xlabel("optimiser step")
    axes[1].set_ylabel("accuracy on the validation draw")
    axes[1].set_title("validation accuracy")
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    save_png(fig, path)


# Heat maps show attention relative to uniform attention over the patches attended (1 = every
# ROI patch weighted alike), always on this scale, so uniform attention never looks like a hot spot.
HEAT_SCALE = (0.0, 4.0)


def relative_attention(attention: np.ndarray) -> np.ndarray:
    """Attention weights (g×g) divided by the uniform weight over the patches attended (non-zero)."""
    weights = np.asarray(attention, dtype=np.float64)
    attended = int((weights > 0).sum())
    return weights * max(attended, 1) / max(float(weights.sum()), 1e-12)


# Heat maps are drawn on figures of their own (no pyplot state), one at a time: matplotlib's font
# cache is shared between figures, and the service draws them in several threads.
_HEATMAP_TURN = threading.Lock()
# Inches: the width, the least and the largest height (in between, the height follows the scan's).
HEATMAP_SIZE = (6.4, 3.4, 16.0)
# Perceptually uniform, so equal steps in attention look like equal steps in colour.
HEATMAP_COLOURS = "magma"
HEATMAP_TITLE_INCHES = 0.35
HEATMAP_DPI = 100
HEATMAP_SCAN_WIDTH = 0.80  # the share of the width the scan takes; the colour bar is right of it
HEATMAP_SOFTWARE = "SAVLT heat map"  # the PNG's Software text: how SAVLT recognises its heat maps


def is_heatmap_png(path: Path) -> bool:
    """Whether `path` is a heat map SAVLT wrote (a PNG file, no link, whose Software text says so)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and getattr(image, "text", {}).get("Software") == HEATMAP_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def heatmap_title(name: str, predicted: str, probability: float) -> str:
    """A heat map's title: the scan's file name, its predicted class and that class's probability."""
    return f"{Path(name).name}: {short_name(predicted)} {100 * probability:.1f} %"


def heatmap_png(
    image: np.ndarray, attention: np.ndarray, box: Sequence[float], target: Path | BinaryIO, title: str = ""
) -> None:
    """The pooling attention (g×g) over the scan on a fixed, perceptually uniform colour scale,
    with a colour bar, the ROI band outlined, a legend and `title` (``heatmap_title``); patches
    that were not attended stay uncoloured. `target` is a file path or a binary file object
    (``io.BytesIO``); any thread may call it. The layout is fixed (no tight layout pass) and a
    large scan is shrunk to the width it is shown at first: a heat map is drawn for every scan the
    review page shows, so it is kept cheap."""
    height, width = image.shape[:2]
    relative = relative_attention(attention).astype(np.float32)
    heat = np.where(relative > 0, relative, np.nan)  # transparent outside the attended patches
    shown_width = round(HEATMAP_SCAN_WIDTH * HEATMAP_SIZE[0] * HEATMAP_DPI)  # pixels across the scan
    if width > shown_width:
        size = (shown_width, max(1, round(height * shown_width / width)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    extent = (0, width, height, 0)
    with _HEATMAP_TURN:
        scan_height = max(HEATMAP_SIZE[1], 5.0 * height / width + 0.8)
        figure_height = min(scan_height + HEATMAP_TITLE_INCHES, HEATMAP_SIZE[2])
        top = 1 - HEATMAP_TITLE_INCHES / figure_height
        fig = Figure(figsize=(HEATMAP_SIZE[0], figure_height))
        ax = fig.add_axes((0.01, 0.01, HEATMAP_SCAN_WIDTH, top - 0.02))
        fig.text(0.01, 1 - 0.5 * HEATMAP_TITLE_INCHES / figure_height, title, va="center", fontsize=10)
        ax.imshow(image, extent=extent)
        shown = ax.imshow(
            heat,
            cmap=HEATMAP_COLOURS,
            vmin=HEAT_SCALE[0],
            vmax=HEAT_SCALE[1],
            alpha=0.45,
            extent=extent,
            interpolation="nearest",
        )
        x0, y0, x1, y1 = (v * s for v, s in zip(box, (width, height, width, height), strict=True))
        ax.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=2, label="ROI band")
        )
        bar = fig.colorbar(shown, cax=fig.add_axes((0.83, 0.08 * top, 0.03, 0.84 * top)), extend="max")
        bar.set_label("attention ÷ uniform (1 = spread evenly)", fontsize=9)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
        ax.set_axis_off()
        fig.savefig(
            target,
            dpi=HEATMAP_DPI,
            format="png",
            metadata={"Software": HEATMAP_SOFTWARE},
            pil_kwargs={"compress_level": 1},
        )
