"""The SAVLT classifier: CLIP (+ adapters) -> pooling -> a head (``savlt.models.heads``).

Image feature f: last-layer patch tokens (CLS dropped; by default after CLIP's final LayerNorm,
which the visual projection expects, or before it as published: ``token_layernorm``) pooled over the ROI, a learnable D×D layer, the CLIP visual projection,
L2 normalisation. With ``pooling="cls"`` f is CLIP's own pooled CLS token through the projection;
with ``"attn"`` the attention pooling covers every patch (no structure prior). Every method of
``savlt.methods`` is this model with its switches set by ``model_from_config``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import CLIPModel

from savlt.config import Config, PeftConfig
from savlt.methods import Head, Pooling
from savlt.models.adapters import add_adapters
from savlt.models.backbone import Backbone
from savlt.models.heads import HEADS, Scores
from savlt.models.pooling import RoiAttentionPool
from savlt.models.roi import patches_in_boxes, roi_boxes


@dataclass
class Output:
    features: torch.Tensor  # (B, E) L2-normalised image features
    scores: Scores  # the head's named (B, C) score sets, e.g. {"text": …, "proto": …}
    attention: torch.Tensor | None  # (B, H, N) pooling weights over the patch grid
    boxes: torch.Tensor  # (B, 4) ROI boxes, normalised x0, y0, x1, y1
    fallback: torch.Tensor  # (B,) bool: no all-tissue row, the whole image was used


class SavltModel(nn.Module):
    """CLIP with optional adapters, a pooling and a head.

    backbone: the CLIP and its tokenizer; class_texts: one description per class, in label order;
    pooling: roi | attn | cls; alpha: prototype weight of the alignment head; heads: attention
    heads of the pooling; head: a key of ``HEADS``; top_fraction: where the ROI band may start;
    token_layernorm: pool patch tokens after (true) or before (false, as published) the vision
    tower's final LayerNorm; pool_init: identity | reference (see ``RoiAttentionPool``); adapters: the peft set-up, or None to keep the whole backbone frozen (total_steps is the
    schedule length AdaLoRA needs); inference_scale: the logit scale at prediction.
    """

    def __init__(
        self,
        backbone: Backbone,
        class_texts: Sequence[str],
        *,
        pooling: Pooling = "roi",
        alpha: float = 0.5,
        heads: int = 4,
        head: Head = "alignment",
        top_fraction: float = 0.1,
        token_layernorm: bool = True,
        pool_init: str = "identity",
        adapters: PeftConfig | None = None,
        total_steps: int = 1,
        inference_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.top_fraction = top_fraction
        self.token_layernorm = token_layernorm
        self.grid = backbone.patch_grid
        clip = backbone.clip
        clip.requires_grad_(False)
        self.text_trainable = adapters is not None and adapters.text
        self.clip: nn.Module = clip if adapters is None else add_adapters(clip, adapters, total_steps)

        width = int(clip.config.vision_config.hidden_size)
        embed = int(clip.config.projection_dim)
        self.pool = RoiAttentionPool(width, heads, pool_init) if pooling in ("roi", "attn") else None
        self.head = HEADS[head](len(class_texts), embed, alpha, inference_scale)

        tokens = backbone.tokenizer(list(class_texts), padding=True, truncation=True, return_tensors="pt")
        self.register_buffer("text_ids", tokens["input_ids"], persistent=False)  # (C, L)
        self.register_buffer("text_mask", tokens["attention_mask"], persistent=False)  # (C, L)
        with torch.no_grad():
            self.register_buffer("text_cache", self.compute_text_features(), persistent=False)  # (C, E)
        self._eval_text: torch.Tensor | None = None

    # ------------------------------------------------------------------ backbone access
    @property
    def clip_model(self) -> CLIPModel:
        return self.clip.base_model.model if isinstance(self.clip, PeftModel) else self.clip

    @property
    def uses_masks(self) -> bool:
        return self.pooling == "roi"

    def train(self, mode: bool = True) -> SavltModel:
        self._eval_text = None  # text adapters may change: recompute after training
        return super().train(mode)

    # ------------------------------------------------------------------ text side
    def compute_text_features(self) -> torch.Tensor:
        """(C, E) normalised text features of the class descriptions, through the text encoder."""
        clip = self.clip_model
        pooled = clip.text_model(input_ids=self.text_ids, attention_mask=self.text_mask).pooler_output
        return F.normalize(clip.text_projection(pooled).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        """Cached when the text encoder is frozen; with text adapters, recomputed while training
        and computed once per evaluation."""
        if not self.text_trainable:
            return self.text_cache
        if self.training:
            return self.compute_text_features()
        if self._eval_text is None:
            with torch.no_grad():
                self._eval_text = self.compute_text_features()
        return self._eval_text

    # ------------------------------------------------------------------ image side
    def forward(self, pixels: torch.Tensor, masks: torch.Tensor | None = None) -> Output:
        """pixels (B, 3, S, S) normalised; masks (B, S, S) tissue masks (needed for ROI pooling)."""
        clip = self.clip_model
        vision = clip.vision_model(pixel_values=pixels)
        batch = pixels.shape[0]
        boxes = pixels.new_tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float32).expand(batch, 4)
        fallback = torch.zeros(batch, dtype=torch.bool, device=pixels.device)
        attention = None
        if self.pool is None:
            pooled = vision.pooler_output  # (B, D): CLS after the final LayerNorm
        else:
            tokens = vision.last_hidden_state[:, 1:]  # (B, N, D), CLS dropped
            if self.token_layernorm:
                tokens = clip.vision_model.post_layernorm(tokens)
            keep = None
            if self.pooling == "roi":
                if masks is None:
                    raise ValueError("ROI pooling needs tissue masks")
                boxes, fallback = roi_boxes(masks, self.top_fraction)
                keep = patches_in_boxes(boxes, self.grid)  # (B, N)
            pooled, attention = self.pool(tokens, keep)
        features = F.normalize(clip.visual_projection(pooled).float(), dim=-1)  # (B, E)
        return Output(features, self.head.scores(features, self.text_features), attention, boxes, fallback)

    # ------------------------------------------------------------------ head
    def logits(self, out: Output) -> torch.Tensor:
        """(B, C) class logits for prediction."""
        return self.head.logits(out.scores)

    def loss(self, out: Output, labels: torch.Tensor) -> torch.Tensor:
        """Summed (not averaged) loss, so shards of a batch add up exactly."""
        return self.head.loss(out.scores, labels, self.clip_model.logit_scale.exp().float())


def model_from_config(cfg: Config, backbone: Backbone) -> SavltModel:
    """The model of a run: the method's switches (``cfg.method_spec``) and the configured sizes."""
    method = cfg.method_spec
    return SavltModel(
        backbone,
        [c.description for c in cfg.data.classes],
        pooling=cfg.model.pooling,
        alpha=cfg.model.alpha,
        heads=cfg.model.heads,
        head=method.head,
        top_fraction=cfg.roi.top_fraction,
        token_layernorm=cfg.model.token_layernorm,
        pool_init=cfg.model.pool_init,
        adapters=cfg.peft if method.adapters else None,
        total_steps=cfg.train.total_steps,
        inference_scale=cfg.model.inference_scale,
    )
