"""What SAVLT needs from a CLIP-like backbone: one small interface, two implementations.

``VisionLanguage`` is the interface the model code talks to (``savlt.models.savlt``, the
pretraining loop, checkpoints); ``savlt.models.hf_clip`` implements it for Hugging Face
``CLIPModel`` checkpoints and ``savlt.models.openclip`` for open_clip models (BiomedCLIP and
other timm-trunk ViTs). The model code never asks which one it holds.

Vision side: ``vision_tokens`` runs the ViT block by block and returns the last block's tokens
(CLS first, before the tower's final norm). Given an ROI keep-mask it zeroes the non-ROI patch
tokens after every block (the published BiomedCLIP variant; CLS kept), and with ``isolate`` also
before the first block, so that no pixel outside the ROI reaches the ROI or CLS tokens. Both are
one multiplication per block on the whole batch.

Text side: ``encode_text`` runs the tower on token ids; ``encode_embedded`` runs it on token
embeddings given by the caller (learnt prompt context in place of some of them, ``savlt.models.prompts``)
through the tower's own forward, with positions, attention masks and pooling from the ids, so the
result equals ``encode_text`` whenever the embeddings are the ids' own.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from savlt.normalization import Stats

# encode_embedded swaps a tower's token-embedding output through a hook: one call at a time, so
# threads sharing a model (Run.predict from several threads) never see each other's embeddings.
_EMBEDDED = threading.Lock()


class VisionLanguage(ABC):
    """Mixin for an ``nn.Module`` holding a CLIP-like backbone (see the module docstring).

    Attributes every implementation sets: ``source`` (what ``--model`` named), ``kind``
    ("hf" or "open_clip"), ``image_size``, ``patch_size``, ``width`` (token width D),
    ``embed_dim`` (joint embedding E), ``vision_layers``, ``normalization`` (its own mean and std)
    and ``logit_scale`` (a parameter holding log of the logit scale).
    """

    source: str
    kind: str
    image_size: int
    patch_size: int
    width: int
    embed_dim: int
    vision_layers: int
    normalization: Stats
    logit_scale: nn.Parameter

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    # ------------------------------------------------------------------ vision tower
    @abstractmethod
    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + N, D) tokens entering the first block."""

    @abstractmethod
    def vision_blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks of the vision tower, in order."""

    @abstractmethod
    def run_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """One block on (B, 1 + N, D) tokens."""

    @abstractmethod
    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The vision tower's final LayerNorm, on tokens (..., D)."""

    @abstractmethod
    def cls_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) last-block tokens -> (B, D): the tower's own pooled feature (CLS)."""

    @abstractmethod
    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, E): the vision head's projection into the joint space."""

    def vision_tokens(
        self, pixels: torch.Tensor, keep: torch.Tensor | None = None, isolate: bool = False
    ) -> torch.Tensor:
        """(B, 1 + N, D) tokens after the last block, before the final norm.

        keep (B, N) bool: the ROI patches. Given, the other patch tokens are zeroed after every
        block (CLS kept), and also before the first block when ``isolate`` is set.
        """
        tokens = self.embed_patches(pixels)
        mask = None
        if keep is not None:
            cls = torch.ones_like(keep[:, :1])
            mask = torch.cat([cls, keep], dim=1)[..., None].to(tokens.dtype)  # (B, 1 + N, 1)
            if isolate:
                tokens = tokens * mask
        for block in self.vision_blocks():
            tokens = self.run_block(block, tokens)
            if mask is not None:
                tokens = tokens * mask
        return tokens

    # ------------------------------------------------------------------ text tower
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (T, L) and attention mask (T, L) for the text tower."""

    @abstractmethod
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(T, E) projected, not normalised, text features."""

    @abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The text tower's token (word) embedding table, before positions are added."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(T, L) token ids -> (T, L, W) their token embeddings."""
        return self.token_embedding()(ids)

    def encode_embedded(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(T, E) projected text features of (T, L, W) token embeddings `embeds`, laid out as the
        tokens `ids` (T, L) with attention mask `mask`: the tower's own ``encode_text`` with its token
        embedding's output replaced by `embeds`, so each tower keeps its positions, masks and pooling."""
        table = self.token_embedding()
        with _EMBEDDED:
            handle = table.register_forward_hook(lambda module, args, out: embeds.to(out.dtype))
            try:
                return self.encode_text(ids, mask)
            finally:
                handle.remove()

    # ------------------------------------------------------------------ tuning and identity
    @abstractmethod
    def adapter_targets(self, first_layer: int, text: bool) -> tuple[str, str | None]:
        """Regexes (full module names) of the adapted attention projections: the vision blocks from
        ``first_layer`` on and, when ``text``, every text block."""

    @abstractmethod
    def projections(self, text: bool) -> list[nn.Parameter]:
        """The visual projection's parameters, and the text projection's when ``text``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash of the frozen weights, to refuse a checkpoint trained on another backbone."""
