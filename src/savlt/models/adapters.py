"""Parameter-efficient tuning of CLIP with ``peft``.

Adapters go on the q, k, v and out projections of the self-attention of the last
``gradual_step`` vision layers, and optionally of every text layer (with their own rank and
alpha). Everything else in the backbone stays frozen except the visual projection.

``peft.variant="published"`` builds the published code's set-ups instead: AdaLoRA with init_r 32,
total_step 1000 and peft's defaults otherwise (the training loop then neither re-allocates ranks
nor adds the orthogonality term, as published); LoHa/LoKr with module_dropout 0.1 and no rank
dropout; text adapters with the vision rank and alpha, and the text projection trained.
"""

from __future__ import annotations

import warnings

import torch
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import CLIPModel

from savlt.config import ConfigError, PeftConfig

_PROJECTIONS = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"


def target_patterns(num_vision_layers: int, gradual_step: int | None, text: bool) -> tuple[str, str | None]:
    """Regexes (full module names) for the adapted vision layers and, if wanted, the text layers."""
    last = num_vision_layers if gradual_step is None else min(gradual_step, num_vision_layers)
    layers = "|".join(str(i) for i in range(num_vision_layers - last, num_vision_layers))
    vision = rf"vision_model\.encoder\.layers\.({layers})\.{_PROJECTIONS}"
    return vision, (rf"text_model\.encoder\.layers\.\d+\.{_PROJECTIONS}" if text else None)


def adapter_config(cfg: PeftConfig, num_vision_layers: int, total_steps: int):
    """The peft config for the chosen adapter type (LoRA, DoRA, AdaLoRA, LoHa, LoKr)."""
    vision, text = target_patterns(num_vision_layers, cfg.gradual_step, cfg.text)
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


def add_adapters(clip: CLIPModel, cfg: PeftConfig, total_steps: int) -> PeftModel:
    """Wrap `clip` with adapters; only the adapters and the visual projection are trainable."""
    num_layers = int(clip.config.vision_config.num_hidden_layers)
    if cfg.gradual_step is not None and cfg.gradual_step > num_layers:
        raise ConfigError(
            f"peft.gradual_step={cfg.gradual_step} exceeds the backbone's {num_layers} vision layers"
        )
    if cfg.type == "adalora" and cfg.variant == "savlt" and total_steps < 10:
        raise ConfigError(f"peft.type=adalora needs at least 10 training steps (this run has {total_steps})")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(clip, adapter_config(cfg, num_layers, total_steps))
    clip.visual_projection.weight.requires_grad_(True)
    if cfg.text and cfg.variant == "published":
        clip.text_projection.weight.requires_grad_(True)
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
