"""The SAVLT classifier: a CLIP-like backbone (+ adapters) -> pooling -> a head (``savlt.models.heads``).

Image feature f: last-layer patch tokens (CLS dropped; by default after the vision tower's final
LayerNorm, which the visual projection expects, or before it as published: ``token_layernorm``)
pooled over the ROI, a learnable D×D layer, the visual projection, L2 normalisation. With
``pooling="cls"`` f is the tower's own pooled CLS token through the projection; with ``"attn"``
the attention pooling covers every patch (no structure prior). ``roi_masking`` other than
``pool`` also zeroes the non-ROI patch tokens inside the backbone (see
``savlt.models.vision_language``). The backbone is any ``VisionLanguage`` (Hugging Face CLIP or
open_clip). Every method of ``savlt.methods`` is this model with its switches set by
``model_from_config``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from savlt.config import Config, PeftConfig
from savlt.methods import Head, Pooling, RoiMasking
from savlt.models.adapters import add_adapters
from savlt.models.heads import HEADS, HeadShape, Scores
from savlt.models.pooling import RoiAttentionPool
from savlt.models.prompts import PromptSpec, prompt_layout
from savlt.models.roi import patches_in_boxes, roi_boxes
from savlt.models.vision_language import VisionLanguage


@dataclass
class Output:
    features: torch.Tensor  # (B, E) L2-normalised image features
    scores: Scores  # the head's named (B, C) score sets, e.g. {"text": …, "proto": …}
    attention: torch.Tensor | None  # (B, H, N) pooling weights over the patch grid
    boxes: torch.Tensor  # (B, 4) ROI boxes, normalised x0, y0, x1, y1
    fallback: (
        torch.Tensor
    )  # (B,) bool: no all-tissue row, or no whole patch in the ROI: the whole image was used


class SavltModel(nn.Module):
    """A CLIP-like backbone with optional adapters, a pooling and a head.

    backbone: a ``VisionLanguage`` (it carries its tokenizer); class_texts: one description per class, in label order;
    pooling: roi | attn | cls; alpha: prototype weight of the alignment head; heads: attention
    heads of the pooling; head: a key of ``HEADS``; top_fraction: where the ROI band may start;
    patch_rule: which patches are inside the ROI (``patches_in_boxes``);
    token_layernorm: pool patch tokens after (true) or before (false, as published) the vision
    tower's final LayerNorm; pool_init: identity | reference (see ``RoiAttentionPool``);
    roi_masking: pool (the ROI acts in the pooling only) | every_block | isolated (see
    ``VisionLanguage.vision_tokens``); adapters: the peft set-up, or None to keep the whole backbone
    frozen (total_steps is the schedule length AdaLoRA needs); inference_scale: the logit scale at
    prediction (None: the backbone's learned one); adapter_ratio: CLIP-Adapter's residual ratio; prompts: the learnt prompts of a
    prompt-learning head.
    """

    def __init__(
        self,
        backbone: VisionLanguage,
        class_texts: Sequence[str],
        *,
        pooling: Pooling = "roi",
        alpha: float = 0.5,
        heads: int = 4,
        head: Head = "alignment",
        top_fraction: float = 0.1,
        patch_rule: str = "savlt",
        token_layernorm: bool = True,
        pool_init: str = "identity",
        roi_masking: RoiMasking = "pool",
        adapters: PeftConfig | None = None,
        total_steps: int = 1,
        inference_scale: float | None = 100.0,
        adapter_ratio: float = 0.2,
        prompts: PromptSpec | None = None,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.roi_masking = roi_masking
        self.top_fraction = top_fraction
        self.patch_rule = patch_rule
        self.token_layernorm = token_layernorm
        self.grid = backbone.patch_grid
        backbone.requires_grad_(False)
        self.text_trainable = adapters is not None and adapters.text
        self.clip: nn.Module = backbone if adapters is None else add_adapters(backbone, adapters, total_steps)

        self.pool = RoiAttentionPool(backbone.width, heads, pool_init) if pooling in ("roi", "attn") else None
        if inference_scale is None:  # the backbone's learned scale (frozen, so fixed for the run)
            inference_scale = float(backbone.logit_scale.detach().exp())
        self.inference_scale = inference_scale
        self.head = HEADS[head].build(
            HeadShape(len(class_texts), backbone.embed_dim, alpha, inference_scale, adapter_ratio, prompts),
            backbone,
        )

        ids, mask = backbone.tokenize(class_texts)
        self.register_buffer("text_ids", ids, persistent=False)  # (C, L)
        self.register_buffer("text_mask", mask, persistent=False)  # (C, L)
        with torch.no_grad():
            self.register_buffer("text_cache", self.compute_text_features(), persistent=False)  # (C, E)
        self._eval_text: torch.Tensor | None = None
        # roi.mask_timing=crop: the tissue masks of each input batch (B, 3, S, S) -> (B, S, S), made
        # by the run's segmenter instead of the masks handed in (not part of the model's state)
        self.input_masks: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ------------------------------------------------------------------ backbone access
    @property
    def clip_model(self) -> VisionLanguage:
        return self.clip.base_model.model if isinstance(self.clip, PeftModel) else self.clip

    @property
    def frozen_features(self) -> bool:
        """The image feature is the frozen backbone's own (no adapters, CLS pooling, no ROI masking),
        so it can be computed once and cached (``savlt.engine.features``) and the head is all a
        fit changes."""
        return self.clip is self.clip_model and self.pooling == "cls" and self.roi_masking == "pool"

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) prediction logits from (B, E) normalised image features."""
        return self.head.logits(self.head.scores(features, self.text_features))

    @property
    def uses_masks(self) -> bool:
        return self.pooling == "roi" or self.roi_masking != "pool"

    def train(self, mode: bool = True) -> SavltModel:
        self._eval_text = None  # text adapters may change: recompute after training
        return super().train(mode)

    # ------------------------------------------------------------------ text side
    def compute_text_features(self) -> torch.Tensor:
        """(C, E) normalised text features of the class descriptions, through the text encoder."""
        return F.normalize(self.clip_model.encode_text(self.text_ids, self.text_mask).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) normalised features of `texts` through the frozen text encoder."""
        clip = self.clip_model
        ids, mask = clip.tokenize(texts)
        device = self.text_ids.device
        return F.normalize(clip.encode_text(ids.to(device), mask.to(device)).float(), dim=-1)

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
        """pixels (B, 3, S, S) normalised; masks (B, S, S) tissue masks (needed for ROI pooling,
        unless the model segments its inputs itself: ``input_masks``)."""
        clip = self.clip_model
        batch = pixels.shape[0]
        boxes = pixels.new_tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float32).expand(batch, 4)
        fallback = torch.zeros(batch, dtype=torch.bool, device=pixels.device)
        keep = None
        if self.uses_masks:
            if self.input_masks is not None:
                masks = self.input_masks(pixels)
            if masks is None:
                raise ValueError("ROI pooling and ROI masking need tissue masks")
            boxes, no_row = roi_boxes(masks, self.top_fraction)
            keep, no_patch = patches_in_boxes(
                boxes, self.grid, self.patch_rule, masks.shape[1]
            )  # (B, N), (B,)
            fallback = no_row | no_patch
        inside = None if self.roi_masking == "pool" else keep
        tokens = clip.vision_tokens(pixels, inside, isolate=self.roi_masking == "isolated")  # (B, 1+N, D)
        attention = None
        if self.pool is None:
            pooled = clip.cls_feature(tokens)  # (B, D): the tower's own CLS feature
        else:
            patches = tokens[:, 1:]  # (B, N, D), CLS dropped
            if self.token_layernorm:
                patches = clip.final_norm(patches)
            pooled, attention = self.pool(patches, keep if self.pooling == "roi" else None)
        features = F.normalize(clip.project_image(pooled).float(), dim=-1)  # (B, E)
        return Output(features, self.head.scores(features, self.text_features), attention, boxes, fallback)

    # ------------------------------------------------------------------ head
    def logits(self, out: Output) -> torch.Tensor:
        """(B, C) class logits for prediction."""
        return self.head.logits(out.scores)

    def loss(self, out: Output, labels: torch.Tensor) -> torch.Tensor:
        """Summed (not averaged) loss, so shards of a batch add up exactly."""
        return self.head.loss(out.scores, labels, self.clip_model.logit_scale.exp().float())


def prompt_spec(cfg: Config) -> PromptSpec | None:
    """The learnt prompts of a prompt-learning method (None for the others): each class's name
    (underscores as spaces, as CoOp) or description after the context."""
    style = cfg.method_spec.prompt
    if style is None:
        return None
    by_name = cfg.prompts.class_text == "name"
    return PromptSpec(
        tuple(c.name.replace("_", " ") if by_name else c.description for c in cfg.data.classes),
        n_ctx=cfg.prompt_n_ctx,
        init=cfg.prompt_init,
        class_specific=cfg.prompts.class_specific,
        meta=style.meta,
    )


def check_prompts(cfg: Config, backbone: VisionLanguage) -> None:
    """Before a run starts: a prompt-learning method's prompts fit the backbone's tokenizer, and
    BiomedCoOp's ensemble file covers every class (each a one-line error naming what to change)."""
    spec = prompt_spec(cfg)
    if spec is not None:
        prompt_layout(spec, backbone)
    if cfg.method_spec.fit == "biomedcoop":
        cfg.prompts.ensemble_texts(cfg.class_names)


def model_from_config(cfg: Config, backbone: VisionLanguage) -> SavltModel:
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
        patch_rule=cfg.roi.patch_rule,
        token_layernorm=cfg.model.token_layernorm,
        pool_init=cfg.model.pool_init,
        roi_masking=cfg.model.roi_masking,
        adapters=cfg.peft if method.adapters else None,
        total_steps=cfg.train.total_steps,
        inference_scale=cfg.model.inference_scale,
        adapter_ratio=cfg.baselines.clip_adapter_ratio,
        prompts=prompt_spec(cfg),
    )
