"""The prompt-learning baselines: CoOp, KgCoOp, CoCoOp and BiomedCoOp, registered in
``savlt.engine.fit.FITS``.

Each learns the context of the class prompts (``savlt.models.prompts``) while both encoders stay
frozen, so the image side is the cached frozen CLS feature f of the feature-based baselines
(``savlt.engine.features``): training view e mod V + 1 in epoch e (``baselines.Epochs``), the
text tower run on the C class prompts at every step (B·C image-conditioned prompts for CoCoOp).
Logits s·f·Gᵀ with G the normalised features of the learnt prompts and s the logit scale at
prediction. Published schedules (README, "Prompt learning"), all SGD with momentum 0.9 and weight
decay 5e-4, one warm-up epoch at 1e-5, then cosine per epoch, the last epoch kept:

- coop: lr 0.002, batch 32, 50 epochs at K = 1, 100 at K = 2–4, 200 from K = 8.
- kgcoop: lr 0.002, batch 128, 100 epochs; loss CE + λ·(1 − mean_c cos(g_c, t_c)) with t_c the
  frozen features of the hand-written prompt "a photo of a <class text>.", λ =
  ``prompts.kgcoop_weight``.
- cocoop: lr 0.002, batch ``prompts.cocoop_batch`` (published 1), 10 epochs.
- biomedcoop: lr 0.0025, batch 4, 100 epochs; loss CE + λ₁·MSE(G, normalise(mean_i P_·,i)) +
  λ₂·KL(softmax(z) ‖ softmax(s·f·Gᵀ)) / (B·C), with P (C, M, E) the normalised features of the
  prompt ensemble's M descriptions per class and z the zero-shot logits of the descriptions that are
  not outliers (``kept_prompts``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from savlt.engine.baselines import Epochs, support, train_head, warm_cosine
from savlt.models.heads import PromptHead
from savlt.models.savlt import prompt_spec

KGCOOP_TEMPLATE = "a photo of a {}."  # KgCoOp's hand-written prompt (its CUSTOM_TEMPLATES for most datasets)
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

Extra = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def coop_epochs(shots: int) -> int:
    """CoOp's epochs for K shots per class: 50 at K = 1, 100 at K = 2–4, 200 beyond."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def _head(job) -> PromptHead:
    head = job.model.head
    if not isinstance(head, PromptHead):
        raise TypeError(f"method {job.cfg.method} needs the prompt head")
    return head


def _train_prompts(job, lr: float, epochs: int, batch: int, extra: Extra | None = None) -> None:
    """Train the context (and meta-net) on the draw's cached features with CE plus `extra`(f, G,
    logits) on each batch."""
    data = support(job)
    head = _head(job)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = Epochs(data, job, epochs=epochs, batch=batch)

    def loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if head.prompts.meta_net is not None:
            return F.cross_entropy(job.model.logits_of(features), labels)
        learnt = head.class_features()
        logits = data.scale * features @ learnt.T
        total = F.cross_entropy(logits, labels)
        return total if extra is None else total + extra(features, learnt, logits)

    train_head(job, optimizer, schedule, loss, warm_cosine(lr, schedule))


def fit_coop(job) -> None:
    _train_prompts(job, 0.002, coop_epochs(job.cfg.train.shots), 32)


def fit_cocoop(job) -> None:
    _train_prompts(job, 0.002, 10, job.cfg.prompts.cocoop_batch)


# ------------------------------------------------------------------ KgCoOp


def kgcoop_penalty(learnt: torch.Tensor, hand: torch.Tensor) -> torch.Tensor:
    """KgCoOp's term as published: 1 − the mean over classes of cos(g_c, t_c) (for unit vectors
    ½·mean_c ‖g_c − t_c‖²)."""
    return 1 - F.cosine_similarity(learnt, hand, dim=-1, eps=1e-7).mean()


def fit_kgcoop(job) -> None:
    weight = job.cfg.prompts.kgcoop_weight
    texts = [KGCOOP_TEMPLATE.format(text) for text in prompt_spec(job.cfg).texts]
    with torch.no_grad():
        hand = job.model.encode_texts(texts)

    def extra(features: torch.Tensor, learnt: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return weight * kgcoop_penalty(learnt, hand)

    _train_prompts(job, 0.002, 100, 128, extra)


# ------------------------------------------------------------------ BiomedCoOp


def prompt_scores(features: torch.Tensor, ensemble: torch.Tensor, scale: float) -> torch.Tensor:
    """(M,) BiomedCoOp's score of each description index i: the batch mean of the largest zero-shot
    logit s·f·P_c,i over the classes c. features (B, E), ensemble (C, M, E)."""
    logits = scale * torch.einsum("be,cme->bmc", features, ensemble)
    return logits.max(-1).values.mean(0)


def kept_prompts(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """(M,) bool: the descriptions BiomedCoOp keeps. As published, the median/MAD z-scores
    z = (s − median) / MAD are standardised again, (z − mean z) / std z, and those within ±τ are
    kept (an affine map of s, so this equals the plain z-score of s); when MAD or that standard
    deviation is 0 (the published code then divides by zero) every description is kept."""
    median = scores.median()
    mad = (scores - median).abs().median()
    if float(mad) == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    z = (scores - median) / mad
    spread = z.std()
    if float(spread) == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return ((z - z.mean()) / spread).abs() <= tau


def biomedcoop_terms(
    features: torch.Tensor,
    learnt: torch.Tensor,
    logits: torch.Tensor,
    ensemble: torch.Tensor,
    scale: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BiomedCoOp's two extra terms on a batch, unweighted: the MSE of the learnt class features G
    (C, E) to the normalised mean of every description's features, and KL(zero-shot ‖ learnt) of
    the batch's softmax outputs, summed and divided by B·C."""
    target = F.normalize(ensemble.mean(1), dim=-1)
    sccm = F.mse_loss(learnt.to(target.dtype), target)
    # the filter and the zero-shot logits in full precision: under bf16 autocast the scores would
    # be rounded to steps of 0.125 and tie
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        full = features.to(ensemble.dtype)
        keep = kept_prompts(prompt_scores(full, ensemble, scale), tau)
        selected = F.normalize(ensemble[:, keep].mean(1), dim=-1)
        zero_shot = scale * full @ selected.T
    kdsp = (
        F.kl_div(
            F.log_softmax(logits.to(zero_shot.dtype), -1),
            F.log_softmax(zero_shot, -1),
            reduction="sum",
            log_target=True,
        )
        / logits.numel()
    )
    return sccm, kdsp


def fit_biomedcoop(job) -> None:
    cfg = job.cfg
    texts = cfg.prompts.ensemble_texts(cfg.class_names)
    flat = [text for name in cfg.class_names for text in texts[name]]
    with torch.no_grad():
        ensemble = job.model.encode_texts(flat).view(len(texts), -1, job.model.clip_model.embed_dim)
    scale, p = cfg.model.inference_scale, cfg.prompts

    def extra(features: torch.Tensor, learnt: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sccm, kdsp = biomedcoop_terms(features, learnt, logits, ensemble, scale, p.tau)
        return p.sccm_weight * sccm + p.kdsp_weight * kdsp

    _train_prompts(job, 0.0025, 100, 4, extra)
