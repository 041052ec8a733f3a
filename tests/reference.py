"""Slow reference implementations, written as plainly as the formulas, to check the fast ones.

Used by the tests and by ``benchmarks/roi_pooling.py``; never by the package.
"""

from __future__ import annotations

import math

import torch

from savlt.models.pooling import RoiAttentionPool


def roi_pool_reference(pool: RoiAttentionPool, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ROI attention pooling as loops over samples, heads and patches (the published code's way);
    orders of magnitude slower than ``RoiAttentionPool.forward``."""
    batch, n, dim = tokens.shape
    width = dim // pool.heads
    outputs = []
    for b in range(batch):
        inside = [i for i in range(n) if keep[b, i]]
        heads = []
        for h in range(pool.heads):
            part = slice(h * width, (h + 1) * width)
            scores = torch.stack([tokens[b, i, part] @ pool.queries[h] / math.sqrt(width) for i in inside])
            weights = torch.softmax(scores, dim=0)
            heads.append(sum(w * tokens[b, i, part] for w, i in zip(weights, inside, strict=True)))
        outputs.append(pool.proj(torch.cat(heads)))
    return torch.stack(outputs)
