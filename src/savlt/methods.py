"""The methods SAVLT can run, as one table: ``METHODS = {name: Method}``.

A method is the SAVLT model with parts switched on or off, plus how it is fitted. Everything that
differs between methods is a field here; the model, the training loop and the configuration read
these fields and never test a method's name. Adding a baseline is one entry in ``METHODS`` (and,
when it needs a new head or a new way of fitting, one function registered under that name: see
``savlt.models.savlt`` for heads and ``savlt.engine.fit`` for fits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Pooling = Literal["roi", "attn", "cls"]
RoiMasking = Literal["pool", "every_block", "isolated"]
Head = Literal["alignment", "linear", "tip_adapter", "clip_adapter", "prompt"]
Fit = Literal[
    "gradient",
    "closed_form",
    "none",
    "tip_adapter",
    "tip_adapter_f",
    "clip_adapter",
    "lp_pp",
    "clap",
    "ss_text",
    "coop",
    "kgcoop",
    "cocoop",
    "biomedcoop",
]
Family = Literal["savlt", "zero-shot", "adapter fine-tuning", "feature-based", "prompt learning"]


@dataclass(frozen=True)
class PromptStyle:
    """A prompt-learning method's published context: `n_ctx` vectors when started at random,
    started from the phrase `init` ("" = at random; with a phrase the context is its tokens), and
    CoCoOp's image-conditioned meta-net."""

    n_ctx: int
    init: str
    meta: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for the documentation and --help
    # What the method fixes; None leaves the configuration's value (model.pooling, model.alpha,
    # model.roi_masking) free.
    pooling: Pooling | None = None
    alpha: float | None = None
    roi_masking: RoiMasking | None = None
    adapters: bool = True  # peft adapters (and the visual projection) are trained
    head: Head = "alignment"  # alignment: text anchors and prototypes mixed by alpha; linear: a linear layer
    fit: Fit = "gradient"  # gradient: AdamW on the loss; closed_form: fitted on features; none: no training
    # the others: one feature-based baseline each (savlt.engine.baselines), on cached frozen features
    family: Family = "savlt"
    trains: str = "LoRA adapters, visual projection, pooling, prototypes"  # for the methods table
    source: str = ""  # the published reference: paper and code
    prompt: PromptStyle | None = None  # prompt learning: the learnt context of the text prompts

    def fixed(self) -> dict[str, Any]:
        """The configuration values this method sets (dotted keys)."""
        values = {
            "model.pooling": self.pooling,
            "model.alpha": self.alpha,
            "model.roi_masking": self.roi_masking,
        }
        return {key: value for key, value in values.items() if value is not None}


# What every feature-based method fixes: the frozen backbone's own CLS feature, no adapters.
_FROZEN: dict[str, Any] = {
    "pooling": "cls",
    "alpha": 0.0,
    "roi_masking": "pool",
    "adapters": False,
    "family": "feature-based",
}

# What every prompt-learning method fixes: the frozen image side of the feature-based methods and
# the prompt head; only the context (and CoCoOp's meta-net) is trained.
_PROMPTS: dict[str, Any] = {
    **_FROZEN,
    "family": "prompt learning",
    "head": "prompt",
}
_CONTEXT = "context vectors (n_ctx × W, the text tower's width; C × n_ctx × W with prompts.class_specific)"

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("savlt", "LoRA + ROI attention pooling + text anchors and prototypes (α = 0.5)"),
        Method(
            "clip_lora",
            "LoRA, CLS pooling, text alignment only (CLIP-LoRA)",
            pooling="cls",
            alpha=0.0,
            family="adapter fine-tuning",
            trains="LoRA adapters, visual projection",
            source="Zanella & Ben Ayed, CVPR-W 2024 (github.com/MaxZanella/CLIP-LoRA)",
        ),
        Method(
            "zero_shot",
            "CLIP with the class descriptions as anchors, no training",
            pooling="cls",
            alpha=0.0,
            adapters=False,
            fit="none",
            family="zero-shot",
            trains="nothing",
            source="Radford et al., ICML 2021",
        ),
        Method(
            "linear_probe",
            "logistic regression on frozen CLIP image features (C chosen on the validation draw)",
            pooling="cls",
            adapters=False,
            head="linear",
            fit="closed_form",
            family="feature-based",
            trains="a linear layer (L2 logistic regression)",
            source="Radford et al., ICML 2021",
        ),
        Method(
            "tip_adapter",
            "Tip-Adapter: a training-free cache of the few-shot features beside the text logits",
            **_FROZEN,
            head="tip_adapter",
            fit="tip_adapter",
            trains="nothing (α, β searched on validation)",
            source="Zhang et al., ECCV 2022 (github.com/gaopengcuhk/Tip-Adapter)",
        ),
        Method(
            "tip_adapter_f",
            "Tip-Adapter-F: Tip-Adapter with its cache keys fine-tuned",
            **_FROZEN,
            head="tip_adapter",
            fit="tip_adapter_f",
            trains="the cache keys",
            source="Zhang et al., ECCV 2022 (github.com/gaopengcuhk/Tip-Adapter)",
        ),
        Method(
            "clip_adapter",
            "CLIP-Adapter: a residual bottleneck MLP on the image feature",
            **_FROZEN,
            head="clip_adapter",
            fit="clip_adapter",
            trains="a bottleneck MLP (E → E/4 → E)",
            source="Gao et al., IJCV 2024 (github.com/gaopengcuhk/CLIP-Adapter)",
        ),
        Method(
            "lp_pp",
            "LP++: visual prototypes plus class-wise multiples of the text embeddings, block MM steps",
            **_FROZEN,
            head="linear",
            fit="lp_pp",
            trains="class weights and bias, text multipliers",
            source="Huang et al., CVPR 2024 (github.com/FereshteShakeri/FewShot-CLIP-Strong-Baseline)",
        ),
        Method(
            "clap",
            "CLAP: a linear probe started at the text weights, class-wise penalty toward them",
            **_FROZEN,
            head="linear",
            fit="clap",
            trains="class prototypes",
            source="Silva-Rodríguez et al., CVPR 2024 (github.com/jusiro/CLAP)",
        ),
        Method(
            "ss_text",
            "SS-Text: training-free blend of the class feature sums with the text prototypes",
            **_FROZEN,
            head="linear",
            fit="ss_text",
            trains="nothing (closed form)",
            source="Silva-Rodríguez et al., MICCAI 2025 (github.com/jusiro/SS-Text)",
        ),
        Method(
            "coop",
            "CoOp: 16 learnt context vectors before each class name in the text prompt",
            **_PROMPTS,
            fit="coop",
            trains=_CONTEXT,
            prompt=PromptStyle(16, ""),
            source="Zhou et al., IJCV 2022 (github.com/KaiyangZhou/CoOp)",
        ),
        Method(
            "kgcoop",
            "KgCoOp: CoOp kept close to the hand-written prompt 'a photo of a <class>.' (λ = 8)",
            **_PROMPTS,
            fit="kgcoop",
            trains=_CONTEXT,
            prompt=PromptStyle(4, "a photo of a"),
            source="Yao et al., CVPR 2023 (github.com/htyao89/KgCoOp)",
        ),
        Method(
            "cocoop",
            "CoCoOp: CoOp's context plus a bias from each image's feature (a small meta-net)",
            **_PROMPTS,
            fit="cocoop",
            prompt=PromptStyle(4, "a photo of a", meta=True),
            trains="context vectors (n_ctx × W) and a meta-net (E → E/16 → W)",
            source="Zhou et al., CVPR 2022 (github.com/KaiyangZhou/CoOp)",
        ),
        Method(
            "biomedcoop",
            "BiomedCoOp: CoOp guided by a prompt ensemble (mean-feature MSE, KL to its zero-shot logits)",
            **_PROMPTS,
            fit="biomedcoop",
            trains=_CONTEXT,
            prompt=PromptStyle(4, "a photo of a"),
            source="Koleilat et al., CVPR 2025 (github.com/HealthX-Lab/BiomedCoOp)",
        ),
        Method(
            "savlt_no_roi",
            "SAVLT with attention pooling over all patches (no structure prior)",
            pooling="attn",
        ),
        Method(
            "savlt_every_block",
            "SAVLT with the published in-backbone ROI masking (non-ROI patch tokens zeroed after every block)",
            pooling="roi",
            roi_masking="every_block",
        ),
        Method("savlt_no_proto", "SAVLT with text anchors only (α = 0)", alpha=0.0),
        Method("savlt_proto_only", "SAVLT with prototypes only (α = 1)", alpha=1.0),
    )
}
