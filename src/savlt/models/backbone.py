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

from savlt.models.hf_clip import RANDOM_PRESETS, build_random_hf, load_hf, load_hf_folder, load_hf_hub
from savlt.models.vision_language import BackboneError, VisionLanguage

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"
OPEN_CLIP_RANDOM = ("tiny-openclip", "random-biomedclip")

# Backbones pretrained by `savlt pretrain` and shipped inside the package, loaded offline by name.
SHIPPED = ("tiny-oct",)


def build_random(preset: str = "tiny") -> VisionLanguage:
    """A built-in backbone with random weights, the same every time."""
    if preset in OPEN_CLIP_RANDOM:
        from savlt.models.openclip import build_random_open_clip

        return build_random_open_clip(preset)
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
    if weights is not None and not spec.startswith("open_clip:"):
        raise BackboneError(
            f"model.weights is only for open_clip:ARCH backbones; {spec!r} brings its own weights "
            "(remove model.weights)"
        )
    if spec in RANDOM_PRESETS or spec in OPEN_CLIP_RANDOM:
        return build_random(spec)
    if spec in SHIPPED:
        return _shipped(spec)
    if spec.startswith(("open_clip:", "hf-hub:")):
        from savlt.models.openclip import load_open_clip

        return load_open_clip(spec, weights, allow_download)
    folder = Path(spec).expanduser()
    if folder.exists() or spec.startswith((".", "/", "~")):
        if (folder / "open_clip_config.json").is_file():
            from savlt.models.openclip import load_open_clip_folder

            return load_open_clip_folder(folder, allow_download)
        if not (folder / "config.json").is_file():
            raise BackboneError(
                f"backbone folder {folder} holds neither config.json (a Hugging Face CLIP saved with "
                "save_pretrained) nor open_clip_config.json (an open_clip model with its weights)"
            )
        return load_hf_folder(folder)
    return load_hf_hub(spec, allow_download)
