"""ROI attention pooling, batched and masked.

The width D of the patch tokens is split into H heads; head h has a learnable query q_h and
weights its ROI patches by softmax(<q_h, t_h> / sqrt(D/H)) over the patches inside the ROI. The
head outputs are concatenated and passed through a learnable D×D linear layer. Patches outside
the ROI are masked out of the softmax, so one kernel serves the whole batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RoiAttentionPool(nn.Module):
    """init="identity": N(0, 0.02) queries and an identity D×D layer, so at step 0 the pooled
    feature is a (near-uniform) mean of ROI tokens, which the pretrained visual projection already
    understands. init="reference": the published code's start, xavier-uniform queries (drawn as
    one (1, H, D/H) tensor, as published) and PyTorch's default random D×D layer with bias."""

    def __init__(self, dim: int, heads: int = 4, init: str = "identity") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.heads={heads} must divide the token width {dim}")
        self.heads = heads
        if init == "reference":
            queries = nn.init.xavier_uniform_(torch.empty(1, heads, dim // heads))[0]
        else:
            queries = torch.randn(heads, dim // heads) * 0.02
        self.queries = nn.Parameter(queries)  # (H, D/H)
        self.proj = nn.Linear(dim, dim)
        if init == "identity":
            nn.init.eye_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(
        self, tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, D), keep (B, N) bool or None (all) -> pooled (B, D), weights (B, H, N)."""
        batch, n, dim = tokens.shape
        per_head = tokens.reshape(batch, n, self.heads, dim // self.heads)  # (B, N, H, D/H)
        scores = torch.einsum("bnhd,hd->bhn", per_head, self.queries.to(tokens.dtype))
        scores = scores.float() / math.sqrt(dim // self.heads)
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)  # (B, H, N)
        pooled = torch.einsum("bhn,bnhd->bhd", weights.to(tokens.dtype), per_head).reshape(batch, dim)
        return self.proj(pooled), weights
