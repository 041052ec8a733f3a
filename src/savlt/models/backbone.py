"""Loading the CLIP backbone: a hub id or local folder (offline-first), or a built-in one.

Pretrained weights are never fetched silently: a hub id is looked up in the local Hugging Face
cache, and only with ``model.allow_download`` may the hub be asked. When the weights are not
there the error says how to provide them. ``tiny`` is a small CLIP with random weights (fixed
seed) and a character-level tokenizer built in-process, for tests; ``tiny-oct`` is a small CLIP
pretrained on synthetic OCT scans by ``savlt pretrain`` and shipped inside the package.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from savlt.errors import SavltError

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"
TINY = "tiny"


class BackboneError(SavltError):
    """The backbone cannot be loaded; the message says how to provide it."""


@dataclass
class Backbone:
    clip: CLIPModel
    tokenizer: CLIPTokenizer
    name: str  # "tiny", the hub id or the folder path

    @property
    def image_size(self) -> int:
        return int(self.clip.config.vision_config.image_size)

    @property
    def patch_grid(self) -> int:
        vision = self.clip.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)


def tiny_tokenizer(max_length: int = 128) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer without merges: one token per character."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(alphabet)})
    vocab.update({ch + "</w>": i + 2 + len(alphabet) for i, ch in enumerate(alphabet)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


# Built-in CLIPs with random weights: "tiny" for tests; "small" the architecture of the shipped
# ``tiny-oct``; "random-vit-b16" has the shapes of openai/clip-vit-base-patch16, for speed and
# memory measurements without the weights.
RANDOM_PRESETS: dict[str, dict[str, dict[str, int]]] = {
    TINY: {
        "vision": {
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "projection": {"projection_dim": 64},
    },
    # The architecture of the shipped, pretrained ``tiny-oct`` (random weights here).
    "small": {
        "vision": {
            "hidden_size": 144,
            "intermediate_size": 576,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        "text": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        "projection": {"projection_dim": 128},
    },
    "random-vit-b16": {
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        "text": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
        },
        "projection": {"projection_dim": 512},
    },
}


# Backbones pretrained by `savlt pretrain` and shipped inside the package, loaded offline by name.
SHIPPED = ("tiny-oct",)


def random_clip_config(preset: str, vocab_size: int, max_length: int = 128) -> CLIPConfig:
    """ViT with 16-pixel patches at 224 (the 14×14 token grid of ViT-B/16)."""
    shapes = RANDOM_PRESETS[preset]
    return CLIPConfig(
        text_config={
            **shapes["text"],
            "vocab_size": vocab_size,
            "max_position_embeddings": max_length,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**shapes["vision"], "image_size": 224, "patch_size": 16},
        projection_dim=shapes["projection"]["projection_dim"],
        logit_scale_init_value=math.log(100.0),  # CLIP's trained scale, so train and test agree
    )


def build_random(preset: str = TINY) -> Backbone:
    """The same random CLIP every time (its own seed; the global RNG is left alone)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(random_clip_config(preset, len(tokenizer)))
    return Backbone(clip.eval(), tokenizer, preset)


def _how_to_provide(name: str) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    return (
        f"The weights of {name!r} are not available on this machine. Either\n"
        f"  - on a machine with internet run `hf download {name}` (or "
        f"`huggingface-cli download {name}`) and copy its cache folder to {cache} here "
        "(set HF_HOME or HF_HUB_CACHE to use another cache location), or\n"
        f"  - save it with CLIPModel.from_pretrained({name!r}).save_pretrained(DIR) plus the "
        "tokenizer's save_pretrained(DIR), copy DIR here and pass --model DIR, or\n"
        "  - allow a download with --set model.allow_download=true on a machine that can reach the hub.\n"
        "For a quick try without weights use --model tiny."
    )


def _from_pretrained(source: str, local_only: bool, name: str | None = None) -> Backbone:
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # a missing file is reported by us, in one message
    hf_logging.disable_progress_bar()
    try:
        # float32 whatever the file holds (the shipped tiny-oct is stored in float16)
        clip = CLIPModel.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    return Backbone(clip.eval(), tokenizer, name or source)


def shipped_folder(name: str) -> Path:
    """Where a backbone shipped with the package lives (``savlt/backbones/<name>``)."""
    return Path(__file__).resolve().parents[1] / "backbones" / name


def _shipped(name: str) -> Backbone:
    folder = shipped_folder(name)
    if not (folder / "model.safetensors").is_file():
        raise BackboneError(
            f"the weights of the built-in backbone {name!r} are missing from this installation "
            f"({folder}); reinstall SAVLT, or rebuild them as the README's 'A pretrained OCT-CLIP' says"
        )
    return _from_pretrained(str(folder), local_only=True, name=name)


def load_backbone(spec: str = DEFAULT_BACKBONE, allow_download: bool = False) -> Backbone:
    """`tiny` (or another random preset), `tiny-oct` (shipped, pretrained), a local folder saved
    with save_pretrained, or a hub id found in the local cache."""
    if spec in RANDOM_PRESETS:
        return build_random(spec)
    if spec in SHIPPED:
        return _shipped(spec)
    folder = Path(spec).expanduser()
    if folder.exists() or spec.startswith((".", "/", "~")):
        if not (folder / "config.json").is_file():
            raise BackboneError(
                f"backbone folder {folder} holds no config.json: it must be a CLIP model saved with "
                "save_pretrained (config.json, model.safetensors, tokenizer files)"
            )
        try:
            return _from_pretrained(str(folder), local_only=True)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"cannot load the CLIP model in {folder}: {exc}") from None
    try:
        return _from_pretrained(spec, local_only=True)
    except (OSError, ValueError) as exc:
        if not allow_download:
            raise BackboneError(f"{_how_to_provide(spec)}\n(detail: {exc})") from None
    try:
        return _from_pretrained(spec, local_only=False)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"download of {spec!r} failed ({exc}).\n{_how_to_provide(spec)}") from None


def backbone_fingerprint(clip: CLIPModel) -> str:
    """A short hash of the frozen weights, to refuse a checkpoint trained on another backbone."""
    digest = hashlib.sha256()
    vision, text = clip.config.vision_config, clip.config.text_config
    shape = (
        vision.hidden_size,
        vision.num_hidden_layers,
        vision.patch_size,
        vision.image_size,
        text.hidden_size,
        text.num_hidden_layers,
        clip.config.projection_dim,
    )
    digest.update(repr(shape).encode())
    for tensor in (
        clip.vision_model.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.class_embedding,
        clip.text_model.embeddings.token_embedding.weight[:256],
    ):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
