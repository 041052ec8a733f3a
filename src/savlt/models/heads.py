"""Classification heads on the L2-normalised image feature f, one class per entry of ``HEADS``.

A head turns f into named score sets (``scores``), the prediction logits (``logits``) and the
summed training loss (``loss``). A method names its head in ``savlt.methods``; a new head is one
class here and one entry in ``HEADS``. What a head fitted is saved with the run: its trainable
parameters and its persistent buffers (``savlt.engine.checkpoint``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from savlt.models.prompts import PromptLearner, PromptSpec
from savlt.models.vision_language import VisionLanguage

Scores = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HeadShape:
    """What every head is built from: the classes, the feature width, the prototype weight alpha
    (alignment head), the logit scale at prediction, CLIP-Adapter's residual ratio and the
    prompts of a prompt-learning head."""

    n_classes: int
    embed: int
    alpha: float = 0.5
    inference_scale: float = 100.0
    adapter_ratio: float = 0.2
    prompts: PromptSpec | None = None


class Head(nn.Module):
    """The interface of a head (see the module's docstring)."""

    @classmethod
    def build(cls, shape: HeadShape, backbone: VisionLanguage) -> Head:
        """The head for `shape` on `backbone` (only a prompt-learning head uses the backbone)."""
        return cls(shape)

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        raise NotImplementedError

    def logits(self, scores: Scores) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, scores: Scores, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(scores), labels, reduction="sum")

    def take_shapes(self, shapes: Mapping[str, torch.Size]) -> None:
        """Resize to a saved head's tensor shapes (`shapes`: name -> shape) where the size comes
        from the few-shot draw rather than the configuration; most heads have none."""


class AlignmentHead(Head):
    """SAVLT's dual alignment: text anchors T (normalised text features of the class
    descriptions) and visual prototypes P (one learnable vector per class, orthogonal start),
    mixed by alpha. Loss (1 − α)·CE(s·f·Tᵀ) + α·CE(s·f·Pᵀ) with CLIP's logit scale s; prediction
    uses the same mixture at ``inference_scale``. α = 0 has no prototypes, α = 1 no text scores."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.alpha = shape.alpha
        self.inference_scale = shape.inference_scale
        self.prototypes = (
            nn.Parameter(nn.init.orthogonal_(torch.empty(shape.n_classes, shape.embed)))
            if shape.alpha > 0
            else None
        )  # (C, E)

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        """features (B, E) -> {"text": (B, C) cosine similarities to T, "proto": to P}."""
        out: Scores = {}
        if self.alpha < 1:
            out["text"] = features @ text().T
        if self.prototypes is not None:
            out["proto"] = features @ F.normalize(self.prototypes.float(), dim=-1).T
        return out

    def _weights(self) -> dict[str, float]:
        return {"text": 1 - self.alpha, "proto": self.alpha}

    def logits(self, scores: Scores) -> torch.Tensor:
        weights = self._weights()
        mixed = sum(weights[key] * sims for key, sims in scores.items())
        return self.inference_scale * mixed

    def loss(self, scores: Scores, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        weights = self._weights()
        total = torch.zeros((), device=labels.device)
        for key, sims in scores.items():
            total = total + weights[key] * F.cross_entropy(logit_scale * sims, labels, reduction="sum")
        return total


class LinearHead(Head):
    """A linear layer on the frozen feature: the linear probe (logistic regression), LP++, CLAP and
    SS-Text, each fitted its own way (``savlt.engine.baselines``)."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.linear = nn.Linear(shape.embed, shape.n_classes)

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        return {"linear": self.linear(features)}

    def logits(self, scores: Scores) -> torch.Tensor:
        return scores["linear"]


class TipAdapterHead(Head):
    """Tip-Adapter's cache model: logits = s·f·Tᵀ + α·exp(−β(1 − f·Kᵀ))·L, with K (N, E) the
    normalised features of the N few-shot scans (``keys``, trained by Tip-Adapter-F), L (N, C)
    their one-hot labels (``values``) and s the logit scale at prediction."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.inference_scale = shape.inference_scale
        self.keys = nn.Parameter(torch.zeros(0, shape.embed))
        self.register_buffer("values", torch.zeros(0, shape.n_classes))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("beta", torch.tensor(1.0))

    def take_shapes(self, shapes: Mapping[str, torch.Size]) -> None:
        if "keys" in shapes and "values" in shapes:
            self.set_cache(torch.zeros(shapes["keys"]), torch.zeros(shapes["values"]))

    def set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill the cache with `keys` (N, E) and one-hot `values` (N, C)."""
        device = self.values.device
        self.keys = nn.Parameter(keys.to(device, torch.float32))
        self.values = values.to(device, torch.float32)

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        affinity = features.float() @ self.keys.T  # (B, N)
        return {
            "text": features.float() @ text().T,
            "cache": torch.exp(-self.beta * (1 - affinity)) @ self.values,
        }

    def logits(self, scores: Scores) -> torch.Tensor:
        return self.inference_scale * scores["text"] + self.alpha * scores["cache"]


class ClipAdapterHead(Head):
    """CLIP-Adapter: a bottleneck MLP A (E → E/4 → E, ReLU after each layer, no biases) on the
    image feature, mixed back residually, f' = r·A(f) + (1 − r)·f with r = ``adapter_ratio``, then
    s·normalise(f')·Tᵀ."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.inference_scale = shape.inference_scale
        self.ratio = shape.adapter_ratio
        hidden = max(1, shape.embed // 4)
        self.adapter = nn.Sequential(
            nn.Linear(shape.embed, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, shape.embed, bias=False),
            nn.ReLU(),
        )

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        features = features.float()
        mixed = self.ratio * self.adapter(features) + (1 - self.ratio) * features
        return {"text": F.normalize(mixed, dim=-1) @ text().T}

    def logits(self, scores: Scores) -> torch.Tensor:
        return self.inference_scale * scores["text"]


class PromptHead(Head):
    """Prompt learning (CoOp, KgCoOp, CoCoOp, BiomedCoOp): logits s·f·Gᵀ with G the normalised
    text features of the learnt prompts (``savlt.models.prompts``), per image with CoCoOp's
    meta-net. G is recomputed at every training step and once per evaluation otherwise."""

    def __init__(self, shape: HeadShape, learner: PromptLearner) -> None:
        super().__init__()
        self.inference_scale = shape.inference_scale
        self.prompts = learner
        self._eval_text: torch.Tensor | None = None
        self._eval_state: tuple[int, torch.device] | None = None

    @classmethod
    def build(cls, shape: HeadShape, backbone: VisionLanguage) -> Head:
        if shape.prompts is None:
            raise ValueError("a prompt-learning head needs its prompts (HeadShape.prompts)")
        return cls(shape, PromptLearner(shape.prompts, backbone))

    def train(self, mode: bool = True) -> PromptHead:
        self._eval_text = None  # the context may change: recompute after training
        return super().train(mode)

    def class_features(self) -> torch.Tensor:
        """(C, E) normalised features of the learnt class prompts (outside training computed once
        per state of the context: any in-place change, e.g. a loaded checkpoint, or a move to
        another device computes them again)."""
        if self.training:
            return self.prompts.class_features()
        ctx = self.prompts.ctx
        state = (ctx._version, ctx.device)
        if self._eval_text is None or self._eval_state != state:
            with torch.no_grad():
                self._eval_text = self.prompts.class_features()
            self._eval_state = state
        return self._eval_text

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        features = features.float()
        if self.prompts.meta_net is None:
            return {"text": features @ self.class_features().T}
        per_image = self.prompts.image_features(features)  # (B, C, E)
        return {"text": torch.einsum("be,bce->bc", features, per_image)}

    def logits(self, scores: Scores) -> torch.Tensor:
        return self.inference_scale * scores["text"]


HEADS: dict[str, type[Head]] = {
    "alignment": AlignmentHead,
    "linear": LinearHead,
    "tip_adapter": TipAdapterHead,
    "clip_adapter": ClipAdapterHead,
    "prompt": PromptHead,
}
