"""The backbone interface: Hugging Face CLIP and open_clip (BiomedCLIP-style) models, loaded
offline, adapted, and the in-backbone ROI masking. Every model here is random and built or saved
in-process; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import get_args

import pytest
import torch
from conftest import FAST
from fastapi.testclient import TestClient
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file
from transformers import BertConfig

from savlt.cli import main
from savlt.config import ConfigError, load_config
from savlt.engine.loaded import load_run
from savlt.engine.pretrain import pretrain
from savlt.engine.runfolder import absolute_setting, run_inputs
from savlt.models.backbone import (
    LOADERS,
    PRESETS,
    Kind,
    Preset,
    build_random,
    load_backbone,
    resolve,
    shipped_folder,
)
from savlt.models.backbone_files import BackboneError, hf_folder_stats
from savlt.models.openclip import BIOMEDBERT, BIOMEDCLIP, build_open_clip
from savlt.models.savlt import model_from_config
from savlt.models.vision_language import VisionLanguage
from savlt.normalization import CLIP_STATS
from savlt.serve import ServeOptions, create_app

KINDS = ["tiny", "tiny-openclip"]


# ---------------------------------------------------------------------- building test models


def write_tiny_bert(folder: Path) -> Path:
    """A BERT-style text tower's config and WordPiece vocabulary, as a Hugging Face folder."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,-()'"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64})
    )
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(folder)
    return folder


def biomedclip_like_cfg(text_tower: str) -> dict:
    """BiomedCLIP's open_clip config with a small timm trunk and a tiny BERT text tower."""
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": text_tower,
            "hf_tokenizer_name": text_tower,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 64,
        },
    }


# open_clip's own ViT and text transformer, both tiny.
NATIVE_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_open_clip_folder(folder: Path, model_cfg: dict, seed: int = 0) -> VisionLanguage:
    """An open_clip hub repository's layout: open_clip_config.json and the weights."""
    torch.manual_seed(seed)
    model = build_open_clip(model_cfg, None, "test", CLIP_STATS, None, False)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    )
    state = {k: v.contiguous() for k, v in model.clip.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return model


@pytest.fixture(scope="module")
def biomed_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VisionLanguage]:
    root = tmp_path_factory.mktemp("biomed")
    bert = write_tiny_bert(root / "tiny-bert")
    folder = root / "tiny-biomedclip"
    saved = save_open_clip_folder(folder, biomedclip_like_cfg(str(bert)))
    config = json.loads((folder / "open_clip_config.json").read_text())
    for key in ("hf_model_name", "hf_tokenizer_name"):
        config["model_cfg"]["text_cfg"][key] = "../tiny-bert"  # relative to the open_clip folder
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder, saved


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VisionLanguage]:
    folder = tmp_path_factory.mktemp("native") / "tiny-vit"
    return folder, save_open_clip_folder(folder, NATIVE_CFG)


def roi_masks(size: int = 2) -> torch.Tensor:
    masks = torch.zeros(size, 224, 224, dtype=torch.uint8)
    masks[:, 96:] = 1  # tissue from row 96: the ROI is patch rows 6..13
    return masks


# ---------------------------------------------------------------------- the interface


def test_the_hf_block_loop_is_transformers_own_forward() -> None:
    tiny = build_random("tiny")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        hf = tiny.vision_model(pixel_values=pixels)
        tokens = tiny.vision_tokens(pixels)
    assert torch.equal(tokens, hf.last_hidden_state)
    assert torch.equal(tiny.cls_feature(tokens), hf.pooler_output)


@pytest.mark.parametrize("which", ["tiny-openclip", "biomed", "native"])
def test_open_clip_features_match_open_clips_own_encoders(which: str, request) -> None:
    if which == "tiny-openclip":
        backbone = build_random(which)
    else:
        backbone = request.getfixturevalue(f"{which}_folder")[1]
    pixels = torch.randn(2, 3, 224, 224)
    ids, mask = backbone.tokenize(["Medical OCT image of normal tissue", "cervical cancer"])
    with torch.no_grad():
        image = backbone.project_image(backbone.cls_feature(backbone.vision_tokens(pixels)))
        text = backbone.encode_text(ids, mask)
        assert torch.allclose(image, backbone.clip.encode_image(pixels), atol=1e-5)
    assert image.shape == (2, backbone.embed_dim) and text.shape == (2, backbone.embed_dim)
    assert backbone.patch_grid == 14 and backbone.image_size == 224


@pytest.mark.parametrize("which", ["tiny", "tiny-openclip", "biomed", "native"])
def test_learnt_prompts_run_through_each_text_tower(which: str, request) -> None:
    """The text tower on given token embeddings equals the tower on the ids (CLIP's causal mask and
    EOT pooling, BERT's CLS pooling, open_clip's own tower); a context started from a phrase gives
    the frozen encoder's features of "<phrase> <class>." (so the logits are zero-shot's with that
    prompt); only the context receives a gradient."""
    from savlt.models.prompts import PromptLearner, PromptSpec

    if which in ("tiny", "tiny-openclip"):
        backbone = build_random(which)
    else:
        backbone = request.getfixturevalue(f"{which}_folder")[1]
    texts = ("mild inflammation", "cyst", "cancer")
    ids, mask = backbone.tokenize([f"a photo of a {t}." for t in texts])
    with torch.no_grad():
        expected = backbone.encode_text(ids, mask)
        assert torch.equal(backbone.encode_embedded(backbone.embed_tokens(ids), ids, mask), expected)
    backbone.requires_grad_(False)
    learner = PromptLearner(PromptSpec(texts, init="a photo of a"), backbone)
    features = learner.class_features()
    torch.testing.assert_close(features, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)
    features.sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    assert [n for n, p in learner.named_parameters()] == ["ctx"]
    assert learner.ctx.shape == (learner.n_ctx, backbone.token_embedding().embedding_dim)


@pytest.mark.parametrize("kind", KINDS)
def test_features_and_logits_have_the_expected_shapes(kind: str) -> None:
    cfg = load_config(overrides=[f"model.backbone={kind}", "train.max_steps=20"])
    torch.manual_seed(0)
    model = model_from_config(cfg, build_random(kind))
    out = model(torch.randn(3, 3, 224, 224), roi_masks(3))
    assert out.features.shape == (3, model.clip_model.embed_dim)
    assert model.logits(out).shape == (3, 5) and out.attention.shape == (3, 4, 196)
    loss = model.loss(out, torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_adapters_go_on_the_timm_trunks_attention_and_the_bert_text_tower() -> None:
    model = model_from_config(
        load_config(overrides=["model.backbone=tiny-openclip", "peft.gradual_step=2", "peft.text=true"]),
        build_random("tiny-openclip"),
    )
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    prefix = "clip.base_model.model.clip."
    vision = {f"{prefix}visual.trunk.blocks.{i}.attn.{m}" for i in (2, 3) for m in ("qkv", "proj")}
    text = {
        f"{prefix}text.transformer.encoder.layer.{i}.attention.{m}"
        for i in (0, 1)
        for m in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert adapted == vision | text
    rest = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert rest == {
        "clip.base_model.model.clip.visual.head.proj.weight",
        "pool.queries",
        "pool.proj.weight",
        "pool.proj.bias",
        "head.prototypes",
    }


def test_open_clips_own_towers_take_lora_on_their_attention_and_refuse_loha(native_folder) -> None:
    folder, _ = native_folder
    cfg = load_config(overrides=[f"model.backbone={folder}", "peft.text=true"])
    model = model_from_config(cfg, load_backbone(str(folder)))
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    prefix = "clip.base_model.model.clip."
    blocks = ("visual.transformer.resblocks.0", "visual.transformer.resblocks.1", "transformer.resblocks.0")
    # peft adapts a MultiheadAttention's in-projection and (nested) out-projection
    assert adapted == {f"{prefix}{b}.attn{part}" for b in blocks for part in ("", ".base_layer.out_proj")}
    out = model(torch.randn(2, 3, 224, 224), roi_masks())
    model.loss(out, torch.tensor([0, 1])).backward()
    cfg = load_config(overrides=[f"model.backbone={folder}", "peft.type=loha", "train.max_steps=20"])
    with pytest.raises(ConfigError, match="peft.type=loha cannot be attached.*use peft.type=lora"):
        model_from_config(cfg, load_backbone(str(folder)))


# ---------------------------------------------------------------------- in-backbone ROI masking


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_masking_keeps_cls_and_roi_tokens_and_zeroes_the_rest(kind: str) -> None:
    backbone = build_random(kind)
    keep = torch.zeros(2, 196, dtype=torch.bool)
    keep[:, 6 * 14 :] = True
    keep[1, 9 * 14 :] = False  # another ROI in the second image
    pixels = torch.randn(2, 3, 224, 224)
    first = backbone.vision_blocks()[0]
    with torch.no_grad():
        unmasked_first = backbone.run_block(first, backbone.embed_patches(pixels))
        # one block of the masked forward: the first block sees every token (as published)
        original = backbone.vision_blocks
        backbone.vision_blocks = lambda: [first]
        try:
            masked_first = backbone.vision_tokens(pixels, keep)
        finally:
            backbone.vision_blocks = original
        masked = backbone.vision_tokens(pixels, keep)
    rows = torch.cat([torch.ones(2, 1, dtype=torch.bool), keep], dim=1)
    assert torch.equal(masked_first[rows], unmasked_first[rows])  # CLS and ROI tokens unchanged
    assert not masked_first[~rows].any() and not masked[~rows].any()  # the others are zero


@pytest.mark.parametrize("kind", KINDS)
def test_isolated_masking_makes_roi_features_independent_of_pixels_outside(kind: str) -> None:
    cfg_overrides = [f"model.backbone={kind}", "train.max_steps=20"]
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)
    changed = pixels.clone()
    changed[:, :, :96] = torch.randn(2, 3, 96, 224)  # only rows above the ROI (patch rows 0..5)
    features = {}
    for masking in ("pool", "every_block", "isolated"):
        torch.manual_seed(0)
        model = model_from_config(
            load_config(overrides=[*cfg_overrides, f"model.roi_masking={masking}"]), build_random(kind)
        ).eval()
        with torch.no_grad():
            features[masking] = [model(p, roi_masks()).features for p in (pixels, changed)]
    before, after = features["isolated"]
    assert torch.allclose(before, after, atol=1e-6)
    # every_block (the published order) lets the first block mix outside tokens in; pool does not mask
    for masking in ("pool", "every_block"):
        assert not torch.allclose(*features[masking], atol=1e-4)


def test_pretraining_refuses_an_open_clip_backbone_before_writing_anything(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=["model.backbone=tiny-openclip"], values={"pretrain.pairs": tmp_path / "p.csv"}
    )
    with pytest.raises(ConfigError, match="savlt pretrain trains Hugging Face CLIP backbones"):
        pretrain(cfg, tmp_path / "pt", progress=False)
    assert not (tmp_path / "pt").exists()


def test_masking_needs_roi_or_cls_pooling_and_the_ablation_method_sets_it() -> None:
    with pytest.raises(ConfigError, match="roi_masking=every_block needs ROI or CLS pooling"):
        load_config(overrides=["method=savlt_no_roi", "model.roi_masking=every_block"])
    cfg = load_config(overrides=["method=savlt_every_block"])
    assert cfg.model.roi_masking == "every_block" and cfg.model.pooling == "roi"


# ---------------------------------------------------------------------- loading, offline


def test_an_open_clip_folder_loads_with_its_own_normalisation(biomed_folder) -> None:
    folder, saved = biomed_folder
    loaded = load_backbone(str(folder))
    assert loaded.fingerprint() == saved.fingerprint() and loaded.kind == "open_clip"
    assert loaded.normalization == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.clip.encode_image(pixels), saved.clip.encode_image(pixels))
    texts = ["Medical OCT image of  normal cervical tissue", "cancer"]
    open_clips_own = HFTokenizer(str(folder.parent / "tiny-bert"), context_length=64)(texts)
    assert torch.equal(loaded.tokenize(texts)[0], open_clips_own)
    other = save_open_clip_folder(
        folder.parent / "other", biomedclip_like_cfg(str(folder.parent / "tiny-bert")), 1
    )
    assert other.fingerprint() != saved.fingerprint()


def _cache_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout of a downloaded repository."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0123abcd")
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


def test_hf_hub_ids_resolve_from_the_local_cache_only(biomed_folder, tmp_path: Path, monkeypatch) -> None:
    folder, saved = biomed_folder
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "savlt-test/tiny-bert"
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "savlt-test/tiny-bert"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    bert = folder.parent / "tiny-bert"
    _cache_repo(
        cache,
        "savlt-test/tiny-bert",
        {n: bert / n for n in ("config.json", "vocab.txt", "tokenizer_config.json")},
    )
    with pytest.raises(BackboneError, match="hf download savlt-test/tiny-biomedclip"):
        load_backbone("hf-hub:savlt-test/tiny-biomedclip")
    weights = folder / "open_clip_model.safetensors"
    _cache_repo(
        cache,
        "savlt-test/tiny-biomedclip",
        {"open_clip_config.json": tmp_path / "open_clip_config.json", weights.name: weights},
    )
    loaded = load_backbone("hf-hub:savlt-test/tiny-biomedclip")
    assert (
        loaded.fingerprint() == saved.fingerprint() and loaded.source == "hf-hub:savlt-test/tiny-biomedclip"
    )


def test_a_missing_biomedclip_says_which_files_to_copy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BackboneError) as info:
        load_backbone(f"hf-hub:{BIOMEDCLIP}")
    message = str(info.value)
    assert "\n" not in message and f"hf download {BIOMEDCLIP}" in message
    assert (
        f'hf download {BIOMEDBERT} --include "*.json" vocab.txt' in message
        and str(tmp_path / "empty") in message
    )
    with pytest.raises(BackboneError, match=f"name it --model hf-hub:{BIOMEDCLIP}"):
        load_backbone(BIOMEDCLIP)  # without the prefix it is taken for a Hugging Face CLIP id


def test_open_clip_architectures_need_a_local_weights_file(
    native_folder, synth_root: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(BackboneError, match="needs its weights file: add --set model.weights=FILE"):
        load_backbone("open_clip:ViT-B-16")
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--out", str(out), "--model", "open_clip:ViT-B-16"]) == 2
    err = capsys.readouterr().err
    assert "model.weights=FILE" in err and "Traceback" not in err
    assert not out.exists()  # checked before the run folder is claimed or a scan is read
    with pytest.raises(BackboneError, match="not an open_clip architecture"):
        load_backbone("open_clip:ViT-Q-99", weights=str(tmp_path / "w.bin"))
    with pytest.raises(BackboneError, match="model.weights is only for open_clip:ARCH"):
        load_backbone("tiny", weights=str(tmp_path / "w.bin"))
    folder, saved = native_folder
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text(json.dumps({"model_cfg": NATIVE_CFG}))
    (broken / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="cannot build the open_clip model"):
        load_backbone(str(broken))
    (broken / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": NATIVE_CFG, "preprocess_cfg": {"mean": 0.5, "std": [1, 2]}})
    )
    with pytest.raises(BackboneError, match="the mean and std must be lists of three numbers"):
        load_backbone(str(broken))
    (broken / "open_clip_config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="open_clip_config.json cannot be read as JSON"):
        load_backbone(str(broken))
    (broken / "open_clip_model.safetensors").unlink()
    (broken / "open_clip_config.json").write_text(json.dumps({"model_cfg": NATIVE_CFG}))
    with pytest.raises(BackboneError, match="holds no weights: copy open_clip_model.safetensors"):
        load_backbone(str(broken))


def test_a_damaged_preprocessor_config_is_a_one_line_error_and_built_in_names_win(
    tmp_path: Path, monkeypatch
) -> None:
    build_random("tiny").save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text("{bad")
    with pytest.raises(BackboneError, match="preprocessor_config.json cannot be read as JSON"):
        load_backbone(str(tmp_path / "clip"))
    with pytest.raises(BackboneError, match="cannot be read as JSON"):
        resolve(str(tmp_path / "clip")).stats()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like the built-in model, which load_backbone builds
    (tmp_path / "tiny" / "open_clip_config.json").write_text("{bad")
    assert resolve("tiny").stats() == CLIP_STATS
    assert resolve("x" * 5000).stats() == CLIP_STATS  # not a usable path: loading says so


def test_patch_dropout_is_switched_off_so_roi_masks_fit_the_tokens(native_folder, tmp_path: Path) -> None:
    folder, _ = native_folder
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["patch_dropout"] = 0.5
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    (dropped / "open_clip_config.json").write_text(json.dumps(config))
    (dropped / "open_clip_model.safetensors").symlink_to(folder / "open_clip_model.safetensors")
    model = model_from_config(
        load_config(overrides=[f"model.backbone={dropped}"]), load_backbone(str(dropped))
    )
    out = model.train()(torch.randn(2, 3, 224, 224), roi_masks())
    assert out.attention.shape == (2, 4, 196)


def test_configs_saved_before_backbones_brought_their_normalisation_still_match(biomed_folder) -> None:
    from savlt.engine.runfolder import same_run

    old = load_config(overrides=["model.backbone=tiny", "data.normalize=clip"])  # the old default, saved
    assert old != load_config(overrides=["model.backbone=tiny"]) and same_run(
        old, load_config(overrides=["model.backbone=tiny"])
    )
    assert not same_run(old, load_config(overrides=["model.backbone=tiny", "data.normalize=imagenet"]))
    folder, _ = biomed_folder  # declares mean 0.5 and std 0.25: "backbone" is not "clip" there
    assert not same_run(
        load_config(overrides=[f"model.backbone={folder}", "data.normalize=clip"]),
        load_config(overrides=[f"model.backbone={folder}"]),
    )


# ---------------------------------------------------------------------- end to end


def test_a_run_on_an_open_clip_backbone_saves_reloads_and_predicts_the_same(
    synth_root: Path, tmp_path: Path, one_thread, capsys
) -> None:
    sets = [s for s in FAST if not s.startswith("model.backbone")] + [
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.test_centers=[xiangya]",
    ]
    out = tmp_path / "run"
    args = ["train", "--data", str(synth_root), "--out", str(out), "--model", "tiny-openclip"]
    assert main([*args, "--method", "savlt_every_block", "-q", *(f"--set={s}" for s in sets)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == "tiny-openclip" and metrics["method"] == "savlt_every_block"
    with (out / "predictions" / "xiangya.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:4]
    capsys.readouterr()
    assert main(["predict", str(out), *(row["path"] for row in rows), "--json", "-q"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    run = load_run(out)
    for row, pred in zip(rows, predicted, strict=True):
        saved = [float(row[f"p_{n}"]) for n in run.class_names]
        assert [pred["probabilities"][n] for n in run.class_names] == pytest.approx(saved, abs=2e-6)
    assert run.evaluate(progress=False)["centers"] == metrics["centers"]
    with TestClient(create_app(run, ServeOptions())) as client:  # the service, as for any backbone
        assert client.get("/model").json()["backbone"] == "tiny-openclip"
        files = [("files", ("scan" + Path(rows[0]["path"]).suffix, Path(rows[0]["path"]).read_bytes()))]
        served = client.post("/predict", files=files).json()["predictions"][0]
    assert [served["probabilities"][n] for n in run.class_names] == pytest.approx(
        [predicted[0]["probabilities"][n] for n in run.class_names], abs=1e-5
    )


def test_every_kind_of_name_resolves_once_to_its_source_and_statistics(biomed_folder, tmp_path: Path) -> None:
    folder, _ = biomed_folder
    hf = tmp_path / "hf-clip"
    build_random("tiny").save_pretrained(hf, normalization=((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)))
    expected = {
        "tiny": ("preset", None, CLIP_STATS),
        "tiny-openclip": ("preset", None, CLIP_STATS),
        "tiny-oct": ("shipped", shipped_folder("tiny-oct"), hf_folder_stats(shipped_folder("tiny-oct"))),
        "open_clip:ViT-B-16": ("open_clip_arch", None, CLIP_STATS),
        "hf-hub:savlt-test/not-cached": ("open_clip_hub", None, CLIP_STATS),
        str(folder): ("open_clip_folder", folder, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
        str(hf): ("hf_folder", hf, ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))),
        "openai/clip-vit-base-patch16": ("hf_hub", None, CLIP_STATS),
    }
    for spec, (kind, where, stats) in expected.items():
        source = resolve(spec)
        assert (source.kind, source.folder, source.stats()) == (kind, where, stats), spec
    assert set(LOADERS) == set(get_args(Kind))  # every kind of name has its loader
    for spec in ("tiny", "tiny-openclip", "tiny-oct", str(folder), str(hf)):  # those loadable here
        loaded = load_backbone(spec)
        assert (loaded.source, loaded.normalization) == (spec, resolve(spec).stats()), spec


def test_a_preset_added_in_one_place_is_found_by_loading_and_normalisation(
    monkeypatch, tmp_path: Path
) -> None:
    shapes = {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "projection": {"projection_dim": 16},
    }
    monkeypatch.chdir(tmp_path)
    (tmp_path / "micro").mkdir()  # a folder of that name: a run's input until the preset exists
    cfg = load_config(overrides=["model.backbone=micro"])
    assert absolute_setting("model.backbone", "micro") == str(tmp_path / "micro") and run_inputs(cfg)
    monkeypatch.setitem(PRESETS, "micro", Preset("hf", shapes))
    assert resolve("micro").kind == "preset" and resolve("micro").local_folder is None
    assert absolute_setting("model.backbone", "micro") == "micro" and run_inputs(cfg) == {}
    model = load_backbone("micro")
    assert (model.source, model.width, model.embed_dim) == ("micro", 32, 16)
    assert resolve("micro").stats() == model.normalization == CLIP_STATS
    with pytest.raises(BackboneError, match="model.weights is only for open_clip:ARCH"):
        load_backbone("micro", weights="w.safetensors")


def test_names_that_look_like_paths_are_read_once_and_their_errors_are_one_line(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    build_random("tiny").save_pretrained(tmp_path / "clip")
    assert resolve("clip").local_folder == Path("clip")  # a relative folder: the run's input
    assert absolute_setting("model.backbone", "clip") == str(tmp_path / "clip")
    (tmp_path / "open_clip:ViT-B-16").mkdir()  # a folder named like an architecture stays a name
    assert resolve("open_clip:ViT-B-16").kind == "open_clip_arch"
    assert absolute_setting("model.backbone", "open_clip:ViT-B-16") == "open_clip:ViT-B-16"
    missing = resolve("./no-such-folder")
    assert (missing.kind, missing.local_folder) == ("hf_folder", None)
    with pytest.raises(BackboneError, match="^backbone folder no-such-folder does not exist$"):
        missing.load()
    with pytest.raises(BackboneError) as info:
        load_backbone("tiny-ocr")  # a typo: neither built in, a folder, nor cached
    message = str(info.value)
    assert "\n" not in message and message.startswith("'tiny-ocr' is neither a backbone built into SAVLT")
    assert "--model tiny-oct" in message and str(tmp_path / "empty-cache") in message
