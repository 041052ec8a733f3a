"""The tissue segmenter behind the ROI structure prior: training, checkpoints, prediction, evaluation.

The ROI pipeline needs only ``load_segmenter(folder).predict_masks(images)``. The names below are
resolved lazily, so that ``savlt --help`` (which registers the ``seg`` commands) need not import
torch and segmentation_models_pytorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from savlt.seg.model import SegmenterError, SegmenterSpec, TissueSegmenter, load_segmenter, save_segmenter

__all__ = ["SegmenterError", "SegmenterSpec", "TissueSegmenter", "load_segmenter", "save_segmenter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from savlt.seg import model

        return getattr(model, name)
    raise AttributeError(f"module 'savlt.seg' has no attribute {name!r}")
