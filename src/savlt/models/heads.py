"""Classification heads on the L2-normalised image feature f, one class per entry of ``HEADS``.

A head turns f into named score sets (``scores``), the prediction logits (``logits``) and the
summed training loss (``loss``). A method names its head in ``savlt.methods``; a new head is one
class here and one entry in ``HEADS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Scores = dict[str, torch.Tensor]


class AlignmentHead(nn.Module):
    """SAVLT's dual alignment: text anchors T (normalised text features of the class
    descriptions) and visual prototypes P (one learnable vector per class, orthogonal start),
    mixed by alpha. Loss (1 − α)·CE(s·f·Tᵀ) + α·CE(s·f·Pᵀ) with CLIP's logit scale s; prediction
    uses the same mixture at ``inference_scale``. α = 0 has no prototypes, α = 1 no text scores."""

    def __init__(self, n_classes: int, embed: int, alpha: float, inference_scale: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.inference_scale = inference_scale
        self.prototypes = (
            nn.Parameter(nn.init.orthogonal_(torch.empty(n_classes, embed))) if alpha > 0 else None
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


class LinearHead(nn.Module):
    """A linear layer on the frozen feature (the linear probe); fitted in closed form."""

    def __init__(self, n_classes: int, embed: int, alpha: float, inference_scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(embed, n_classes)

    def scores(self, features: torch.Tensor, text: Callable[[], torch.Tensor]) -> Scores:
        return {"linear": self.linear(features)}

    def logits(self, scores: Scores) -> torch.Tensor:
        return scores["linear"]

    def loss(self, scores: Scores, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores["linear"], labels, reduction="sum")


HEADS: dict[str, type[AlignmentHead] | type[LinearHead]] = {"alignment": AlignmentHead, "linear": LinearHead}
