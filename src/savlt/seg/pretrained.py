"""Pretrained encoder weights, read offline-first.

segmentation_models_pytorch 0.6 keeps its encoder weights on the Hugging Face hub
(``smp-hub/<encoder>.<weights>``) and downloads them when a model is built. A hospital machine is
often offline, where that download hangs or ends in a long traceback. So the weights are looked
up in the local Hugging Face cache only (no network call at all), or read from a file the user
names; anything else is a SegmenterError that says how to provide them.
"""

from __future__ import annotations

import json
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors.torch import load_file

from savlt.io import state_mismatch
from savlt.normalization import Stats
from savlt.seg.model import IMAGENET_MEAN, IMAGENET_STD, SegmenterError, read_state_dict


def _cached(repo_id: str, filename: str, revision: str) -> Path | None:
    found = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _hub_weights(encoder: str, weights: str) -> tuple[dict[str, torch.Tensor], Stats]:
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    if weights not in settings:
        options = ", ".join(settings) or "none"
        raise SegmenterError(
            f"encoder {encoder!r} has no pretrained weights named {weights!r} (available: {options}); "
            "or give the path of an encoder weights file (.safetensors or .pth) as --encoder-weights"
        )
    repo_id, revision = settings[weights]["repo_id"], settings[weights]["revision"]
    path = _cached(repo_id, "model.safetensors", revision)
    if path is None:
        raise SegmenterError(
            f"the {weights} weights of encoder {encoder!r} are not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and SAVLT does not download them. On a machine with internet run "
            f"`hf download {repo_id} --revision {revision}` and copy its cache folder here (point HF_HOME or "
            "HF_HUB_CACHE at it), or pass an encoder weights file: --encoder-weights PATH.safetensors; "
            "without --encoder-weights the segmenter trains from scratch"
        )
    stats: Stats = (IMAGENET_MEAN, IMAGENET_STD)
    config = _cached(repo_id, "config.json", revision)
    if config is not None:
        data = json.loads(config.read_text())
        if "mean" in data and "std" in data:
            stats = (tuple(data["mean"]), tuple(data["std"]))
    return load_file(str(path)), stats


def load_encoder_weights(model: torch.nn.Module, encoder: str, weights: str) -> Stats:
    """Load `weights` (a name such as "imagenet", or a file) into model.encoder; returns its mean/std."""
    path = Path(weights).expanduser()
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        state, stats = read_state_dict(path, "encoder weights"), (IMAGENET_MEAN, IMAGENET_STD)
        where = str(path)
    else:
        state, stats = _hub_weights(encoder, weights)
        where = f"the cached {weights} weights"
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    expected = model.encoder.state_dict()
    # extra keys (e.g. an ImageNet classifier) are dropped; the encoder's own must all fit
    kept = {k: v for k, v in state.items() if k in expected}
    mismatch = state_mismatch(
        {k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in kept.items()}
    )
    if mismatch:
        raise SegmenterError(f"{where} do not fit encoder {encoder!r}: {mismatch}")
    model.encoder.load_state_dict(kept)
    return stats
