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
from typing import Any

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


def prompt_loss(model, cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of `cfg.method` on a batch of (features, labels): CE of s·f·Gᵀ (CoCoOp: of
    each image's own prompts) plus KgCoOp's or BiomedCoOp's term; `model` holds the prompt head."""
    head = model.head
    if not isinstance(head, PromptHead):
        raise TypeError(f"method {cfg.method} needs the prompt head")
    if head.prompts.meta_net is not None:
        return lambda features, labels: F.cross_entropy(model.logits_of(features), labels)
    scale = model.inference_scale
    extra = {"kgcoop": _kgcoop_term, "biomedcoop": _biomedcoop_term}.get(cfg.method_spec.fit)
    term = extra(model, cfg) if extra is not None else None

    def loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        learnt = head.class_features()
        logits = scale * features @ learnt.T
        total = F.cross_entropy(logits, labels)
        return total if term is None else total + term(features, learnt, logits)

    return loss


# The published schedule of each method: (learning rate, epochs, batch size) for a configuration.
SCHEDULES: dict[str, Callable[[Any], tuple[float, int, int]]] = {
    "coop": lambda cfg: (0.002, coop_epochs(cfg.train.shots), 32),
    "kgcoop": lambda cfg: (0.002, 100, 128),
    "cocoop": lambda cfg: (0.002, 10, cfg.prompts.cocoop_batch),
    "biomedcoop": lambda cfg: (0.0025, 100, 4),
}


def fit_prompts(job) -> None:
    """Train the context (and meta-net) on the draw's cached features with the method's loss and
    published schedule."""
    lr, epochs, batch = SCHEDULES[job.cfg.method_spec.fit](job.cfg)
    data = support(job)
    head = job.model.head
    loss = prompt_loss(job.model, job.cfg)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = Epochs(data, job, epochs=epochs, batch=batch)
    train_head(job, optimizer, schedule, loss, warm_cosine(lr, schedule))


# ------------------------------------------------------------------ KgCoOp


def kgcoop_penalty(learnt: torch.Tensor, hand: torch.Tensor) -> torch.Tensor:
    """KgCoOp's term as published: 1 − the mean over classes of cos(g_c, t_c) (for unit vectors
    ½·mean_c ‖g_c − t_c‖²)."""
    return 1 - F.cosine_similarity(learnt, hand, dim=-1, eps=1e-7).mean()


def _kgcoop_term(model, cfg) -> Extra:
    weight = cfg.prompts.kgcoop_weight
    texts = [KGCOOP_TEMPLATE.format(text) for text in prompt_spec(cfg).texts]
    with torch.no_grad():
        hand = model.encode_texts(texts)
    return lambda features, learnt, logits: weight * kgcoop_penalty(learnt, hand)


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


def _biomedcoop_term(model, cfg) -> Extra:
    texts = cfg.prompts.ensemble_texts(cfg.class_names)
    flat = [text for name in cfg.class_names for text in texts[name]]
    with torch.no_grad():
        ensemble = model.encode_texts(flat).view(len(texts), -1, model.clip_model.embed_dim)
    scale, p = model.inference_scale, cfg.prompts

    def term(features: torch.Tensor, learnt: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sccm, kdsp = biomedcoop_terms(features, learnt, logits, ensemble, scale, p.tau)
        return p.sccm_weight * sccm + p.kdsp_weight * kdsp

    return term
