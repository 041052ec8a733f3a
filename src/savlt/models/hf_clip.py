"""Hugging Face ``CLIPModel`` backbones behind the ``VisionLanguage`` interface.

``HFClip`` holds the CLIP's own towers under their own names (``vision_model``, ``text_model``,
``visual_projection``, ``text_projection``, ``logit_scale``), so adapter and checkpoint tensor
names are those of the ``CLIPModel``. The built-in random presets of this family (their shapes in
``savlt.models.backbone.PRESETS``) use a character-level tokenizer made in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from savlt.models.backbone_files import BackboneError, hub_cache
from savlt.models.vision_language import VisionLanguage
from savlt.normalization import CLIP_STATS, Stats

_PROJECTIONS = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"


class HFClip(nn.Module, VisionLanguage):
    kind = "hf"

    def __init__(
        self, clip: CLIPModel, tokenizer: CLIPTokenizer, source: str, normalization: Stats = CLIP_STATS
    ) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.text_model = clip.text_model
        self.visual_projection = clip.visual_projection
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.clip_config = clip.config  # not "config": peft would take this wrapper for a transformers model
        self._clip = (clip,)  # the CLIPModel itself (same modules), for save_pretrained; not a child
        self.tokenizer = tokenizer
        self.source = source
        self.normalization = normalization
        vision = clip.config.vision_config
        self.image_size = int(vision.image_size)
        self.patch_size = int(vision.patch_size)
        self.width = int(vision.hidden_size)
        self.vision_layers = int(vision.num_hidden_layers)
        self.embed_dim = int(clip.config.projection_dim)

    @property
    def hf_model(self) -> CLIPModel:
        """The ``CLIPModel`` sharing these modules (adapters merged in place stay merged there)."""
        return self._clip[0]

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixels))

    def vision_blocks(self) -> Sequence[nn.Module]:
        return self.vision_model.encoder.layers

    def run_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return block(tokens, None)

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vision_model.post_layernorm(tokens)

    def cls_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vision_model.post_layernorm(tokens[:, 0])

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(pooled)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids=ids, attention_mask=mask).pooler_output)

    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def forward(
        self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLIP's contrastive forward (``savlt pretrain``): L2-normalised image features (CLS) and
        text features of matching pairs, and the logit scale (log of the scale)."""
        image = self.project_image(self.cls_feature(self.vision_tokens(pixels)))
        text = self.encode_text(ids, mask)
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), self.logit_scale

    def adapter_targets(self, first_layer: int, text: bool) -> tuple[str, str | None]:
        layers = "|".join(str(i) for i in range(first_layer, self.vision_layers))
        vision = rf"vision_model\.encoder\.layers\.({layers})\.{_PROJECTIONS}"
        return vision, (rf"text_model\.encoder\.layers\.\d+\.{_PROJECTIONS}" if text else None)

    def projections(self, text: bool) -> list[nn.Parameter]:
        return [self.visual_projection.weight] + ([self.text_projection.weight] if text else [])

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        vision, text = self.clip_config.vision_config, self.clip_config.text_config
        shape = (
            vision.hidden_size,
            vision.num_hidden_layers,
            vision.patch_size,
            vision.image_size,
            text.hidden_size,
            text.num_hidden_layers,
            self.clip_config.projection_dim,
        )
        digest.update(repr(shape).encode())
        for tensor in (
            self.vision_model.embeddings.patch_embedding.weight,
            self.vision_model.embeddings.class_embedding,
            self.token_embedding().weight[:256],
        ):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save_pretrained(self, folder: str | Path, normalization: Stats | None = None) -> None:
        """A Hugging Face CLIP folder (the current dtype) with its tokenizer and an image processor
        holding `normalization` (default: the backbone's own), which loading reads back."""
        mean, std = normalization or self.normalization
        self.hf_model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        size = self.image_size
        CLIPImageProcessor(
            image_mean=list(mean),
            image_std=list(std),
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
        ).save_pretrained(folder)


# ---------------------------------------------------------------------- built-in random CLIPs


def tiny_tokenizer(max_length: int = 128) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer without merges: one token per character."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(alphabet)})
    vocab.update({ch + "</w>": i + 2 + len(alphabet) for i, ch in enumerate(alphabet)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def random_clip_config(
    shapes: dict[str, dict[str, int]], vocab_size: int, max_length: int = 128
) -> CLIPConfig:
    """ViT with 16-pixel patches at 224 (the 14×14 token grid of ViT-B/16), with the tower shapes
    of a preset (``savlt.models.backbone.PRESETS``)."""
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


def build_random_hf(name: str, shapes: dict[str, dict[str, int]]) -> HFClip:
    """The same random CLIP every time (its own seed; the global RNG is left alone)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(random_clip_config(shapes, len(tokenizer)))
    return HFClip(clip.eval(), tokenizer, name).eval()


# ---------------------------------------------------------------------- pretrained, offline first


def how_to_provide(name: str) -> str:
    """One line: what `name` was looked for as, and how to provide it offline."""
    return (
        f"{name!r} is neither a backbone built into SAVLT, a local folder, nor a Hugging Face CLIP in "
        f"the local cache ({hub_cache()}; set HF_HOME or HF_HUB_CACHE to use another): on a machine "
        f"with internet run `hf download {name}` and copy its cache folder here, or save it with "
        f"CLIPModel.from_pretrained({name!r}).save_pretrained(DIR) plus the tokenizer's "
        "save_pretrained(DIR) and pass --model DIR, or allow a download with --set "
        f"model.allow_download=true; if it is an open_clip model (such as BiomedCLIP), name it --model "
        f"hf-hub:{name}; "
        "to try SAVLT without downloading anything use --model tiny-oct, the small OCT CLIP shipped "
        "with SAVLT (docs/backbones.md)"
    )


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """transformers without its warnings and progress bars: a missing file is reported by us, in
    one message."""
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf(source: str, local_only: bool, stats: Stats, name: str | None = None) -> HFClip:
    """A CLIPModel and its tokenizer from a folder or hub id (float32 whatever the file holds), with
    the mean and std its backbone source declares."""
    with quiet_hf():
        clip = CLIPModel.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
    return HFClip(clip.eval(), tokenizer, name or source, stats).eval()


def _detail(exc: Exception) -> str:
    """An exception's message on one line (transformers' span several)."""
    return " ".join(str(exc).split())


def load_hf_folder(folder: Path, stats: Stats) -> HFClip:
    try:
        return load_hf(str(folder), local_only=True, stats=stats)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot load the CLIP model in {folder}: {_detail(exc)}") from None


def load_hf_hub(spec: str, allow_download: bool, stats: Stats) -> HFClip:
    try:
        return load_hf(spec, local_only=True, stats=stats)
    except (OSError, ValueError) as exc:
        if not allow_download:
            raise BackboneError(f"{how_to_provide(spec)} (detail: {_detail(exc)})") from None
    try:
        return load_hf(spec, local_only=False, stats=stats)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"download of {spec!r} failed ({_detail(exc)}); {how_to_provide(spec)}") from None
