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
Head = Literal["alignment", "linear"]
Fit = Literal["gradient", "closed_form", "none"]


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

    def fixed(self) -> dict[str, Any]:
        """The configuration values this method sets (dotted keys)."""
        values = {
            "model.pooling": self.pooling,
            "model.alpha": self.alpha,
            "model.roi_masking": self.roi_masking,
        }
        return {key: value for key, value in values.items() if value is not None}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("savlt", "LoRA + ROI attention pooling + text anchors and prototypes (α = 0.5)"),
        Method("clip_lora", "LoRA, CLS pooling, text alignment only (CLIP-LoRA)", pooling="cls", alpha=0.0),
        Method(
            "zero_shot",
            "CLIP with the class descriptions as anchors, no training",
            pooling="cls",
            alpha=0.0,
            adapters=False,
            fit="none",
        ),
        Method(
            "linear_probe",
            "logistic regression on frozen CLIP image features (C chosen on the validation draw)",
            pooling="cls",
            adapters=False,
            head="linear",
            fit="closed_form",
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
