"""What a backbone's files declare, read without building the model (and without importing
open_clip): the names of an open_clip folder's files, its config, and the mean and std of a
Hugging Face or open_clip folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from savlt.errors import SavltError
from savlt.normalization import CLIP_STATS, Stats


class BackboneError(SavltError):
    """The backbone cannot be loaded or used; the message says what to provide or change."""


OPEN_CLIP_PREFIX = "open_clip:"
HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # an open_clip folder's


def hub_cache() -> str:
    """The local Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub)."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def _stats(mean: Any, std: Any, where: str) -> Stats:
    """Two lists of three numbers as a mean and std; anything else is a one-line error."""
    message = f"{where}: the mean and std must be lists of three numbers (got {mean!r} and {std!r})"
    if not (isinstance(mean, list | tuple) and isinstance(std, list | tuple) and len(mean) == len(std) == 3):
        raise BackboneError(message)
    try:
        return (tuple(float(v) for v in mean), tuple(float(v) for v in std))  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise BackboneError(message) from None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path} cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise BackboneError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_open_clip_config(folder: Path) -> dict[str, Any]:
    """An open_clip folder's ``open_clip_config.json`` (with its ``model_cfg``)."""
    config = _json(folder / OPEN_CLIP_CONFIG)
    if not isinstance(config.get("model_cfg"), dict):
        raise BackboneError(f"{folder / OPEN_CLIP_CONFIG} is not an open_clip config (no model_cfg mapping)")
    return config


def preprocess_stats(config: dict[str, Any], where: Path) -> Stats:
    """The mean and std of an open_clip config's preprocess_cfg (CLIP's when it names none)."""
    preprocess = config.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise BackboneError(f"{where}: preprocess_cfg must be a mapping")
    clip = CLIP_STATS
    return _stats(preprocess.get("mean", list(clip[0])), preprocess.get("std", list(clip[1])), str(where))


def hf_folder_stats(folder: Path) -> Stats:
    """A Hugging Face folder's image-processor mean and std (``preprocessor_config.json``), CLIP's
    when it has none."""
    processor = folder / "preprocessor_config.json"
    if not processor.is_file():
        return CLIP_STATS
    values = _json(processor)
    clip = CLIP_STATS
    return _stats(
        values.get("image_mean", list(clip[0])), values.get("image_std", list(clip[1])), str(processor)
    )
