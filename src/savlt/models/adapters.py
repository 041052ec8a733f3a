"""Parameter-efficient tuning of the backbone with ``peft``.

Adapters go on the attention projections (q, k, v and out; which modules those are is the
backbone's ``adapter_targets``) of the last ``gradual_step`` vision layers, and optionally of
every text layer (with their own rank and alpha). Everything else in the backbone stays frozen
except the visual projection.

``peft.variant="published"`` builds the published code's set-ups instead: AdaLoRA with init_r 32,
total_step 1000 and peft's defaults otherwise (the training loop then neither re-allocates ranks
nor adds the orthogonality term, as published); LoHa/LoKr with module_dropout 0.1 and no rank
dropout; text adapters with the vision rank and alpha, and the text projection trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

from savlt.config import ConfigError, PeftConfig
from savlt.models.vision_language import VisionLanguage


def target_patterns(backbone: VisionLanguage, gradual_step: int | None, text: bool) -> tuple[str, str | None]:
    """Regexes (full module names) for the adapted vision layers and, if wanted, the text layers."""
    layers = backbone.vision_layers
    last = layers if gradual_step is None else min(gradual_step, layers)
    return backbone.adapter_targets(layers - last, text)


def adapter_config(cfg: PeftConfig, backbone: VisionLanguage, total_steps: int):
    """The peft config for the chosen adapter type (LoRA, DoRA, AdaLoRA, LoHa, LoKr)."""
    vision, text = target_patterns(backbone, cfg.gradual_step, cfg.text)
    targets = rf".*({vision}|{text})$" if text else rf".*{vision}$"
    published = cfg.variant == "published"
    ranks = {text: cfg.text_r} if text and not published else {}
    alphas = {text: cfg.text_alpha} if text and not published else {}
    if published and cfg.type == "adalora":
        return AdaLoraConfig(init_r=32, target_r=cfg.r, total_step=1000, target_modules=targets)
    if published and cfg.type in ("loha", "lokr"):
        lycoris = LoHaConfig if cfg.type == "loha" else LoKrConfig
        return lycoris(r=cfg.r, alpha=cfg.alpha, module_dropout=0.1, target_modules=targets)
    if cfg.type in ("lora", "dora"):
        return LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            rank_pattern=ranks,
            alpha_pattern=alphas,
            use_dora=cfg.type == "dora",
        )
    if cfg.type == "adalora":
        if text:
            raise ConfigError("peft.type=adalora does not support text adapters (peft.text=true): use lora")
        # AdaLoRA starts at 1.5x the rank and prunes to peft.r between 10 % and 70 % of training.
        return AdaLoraConfig(
            init_r=max(cfg.r + 1, round(cfg.r * 1.5)),
            target_r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            total_step=total_steps,
            tinit=int(0.1 * total_steps),
            tfinal=int(0.3 * total_steps),
            deltaT=max(1, total_steps // 20),
        )
    lycoris = LoHaConfig if cfg.type == "loha" else LoKrConfig
    return lycoris(
        r=cfg.r,
        alpha=cfg.alpha,
        rank_dropout=cfg.dropout,
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )


def add_adapters(backbone: VisionLanguage, cfg: PeftConfig, total_steps: int) -> PeftModel:
    """Wrap `backbone` with adapters; only the adapters and the visual projection are trainable."""
    num_layers = backbone.vision_layers
    if cfg.gradual_step is not None and cfg.gradual_step > num_layers:
        raise ConfigError(
            f"peft.gradual_step={cfg.gradual_step} exceeds the backbone's {num_layers} vision layers"
        )
    if cfg.type == "adalora" and cfg.variant == "savlt" and total_steps < 10:
        raise ConfigError(f"peft.type=adalora needs at least 10 training steps (this run has {total_steps})")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            model = get_peft_model(backbone, adapter_config(cfg, backbone, total_steps))
        except (ValueError, TypeError) as exc:  # e.g. an adapter type peft cannot put on these layers
            raise ConfigError(
                f"peft.type={cfg.type} cannot be attached to backbone {backbone.source!r} ({exc}); "
                "use peft.type=lora"
            ) from None
    for param in backbone.projections(text=cfg.text and cfg.variant == "published"):
        param.requires_grad_(True)
    return model


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def adalora_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable AdaLoRA factors, P (``lora_A``, r × in) and Q (``lora_B``, out × r), by name."""
    factors = [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad and ("lora_A" in name or "lora_B" in name)
    ]
    if not factors:
        raise ConfigError("the model has no AdaLoRA factors (lora_A / lora_B) to regularise")
    return factors


def adalora_orthogonality(factors: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty: the mean over its factors of ‖PPᵀ − I‖_F and ‖QᵀQ − I‖_F.
    peft adds it only to a model output's own ``loss``; SAVLT computes its loss itself, so the
    training loop adds this term (× ``orth_reg_weight``)."""
    terms = []
    for name, param in factors:
        gram = param @ param.T if "lora_A" in name else param.T @ param  # (r, r)
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()


@dataclass
class TrainingHooks:
    """What an adapter family adds to a training step, so the step loop knows no adapter type: a
    term added to every micro-batch's loss, and an update after each optimiser step (given the
    step, while the gradients are still there)."""

    penalty: Callable[[], torch.Tensor] | None = None
    after_update: Callable[[int], None] | None = None


def training_hooks(clip: nn.Module, peft: PeftConfig, grad_accum: int) -> TrainingHooks:
    """AdaLoRA (``peft.variant=savlt``) adds its orthogonality penalty (× ``orth_reg_weight``,
    spread over the accumulated micro-batches) and its rank re-allocation; the published code uses
    neither, and the other adapters add nothing."""
    if not (isinstance(clip, PeftModel) and peft.type == "adalora" and peft.variant == "savlt"):
        return TrainingHooks()
    adalora = clip.base_model
    weight = adalora.peft_config["default"].orth_reg_weight / grad_accum
    factors = adalora_factors(adalora) if weight else []
    return TrainingHooks(
        penalty=(lambda: weight * adalora_orthogonality(factors)) if weight else None,
        after_update=adalora.update_and_allocate,
    )
