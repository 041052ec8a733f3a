"""open_clip backbones behind the ``VisionLanguage`` interface: BiomedCLIP and other open_clip ViTs.

Supported vision towers: a timm ``VisionTransformer`` trunk with one class token (BiomedCLIP:
``vit_base_patch16_224``, its CLS pooled and projected by ``visual.head``) and open_clip's own
``VisionTransformer`` with CLS pooling. Text towers: a Hugging Face encoder (BiomedCLIP's
PubMedBERT) or open_clip's own text transformer.

Adapters (see ``adapter_targets``): on a timm trunk the fused ``attn.qkv`` projection and
``attn.proj`` of each adapted block. One adapter on the fused qkv layer adapts the query, key and
value projections together: its update ΔW = B·A has one rank-r down-projection A shared by the
three and an up-projection B whose rows split into the q, k and v parts (not three independent
rank-r adapters as on a Hugging Face CLIP). On open_clip's own towers the blocks use PyTorch's
``nn.MultiheadAttention``, which peft adapts as a whole (in and out projections), with LoRA only.

Loading is offline first: a folder holding ``open_clip_config.json`` and the weights (the layout
of an open_clip hub repository), ``hf-hub:ORG/NAME`` from the local Hugging Face cache, or
``open_clip:ARCH`` (a built-in open_clip architecture) with ``model.weights`` a local file. A
Hugging Face text tower's own config (BiomedCLIP: microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract)
is read from a local folder or the cache too; its weights come with the CLIP checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from huggingface_hub import snapshot_download
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from open_clip.transformer import VisionTransformer as OpenClipViT
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn
from transformers import BertConfig, PreTrainedTokenizerFast

from savlt.models.backbone_files import (
    HUB_PREFIX,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_PREFIX,
    WEIGHT_FILES,
    BackboneError,
    hub_cache,
    preprocess_stats,
    read_open_clip_config,
)
from savlt.models.hf_clip import quiet_hf
from savlt.models.vision_language import VisionLanguage
from savlt.normalization import CLIP_STATS, Stats

BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
_HF_ATTENTION = r"attention\.(self\.(query|key|value)|output\.dense)"  # BERT / RoBERTa names


class OpenClip(nn.Module, VisionLanguage):
    kind = "open_clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        source: str,
        normalization: Stats = CLIP_STATS,
    ):
        super().__init__()
        self.clip = model
        self.tokenizer = tokenizer  # texts -> (T, context) ids: open_clip's HFTokenizer or SimpleTokenizer
        self.source = source
        self.normalization = normalization
        visual = model.visual
        if isinstance(visual, TimmModel) and isinstance(visual.trunk, timm.models.VisionTransformer):
            trunk = visual.trunk
            if trunk.cls_token is None or trunk.num_prefix_tokens != 1:
                raise BackboneError(
                    f"{source}: SAVLT needs a ViT trunk with exactly one class token "
                    f"(this one has {trunk.num_prefix_tokens} prefix tokens)"
                )
            self.timm = True
            self.image_size = int(trunk.patch_embed.img_size[0])
            self.patch_size = int(trunk.patch_embed.patch_size[0])
            self.width = int(trunk.embed_dim)
            self.vision_layers = len(trunk.blocks)
        elif isinstance(visual, OpenClipViT):
            if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
                raise BackboneError(f"{source}: SAVLT needs a ViT pooled by its class token")
            if not visual.transformer.batch_first:
                raise BackboneError(
                    f"{source}: open_clip ViTs built with batch_first=False are not supported"
                )
            self.timm = False
            self.image_size = int(visual.image_size[0])
            self.patch_size = int(visual.patch_size[0])
            self.width = int(visual.conv1.out_channels)
            self.vision_layers = len(visual.transformer.resblocks)
        else:
            raise BackboneError(
                f"{source}: the vision tower {type(visual).__name__} is not a ViT; SAVLT's ROI pooling "
                "needs a ViT (a timm VisionTransformer trunk or open_clip's VisionTransformer)"
            )
        self.hf_text = isinstance(getattr(model, "text", None), HFTextEncoder)
        self.logit_scale = model.logit_scale
        with torch.no_grad():
            probe = self.project_image(torch.zeros(1, self.width))
        self.embed_dim = int(probe.shape[-1])

    # ------------------------------------------------------------------ vision tower
    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        if not self.timm:
            return visual._embeds(pixels)
        trunk = visual.trunk
        tokens = trunk._pos_embed(trunk.patch_embed(pixels))  # class token and positions
        return trunk.norm_pre(trunk.patch_drop(tokens))

    def vision_blocks(self) -> Sequence[nn.Module]:
        visual = self.clip.visual
        return visual.trunk.blocks if self.timm else visual.transformer.resblocks

    def run_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return block(tokens)

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        return visual.trunk.norm(tokens) if self.timm else visual.ln_post(tokens)

    def cls_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        if self.timm:
            return visual.trunk.forward_head(visual.trunk.norm(tokens), pre_logits=True)
        return visual.ln_post(tokens[:, 0])

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        if self.timm:
            return visual.head(visual.trunk.head(pooled))
        return pooled @ visual.proj

    # ------------------------------------------------------------------ text tower
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(texts))
        pad = self.clip.text.config.pad_token_id if self.hf_text else 0
        return ids, (ids != pad).long()

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(ids)  # each text tower derives its own mask from the ids

    def token_embedding(self) -> nn.Embedding:
        if self.hf_text:
            return self.clip.text.transformer.get_input_embeddings()
        return self.clip.token_embedding

    # ------------------------------------------------------------------ tuning and identity
    def adapter_targets(self, first_layer: int, text: bool) -> tuple[str, str | None]:
        layers = "|".join(str(i) for i in range(first_layer, self.vision_layers))
        if self.timm:
            vision = rf"clip\.visual\.trunk\.blocks\.({layers})\.attn\.(qkv|proj)"
        else:
            vision = rf"clip\.visual\.transformer\.resblocks\.({layers})\.attn"
        if not text:
            return vision, None
        if self.hf_text:
            return vision, rf"clip\.text\.transformer\.encoder\.layer\.\d+\.{_HF_ATTENTION}"
        return vision, r"clip\.transformer\.resblocks\.\d+\.attn"

    def projections(self, text: bool) -> list[nn.Parameter]:
        visual = self.clip.visual
        params = [*visual.head.parameters(), *visual.trunk.head.parameters()] if self.timm else [visual.proj]
        if text:
            params += list(self.clip.text.proj.parameters()) if self.hf_text else [self.clip.text_projection]
        return params

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(
            repr(
                (self.kind, self.image_size, self.patch_size, self.width, self.vision_layers, self.embed_dim)
            ).encode()
        )
        visual = self.clip.visual
        if self.timm:
            vision = (visual.trunk.patch_embed.proj.weight, visual.trunk.cls_token)
        else:
            vision = (visual.conv1.weight, visual.class_embedding)
        for tensor in (*vision, self.token_embedding().weight[:256]):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- built-in random models


def char_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer with one token per character, built in-process."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab["##" + ch] = len(vocab)
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def build_random_open_clip(name: str, shape: dict[str, int]) -> OpenClip:
    """A random open_clip model shaped like BiomedCLIP (timm ViT trunk, BERT text tower, a linear
    image head and a two-layer MLP text head), the same every time (its own seed; the global RNG
    is left alone). `shape`: width, layers, heads, text_width, text_layers, embed, context."""
    context = shape["context"]
    chars = char_tokenizer(context)

    def tokenizer(texts: list[str]) -> torch.Tensor:
        cleaned = [" ".join(text.split()) for text in texts]  # as open_clip's HFTokenizer
        return chars(cleaned, padding="max_length", max_length=context, truncation=True, return_tensors="pt")[
            "input_ids"
        ]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device("meta"):  # only the shell: every tensor in it is replaced below
            model = open_clip.CustomTextCLIP(
                embed_dim=shape["embed"],
                vision_cfg={
                    "timm_model_name": "vit_base_patch16_224",
                    "timm_pool": "",
                    "timm_proj": "linear",
                },
                text_cfg={"width": 32, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 8},
            )
        model.visual.trunk = timm.models.VisionTransformer(
            img_size=224,
            patch_size=16,
            embed_dim=shape["width"],
            depth=shape["layers"],
            num_heads=shape["heads"],
            num_classes=0,
        )
        model.visual.head.proj = nn.Linear(shape["width"], shape["embed"], bias=False)
        text = BertConfig(
            vocab_size=len(chars),
            hidden_size=shape["text_width"],
            num_hidden_layers=shape["text_layers"],
            num_attention_heads=max(1, shape["text_width"] // 64),
            intermediate_size=4 * shape["text_width"],
            max_position_embeddings=context,
            pad_token_id=0,
        )
        model.text = HFTextEncoder(
            "bert", shape["embed"], config=text, pooler_type="cls_last_hidden_state_pooler", proj_type="mlp"
        )
        model.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))  # CLIP's trained scale
    return OpenClip(model.eval(), tokenizer, name).eval()


# ---------------------------------------------------------------------- pretrained, offline first


def how_to_provide(spec: str) -> str:
    """One line: which files to copy where, for an open_clip hub model (BiomedCLIP's text config too)."""
    repo = spec.removeprefix(HUB_PREFIX)
    text_tower = f' and `hf download {BIOMEDBERT} --include "*.json" vocab.txt`' if repo == BIOMEDCLIP else ""
    return (
        f"the open_clip model {spec!r} is not on this machine: on one with internet run "
        f"`hf download {repo}`{text_tower} and copy the cache folder to {hub_cache()} here (or set "
        f"HF_HUB_CACHE), or copy the repository's files (open_clip_config.json, "
        f"{' or '.join(WEIGHT_FILES)}, tokenizer files) into a folder DIR and pass --model DIR, or allow "
        "a download with --set model.allow_download=true; see docs/backbones.md, 'Medical CLIP backbones'"
    )


def _cached_repo(repo: str, allow_download: bool, patterns: list[str] | None = None) -> Path | None:
    """The local snapshot folder of a hub repository, or None when it is not cached (and may not
    be downloaded); `patterns` limits a download to those files."""
    try:
        return Path(snapshot_download(repo, local_files_only=True, cache_dir=hub_cache()))
    except (OSError, ValueError):  # not cached, or not a valid repository id
        if not allow_download:
            return None
    try:
        return Path(snapshot_download(repo, cache_dir=hub_cache(), allow_patterns=patterns))
    except (OSError, ValueError) as exc:  # HTTP errors are OSErrors too
        raise BackboneError(
            f"download of {repo!r} failed ({exc}); {how_to_provide(HUB_PREFIX + repo)}"
        ) from None


def _local_hf(name: str, what: str, allow_download: bool, spec: str, base: Path | None) -> Path:
    """A Hugging Face model named by an open_clip config: a folder (relative to the open_clip
    folder, `base`), or a repository in the cache (only its config and tokenizer files)."""
    for folder in ([base / name] if base is not None else []) + [Path(name).expanduser()]:
        if folder.is_dir():
            return folder
    cached = _cached_repo(name, allow_download, ["*.json", "*.txt", "*.model"])
    if cached is None:
        raise BackboneError(
            f"{spec}: its {what} {name!r} is not available offline: on a machine with internet run "
            f'`hf download {name} --include "*.json" vocab.txt` (its config and tokenizer files, not '
            f"its weights) and copy the cache folder to {hub_cache()} here, or write a local folder's "
            "path in open_clip_config.json"
        )
    return cached


def _tokenizer(
    text: dict[str, Any], folder: Path | None, allow: bool, spec: str
) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's own tokenizer for this config (its rules: an HF tokenizer when the config names
    one, else CLIP's BPE), read from local files only."""
    context = int(text.get("context_length", DEFAULT_CONTEXT_LENGTH))
    kwargs = dict(text.get("tokenizer_kwargs") or {})
    name = text.get("hf_tokenizer_name")
    if not name:
        return open_clip.SimpleTokenizer(context_length=context, **kwargs)
    if folder is not None and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        local = folder  # an open_clip hub repository with its tokenizer files
    else:
        local = _local_hf(name, "tokenizer", allow, spec, folder)
    return HFTokenizer(str(local), context_length=context, **kwargs)


def build_open_clip(
    model_cfg: dict[str, Any],
    weights: Path | None,
    source: str,
    stats: Stats,
    folder: Path | None,
    allow_download: bool,
) -> OpenClip:
    """An open_clip model from its config dict and a weights file, with nothing fetched online."""
    if not isinstance(model_cfg, dict):
        raise BackboneError(f"{source}: model_cfg must be a mapping, not {type(model_cfg).__name__}")
    cfg = json.loads(json.dumps(model_cfg))  # a deep copy
    if "multimodal_cfg" in cfg:
        raise BackboneError(
            f"{source}: CoCa models (multimodal_cfg) are not supported; use a CLIP-style model"
        )
    vision, text = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    vision["timm_model_pretrained"] = False  # every weight comes from the CLIP checkpoint
    vision["patch_dropout"] = 0.0  # the ROI keep-masks index every patch token
    try:
        with quiet_hf():
            if text.get("hf_model_name"):
                text["hf_model_name"] = str(
                    _local_hf(text["hf_model_name"], "text tower", allow_download, source, folder)
                )
                text["hf_model_pretrained"] = False
            tokenizer = _tokenizer(text, folder, allow_download, source)
            custom = cfg.pop("custom_text", False) or bool(text.get("hf_model_name"))
            model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
            if weights is not None:
                open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
            return OpenClip(model.float().eval(), tokenizer, source, stats).eval()
    except BackboneError:
        raise
    except Exception as exc:  # open_clip, timm and torch raise many types for a bad file or config
        raise BackboneError(
            f"cannot build the open_clip model {source} ({type(exc).__name__}: {exc})"
        ) from None


def load_open_clip_folder(folder: Path, allow_download: bool = False, source: str | None = None) -> OpenClip:
    config = read_open_clip_config(folder)
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise BackboneError(
            f"open_clip folder {folder} holds no weights: copy {' or '.join(WEIGHT_FILES)} from the "
            "model's repository into it"
        )
    stats = preprocess_stats(config, folder / OPEN_CLIP_CONFIG)
    return build_open_clip(
        config["model_cfg"], found[0], source or str(folder), stats, folder, allow_download
    )


def load_open_clip_hub(spec: str, allow_download: bool) -> OpenClip:
    """``hf-hub:ORG/NAME``: an open_clip hub repository, from the local cache first."""
    folder = _cached_repo(spec.removeprefix(HUB_PREFIX), allow_download)
    weights_there = folder is not None and any((folder / name).is_file() for name in WEIGHT_FILES)
    if not weights_there or not (folder / OPEN_CLIP_CONFIG).is_file():
        raise BackboneError(how_to_provide(spec))
    return load_open_clip_folder(folder, allow_download, source=spec)


def load_open_clip_arch(spec: str, weights: str | None, allow_download: bool) -> OpenClip:
    """``open_clip:ARCH``: an architecture open_clip knows, with ``weights`` a local file."""
    arch = spec.removeprefix(OPEN_CLIP_PREFIX)
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise BackboneError(
            f"{spec}: {arch!r} is not an open_clip architecture; choose one of open_clip.list_models() "
            "(e.g. ViT-B-16) or pass an open_clip folder"
        )
    if weights is None:
        raise BackboneError(
            f"{spec} needs its weights file: add --set model.weights=FILE (a .safetensors, .bin or .pt "
            "state dict saved from open_clip)"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"model.weights: {path} does not exist")
    return build_open_clip(model_cfg, path, spec, CLIP_STATS, None, allow_download)
