"""Loading the backbone named by ``model.backbone`` (offline first) as a ``VisionLanguage``.

- a built-in random model: ``tiny`` (tests), ``small``, ``random-vit-b16`` (Hugging Face CLIPs),
  ``tiny-openclip`` and ``random-biomedclip`` (open_clip, BiomedCLIP-shaped);
- ``tiny-oct``: a small CLIP pretrained on synthetic OCT scans by ``savlt pretrain``, shipped
  inside the package;
- a local folder: a Hugging Face CLIP (``config.json``) or an open_clip model
  (``open_clip_config.json`` + weights);
- ``hf-hub:ORG/NAME``: an open_clip model from the local Hugging Face cache (BiomedCLIP);
- ``open_clip:ARCH``: an open_clip architecture with ``model.weights`` a local file;
- any other name: a Hugging Face CLIP hub id, from the local cache.

Pretrained weights are never fetched silently: only with ``model.allow_download`` may the hub be
asked, and when the files are missing the error says how to provide them.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from savlt.data.transforms import Stats
from savlt.models.backbone_files import (
    HUB_PREFIX,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_PREFIX,
    hf_folder_stats,
    preprocess_stats,
    read_open_clip_config,
)
from savlt.models.hf_clip import (
    RANDOM_PRESETS,
    build_random_hf,
    hub_cache,
    load_hf,
    load_hf_folder,
    load_hf_hub,
)
from savlt.models.vision_language import CLIP_STATS, BackboneError, VisionLanguage

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"

# Random open_clip models shaped like BiomedCLIP: "tiny-openclip" for tests and demos,
# "random-biomedclip" with BiomedCLIP's own shapes (timm ViT-B/16 trunk, BERT-base text tower,
# 512-d, context 256) for speed and memory measurements without the weights.
OPEN_CLIP_PRESETS: dict[str, dict[str, int]] = {
    "tiny-openclip": {
        "width": 96,
        "layers": 4,
        "heads": 4,
        "text_width": 64,
        "text_layers": 2,
        "embed": 64,
        "context": 128,
    },
    "random-biomedclip": {
        "width": 768,
        "layers": 12,
        "heads": 12,
        "text_width": 768,
        "text_layers": 12,
        "embed": 512,
        "context": 256,
    },
}

# Backbones pretrained by `savlt pretrain` and shipped inside the package, loaded offline by name.
SHIPPED = ("tiny-oct",)


def is_built_in(spec: str) -> bool:
    """Whether `spec` names a model built into SAVLT (random presets and shipped backbones), which
    wins over a local folder of the same name."""
    return spec in RANDOM_PRESETS or spec in OPEN_CLIP_PRESETS or spec in SHIPPED


def build_random(preset: str = "tiny") -> VisionLanguage:
    """A built-in backbone with random weights, the same every time."""
    if preset in OPEN_CLIP_PRESETS:
        from savlt.models.openclip import build_random_open_clip  # imports open_clip: only when needed

        return build_random_open_clip(preset, OPEN_CLIP_PRESETS[preset])
    return build_random_hf(preset)


def shipped_folder(name: str) -> Path:
    """Where a backbone shipped with the package lives (``savlt/backbones/<name>``)."""
    return Path(__file__).resolve().parents[1] / "backbones" / name


def _shipped(name: str) -> VisionLanguage:
    folder = shipped_folder(name)
    if not (folder / "model.safetensors").is_file():
        raise BackboneError(
            f"the weights of the built-in backbone {name!r} are missing from this installation "
            f"({folder}); reinstall SAVLT, or rebuild them as the README's 'A pretrained OCT-CLIP' says"
        )
    return load_hf(str(folder), local_only=True, name=name)


def load_backbone(
    spec: str = DEFAULT_BACKBONE, allow_download: bool = False, weights: str | None = None
) -> VisionLanguage:
    """The backbone ``spec`` names (see the module docstring); ``weights`` is the local weights
    file of an ``open_clip:ARCH`` backbone."""
    if weights is not None and not spec.startswith(OPEN_CLIP_PREFIX):
        raise BackboneError(
            f"model.weights is only for open_clip:ARCH backbones; {spec!r} brings its own weights "
            "(remove model.weights)"
        )
    if spec in SHIPPED:
        return _shipped(spec)
    if is_built_in(spec):
        return build_random(spec)
    if spec.startswith((OPEN_CLIP_PREFIX, HUB_PREFIX)):
        from savlt.models.openclip import load_open_clip

        return load_open_clip(spec, weights, allow_download)
    folder = Path(spec).expanduser()
    if folder.exists() or spec.startswith((".", "/", "~")):
        if (folder / OPEN_CLIP_CONFIG).is_file():
            from savlt.models.openclip import load_open_clip_folder

            return load_open_clip_folder(folder, allow_download)
        if not (folder / "config.json").is_file():
            raise BackboneError(
                f"backbone folder {folder} holds neither config.json (a Hugging Face CLIP saved with "
                "save_pretrained) nor open_clip_config.json (an open_clip model with its weights)"
            )
        return load_hf_folder(folder)
    return load_hf_hub(spec, allow_download)


def declared_normalization(spec: str) -> Stats:
    """The mean and std the backbone `spec` declares, read from its files without building it
    (CLIP's when it declares none), in the order ``load_backbone`` resolves names: what
    ``data.normalize=backbone`` stands for."""
    if spec in SHIPPED:
        return hf_folder_stats(shipped_folder(spec))
    if is_built_in(spec) or spec.startswith(OPEN_CLIP_PREFIX):
        return CLIP_STATS
    folder = Path(spec).expanduser()
    if spec.startswith(HUB_PREFIX):
        try:
            cached = try_to_load_from_cache(
                spec.removeprefix(HUB_PREFIX), OPEN_CLIP_CONFIG, cache_dir=hub_cache()
            )
        except ValueError:  # not a valid repository id: loading it says so
            cached = None
        if not isinstance(cached, str):
            return CLIP_STATS
        folder = Path(cached).parent
    try:
        if (folder / OPEN_CLIP_CONFIG).is_file():
            return preprocess_stats(read_open_clip_config(folder), folder / OPEN_CLIP_CONFIG)
        if folder.is_dir():
            return hf_folder_stats(folder)
    except OSError:  # not a usable path (e.g. too long): loading it says so
        pass
    return CLIP_STATS
