"""Learnt prompt context for the text tower: the CoOp family of methods (README, "Prompt learning").

Each class's prompt is ``"<context> <class text>."``: the token embeddings of the n_ctx context
positions (right after the start token) are learnt vectors, the rest are the frozen tower's own.
The context starts as the token embeddings of a phrase (``init``, e.g. "a photo of a": n_ctx is
then the phrase's token count and the prompt is the phrase's own text) or, without one, from
N(0, 0.02²) with placeholder tokens "X" in the prompt. One context is shared by every class, or
each class has its own (``class_specific``). CoCoOp's meta-net (``meta``: Linear E → E/16, ReLU,
Linear E/16 → W) turns each image's normalised feature into a bias added to every context vector,
so each image has its own prompts; those are encoded in one call of the text tower for the whole
batch (B·C sequences).

The text tower is the backbone's (``VisionLanguage.encode_embedded``): positions, attention masks
and pooling are each tower's own, so no method asks which kind of backbone it holds. The backbone
is referenced, not a child module: a run saves the context (and meta-net) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from savlt.errors import SavltError
from savlt.models.vision_language import VisionLanguage

PLACEHOLDER = "X"  # CoOp's placeholder word for a randomly started context
INIT_STD = 0.02
ENCODE_CHUNK = 512  # at most this many prompts per text-tower call without a gradient (CoCoOp's evaluation)


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt learner is built from: the class text of each prompt (label order), the
    number of context vectors (used without a phrase), the starting phrase ("" = random), one
    context per class, and CoCoOp's meta-net."""

    texts: tuple[str, ...]
    n_ctx: int = 16
    init: str = ""
    class_specific: bool = False
    meta: bool = False


class PromptError(SavltError):
    """Prompts that the backbone's tokenizer cannot lay out as context + class text."""


def _token_count(backbone: VisionLanguage, text: str) -> int:
    """Tokens of `text` between the start and end tokens."""
    _, mask = backbone.tokenize([text])
    return int(mask[0].sum()) - 2


def prompt_layout(spec: PromptSpec, backbone: VisionLanguage) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n_ctx, ids (C, L), mask (C, L)) of the prompts "<context> <class text>.", after checking
    that the tokenizer keeps the context as the first n_ctx tokens of every prompt and that the
    class texts still tell the prompts apart (a context too long for the tower's context length
    would truncate them away)."""
    if spec.init:
        n_ctx, prefix = _token_count(backbone, spec.init), spec.init
    else:
        n_ctx, prefix = spec.n_ctx, " ".join([PLACEHOLDER] * spec.n_ctx)
    if n_ctx < 1:
        raise PromptError(f"prompts.init {spec.init!r} has no tokens: give a phrase, or random")
    ids, mask = backbone.tokenize([f"{prefix} {text}." for text in spec.texts])
    expected, _ = backbone.tokenize([prefix])
    if ids.shape[1] < n_ctx + 2 or not torch.equal(
        ids[:, 1 : 1 + n_ctx], expected[:, 1 : 1 + n_ctx].expand(len(ids), -1)
    ):
        raise PromptError(
            f"the tokenizer does not keep the context {prefix!r} as the first {n_ctx} tokens of every "
            "prompt; choose another prompts.init or a smaller prompts.n_ctx"
        )
    if len({tuple(row.tolist()) for row in ids}) < len(ids):
        raise PromptError(
            f"with {n_ctx} context tokens the class texts no longer tell the prompts apart (the text tower "
            "truncates them): use a smaller prompts.n_ctx or prompts.class_text=name"
        )
    return n_ctx, ids, mask


class PromptLearner(nn.Module):
    def __init__(self, spec: PromptSpec, backbone: VisionLanguage) -> None:
        super().__init__()
        self._backbone = (backbone,)  # not a child: the frozen tower is not part of this module's state
        self.class_specific = spec.class_specific
        n_ctx, ids, mask = prompt_layout(spec, backbone)
        self.n_ctx = n_ctx
        self.register_buffer("ids", ids, persistent=False)  # (C, L)
        self.register_buffer("mask", mask, persistent=False)  # (C, L)
        with torch.no_grad():
            tokens = backbone.embed_tokens(ids).float()
        self.register_buffer("tokens", tokens, persistent=False)  # (C, L, W): the frozen embeddings
        width = tokens.shape[-1]
        classes = len(spec.texts)
        if spec.init:
            start = tokens[0, 1 : 1 + n_ctx].clone()
            if spec.class_specific:
                start = start.expand(classes, -1, -1).clone()
        else:  # CoOp: every class's context its own draw
            shape = (classes, n_ctx, width) if spec.class_specific else (n_ctx, width)
            start = torch.empty(shape).normal_(std=INIT_STD)
        self.ctx = nn.Parameter(start)  # (n_ctx, W) or (C, n_ctx, W)
        embed = backbone.embed_dim
        hidden = max(1, embed // 16)
        self.meta_net = (
            nn.Sequential(nn.Linear(embed, hidden), nn.ReLU(), nn.Linear(hidden, width))
            if spec.meta
            else None
        )

    @property
    def backbone(self) -> VisionLanguage:
        return self._backbone[0]

    def _embeds(self, ctx: torch.Tensor) -> torch.Tensor:
        """(..., C, L, W) prompt embeddings with context `ctx` (..., C, n_ctx, W)."""
        frozen = self.tokens.expand(*ctx.shape[:-3], -1, -1, -1)
        return torch.cat([frozen[..., :1, :], ctx, frozen[..., 1 + self.n_ctx :, :]], dim=-2)

    def _encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """(S, L, W) embeddings of S prompts (the C class prompts, repeated) -> (S, E) normalised."""
        repeat = len(embeds) // len(self.ids)
        ids, mask = self.ids.repeat(repeat, 1), self.mask.repeat(repeat, 1)
        return F.normalize(self.backbone.encode_embedded(embeds, ids, mask).float(), dim=-1)

    def class_features(self) -> torch.Tensor:
        """(C, E) normalised text features of the learnt prompts."""
        classes = len(self.ids)
        ctx = self.ctx if self.class_specific else self.ctx.expand(classes, -1, -1)
        return self._encode(self._embeds(ctx.to(self.tokens.dtype)))

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, E) normalised text features of each image's prompts (CoCoOp), from (B, E)
        normalised image features: the meta-net's bias is added to every context vector. Without a
        gradient (evaluation) the images go through in groups, so memory stays bounded."""
        if self.meta_net is None:
            raise ValueError("image-conditioned prompts need the meta-net")
        classes = len(self.ids)
        group = len(features) if torch.is_grad_enabled() else max(1, ENCODE_CHUNK // classes)
        ctx = self.ctx if self.class_specific else self.ctx.expand(classes, -1, -1)
        parts = []
        for start in range(0, len(features), group):
            chunk = features[start : start + group]
            bias = self.meta_net(chunk.float())  # (b, W)
            shifted = ctx.to(self.tokens.dtype)[None] + bias[:, None, None, :]  # (b, C, n_ctx, W)
            text = self._encode(self._embeds(shifted).flatten(0, 1))
            parts.append(text.view(len(chunk), classes, -1))
        return torch.cat(parts)
