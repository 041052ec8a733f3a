"""Backbone loading, adapters, text-feature cache and the SAVLT forward pass (tiny CLIP)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from savlt.config import ConfigError
from savlt.models.adapters import adalora_factors, adalora_orthogonality, parameter_counts
from savlt.models.backbone import build_random, load_backbone
from savlt.models.backbone_files import BackboneError
from savlt.normalization import NORMALIZATION


def batch(size: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    pixels = torch.randn(size, 3, 224, 224)
    masks = torch.zeros(size, 224, 224, dtype=torch.uint8)
    for i in range(size):
        masks[i, 40 + 20 * i :] = 1
    return pixels, masks, torch.arange(size) % 5


def test_tiny_backbone_is_the_same_every_time_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first, second = build_random(), build_random()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.fingerprint() == second.fingerprint()
    assert first.patch_grid == 14 and first.image_size == 224


def test_a_saved_backbone_folder_loads_back(tmp_path: Path) -> None:
    tiny = build_random()
    tiny.save_pretrained(tmp_path / "clip")
    loaded = load_backbone(str(tmp_path / "clip"))
    assert loaded.fingerprint() == tiny.fingerprint()
    assert loaded.normalization == tiny.normalization == NORMALIZATION["clip"]
    tiny.save_pretrained(tmp_path / "imagenet", NORMALIZATION["imagenet"])  # trained with ImageNet's
    assert load_backbone(str(tmp_path / "imagenet")).normalization == NORMALIZATION["imagenet"]
    text = ["Medical OCT image with oval dark areas"]
    assert torch.equal(loaded.tokenize(text)[0], tiny.tokenize(text)[0])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(
            loaded.cls_feature(loaded.vision_tokens(pixels)), tiny.cls_feature(tiny.vision_tokens(pixels))
        )


def test_missing_weights_say_how_to_provide_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneError) as info:
        load_backbone("openai/clip-vit-base-patch16")
    message = str(info.value)
    assert "hf download openai/clip-vit-base-patch16" in message
    assert "--model DIR" in message and str(tmp_path / "empty-cache") in message
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(BackboneError, match="holds neither config.json"):
        load_backbone(str(tmp_path / "not-a-model"))


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "loha", "lokr"])
def test_only_adapters_projection_pooling_and_prototypes_train(kind: str) -> None:
    model = tiny_model(f"peft.type={kind}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    allowed = re.compile(r"(lora_|hada_|lokr_|ranknum|visual_projection|^pool\.|^head\.prototypes$)")
    assert all(allowed.search(n) for n in trainable), [n for n in trainable if not allowed.search(n)]
    assert any("visual_projection" in n for n in trainable) and "head.prototypes" in trainable
    adapted = {n for n in trainable if "vision_model" in n and "visual_projection" not in n}
    assert adapted, "vision adapters exist"
    assert not any("text_model" in n for n in trainable)
    n_trainable, total = parameter_counts(model)
    assert 0 < n_trainable < total / 5


def test_adalora_orthogonality_penalty_is_the_mean_frobenius_distance_and_zero_when_orthonormal() -> None:
    model = tiny_model("peft.type=adalora")
    factors = [
        (n, p.detach())
        for n, p in model.named_parameters()
        if p.requires_grad and ("lora_A" in n or "lora_B" in n)
    ]
    assert factors
    expected = sum(
        float(
            torch.linalg.norm(
                (p @ p.T if "lora_A" in n else p.T @ p)
                - torch.eye(p.shape[0] if "lora_A" in n else p.shape[1])
            )
        )
        for n, p in factors
    ) / len(factors)
    penalty = adalora_orthogonality(adalora_factors(model))
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # orthonormal factors: no penalty
        for name, param in factors:
            q, _ = torch.linalg.qr(torch.randn(max(param.shape), min(param.shape)))  # orthonormal columns
            param.copy_(q.T if "lora_A" in name else q)
    assert adalora_orthogonality(adalora_factors(model)).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ConfigError, match="no AdaLoRA factors"):
        adalora_factors(torch.nn.Linear(2, 2))


def test_gradual_step_and_text_adapters_choose_the_layers_and_ranks() -> None:
    model = tiny_model("peft.gradual_step=2", "peft.text=true")
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    layers = {
        int(m.group(1)) for n in names if (m := re.search(r"vision_model\.encoder\.layers\.(\d+)\.", n))
    }
    assert layers == {2, 3}  # the last two of four vision layers
    for suffix in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert any(f"layers.3.self_attn.{suffix}" in n for n in names)
    text = [p for n, p in model.named_parameters() if "text_model" in n and "lora_A" in n]
    vision = [p for n, p in model.named_parameters() if "vision_model" in n and "lora_A" in n]
    assert text and all(p.shape[0] == 2 for p in text) and all(p.shape[0] == 8 for p in vision)
    with pytest.raises(ConfigError, match="exceeds the backbone's 4 vision layers"):
        tiny_model("peft.gradual_step=12")


def test_cached_text_features_equal_recomputed_ones() -> None:
    model = tiny_model()
    assert model.text_cache.shape == (5, 64)
    with torch.no_grad():
        assert torch.allclose(model.text_features(), model.compute_text_features(), atol=1e-6)
    assert torch.allclose(model.text_cache.norm(dim=-1), torch.ones(5))
    # With text adapters the features are recomputed while training (they carry gradients).
    tuned = tiny_model("peft.text=true").train()
    assert tuned.text_features().requires_grad


def test_forward_shapes_roi_and_loss_mixture() -> None:
    pixels, masks, labels = batch()
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(pixels, masks)
    assert out.features.shape == (4, 64) and out.attention.shape == (4, 4, 196)
    assert torch.allclose(out.boxes[:, 1], torch.tensor([40, 60, 80, 100]) / 224)
    kept = out.attention[0, 0] > 0
    assert kept.reshape(14, 14)[3:].all() and not kept.reshape(14, 14)[:3].any()  # rows >= 40/16
    logits = model.logits(out)
    assert torch.allclose(logits, 100 * (0.5 * out.scores["text"] + 0.5 * out.scores["proto"]))
    scale = model.clip_model.logit_scale.exp()
    expected = 0.5 * torch.nn.functional.cross_entropy(scale * out.scores["text"], labels, reduction="sum")
    expected += 0.5 * torch.nn.functional.cross_entropy(scale * out.scores["proto"], labels, reduction="sum")
    assert torch.allclose(model.loss(out, labels), expected)


def test_alpha_ends_and_methods_switch_parts_off() -> None:
    pixels, masks, _ = batch(2)
    text_only = tiny_model("model.alpha=0")
    assert text_only.head.prototypes is None
    proto_only = tiny_model("method=savlt_proto_only")
    with torch.no_grad():
        assert set(proto_only(pixels, masks).scores) == {"proto"}
    cls = tiny_model("method=clip_lora")
    assert cls.pool is None and not cls.uses_masks
    zero = tiny_model("method=zero_shot")
    assert parameter_counts(zero)[0] == 0
    probe = tiny_model("method=linear_probe")
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == [
        "head.linear.weight",
        "head.linear.bias",
    ]


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    pixels, masks, labels = batch()
    model = tiny_model().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(model(pixels, masks), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
