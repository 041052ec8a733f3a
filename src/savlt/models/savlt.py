"""The SAVLT classifier: CLIP (+ adapters) -> ROI attention pooling -> dual alignment.

Image feature f: last-layer patch tokens (CLS dropped, after CLIP's final LayerNorm, which the
visual projection expects) pooled over the ROI, a learnable D×D layer, the CLIP visual projection,
L2 normalisation. Logits: text anchors T (normalised text features of the class descriptions)
and visual prototypes P (one learnable vector per class, orthogonal init), mixed with alpha:
loss = (1 − α)·CE(s·f·Tᵀ) + α·CE(s·f·Pᵀ), and prediction uses the same mixture at scale 100.
The methods of ``savlt.config.METHODS`` are this model with parts switched off (CLS pooling,
α = 0 or 1) or with a linear head on frozen features (linear probe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import CLIPModel

from savlt.config import Config
from savlt.models.adapters import add_adapters
from savlt.models.backbone import Backbone
from savlt.models.pooling import RoiAttentionPool
from savlt.models.roi import patches_in_boxes, roi_boxes

# Methods that train no adapters.
FROZEN_METHODS = ("zero_shot", "linear_probe")


@dataclass
class Output:
    features: torch.Tensor  # (B, E) L2-normalised image features
    text_sim: torch.Tensor | None  # (B, C) cosine similarities to the text anchors
    proto_sim: torch.Tensor | None  # (B, C) cosine similarities to the prototypes
    linear: torch.Tensor | None  # (B, C) linear-probe logits
    attention: torch.Tensor | None  # (B, H, N) pooling weights over the patch grid
    boxes: torch.Tensor  # (B, 4) ROI boxes, normalised x0, y0, x1, y1
    fallback: torch.Tensor  # (B,) bool: no all-tissue row, the whole image was used


class SavltModel(nn.Module):
    def __init__(self, cfg: Config, backbone: Backbone, total_steps: int = 1) -> None:
        super().__init__()
        self.method = cfg.method
        self.pooling = cfg.model.pooling
        self.alpha = cfg.model.alpha
        self.inference_scale = cfg.model.inference_scale
        self.top_fraction = cfg.roi.top_fraction
        self.grid = backbone.patch_grid
        clip = backbone.clip
        clip.requires_grad_(False)
        self.text_trainable = cfg.peft.text and self.method not in FROZEN_METHODS
        self.clip: nn.Module = (
            clip if self.method in FROZEN_METHODS else add_adapters(clip, cfg.peft, total_steps)
        )

        width = int(clip.config.vision_config.hidden_size)
        embed = int(clip.config.projection_dim)
        n_classes = len(cfg.class_names)
        self.pool = RoiAttentionPool(width, cfg.model.heads) if self.pooling in ("roi", "attn") else None
        self.prototypes = None
        if self.alpha > 0 and self.method != "linear_probe":
            self.prototypes = nn.Parameter(nn.init.orthogonal_(torch.empty(n_classes, embed)))  # (C, E)
        self.head = nn.Linear(embed, n_classes) if self.method == "linear_probe" else None

        tokens = backbone.tokenizer(
            [c.description for c in cfg.data.classes], padding=True, truncation=True, return_tensors="pt"
        )
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
            tokens = clip.vision_model.post_layernorm(vision.last_hidden_state[:, 1:])  # (B, N, D)
            keep = None
            if self.pooling == "roi":
                if masks is None:
                    raise ValueError("ROI pooling needs tissue masks")
                boxes, fallback = roi_boxes(masks, self.top_fraction)
                keep = patches_in_boxes(boxes, self.grid)  # (B, N)
            pooled, attention = self.pool(tokens, keep)
        features = F.normalize(clip.visual_projection(pooled).float(), dim=-1)  # (B, E)
        text_sim = features @ self.text_features().T if self.alpha < 1 and self.head is None else None
        proto_sim = (
            features @ F.normalize(self.prototypes.float(), dim=-1).T if self.prototypes is not None else None
        )
        linear = self.head(features) if self.head is not None else None
        return Output(features, text_sim, proto_sim, linear, attention, boxes, fallback)

    # ------------------------------------------------------------------ heads
    def logits(self, out: Output) -> torch.Tensor:
        """(B, C) class logits for prediction: the α-mixture of both alignments at scale 100."""
        if out.linear is not None:
            return out.linear
        mixed = torch.zeros_like(out.features[:, :1])
        if out.text_sim is not None:
            mixed = mixed + (1 - self.alpha) * out.text_sim
        if out.proto_sim is not None:
            mixed = mixed + self.alpha * out.proto_sim
        return self.inference_scale * mixed

    def loss(self, out: Output, labels: torch.Tensor) -> torch.Tensor:
        """Summed (not averaged) dual-alignment loss, so shards of a batch add up exactly."""
        scale = self.clip_model.logit_scale.exp().float()
        total = torch.zeros((), device=labels.device)
        if out.text_sim is not None:
            total = total + (1 - self.alpha) * F.cross_entropy(scale * out.text_sim, labels, reduction="sum")
        if out.proto_sim is not None:
            total = total + self.alpha * F.cross_entropy(scale * out.proto_sim, labels, reduction="sum")
        return total
