"""The backbone registry: what ``model.backbone`` names, resolved once (``resolve``) into a
``BackboneSource`` that knows how to load the model and which mean and std it declares.

- a built-in random model (``PRESETS``, each described there): Hugging Face CLIPs and
  BiomedCLIP-shaped open_clip models, for tests, demos and speed measurements;
- ``tiny-oct``: a small CLIP pretrained on synthetic OCT scans by ``savlt pretrain``, shipped
  inside the package (``SHIPPED``);
- a local folder: a Hugging Face CLIP (``config.json``) or an open_clip model
  (``open_clip_config.json`` + weights);
- ``hf-hub:ORG/NAME``: an open_clip model from the local Hugging Face cache (BiomedCLIP);
- ``open_clip:ARCH``: an open_clip architecture with ``model.weights`` a local file;
- any other name: a Hugging Face CLIP hub id, from the local cache.

Built-in names win over a local folder of the same name. Resolving and reading the statistics
import neither torch nor transformers (a sweep and the run identity use them); loading imports the
family's module then. Pretrained weights are never fetched silently: only with
``model.allow_download`` may the hub be asked, and when the files are missing the error says how
to provide them.

Presets are data (as open_clip keeps its model configs), not functions registered by a decorator
(as timm's ``register_model``): a decorator registers a preset only once the family's module is
imported, which imports torch, and resolving a name must not. A new preset is one entry of
``PRESETS``; a new kind of name is one rule in ``resolve`` and one entry of ``LOADERS``. Loading
and normalisation both go through ``resolve``, so they cannot disagree on what a name is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from savlt.models.backbone_files import (
    HUB_PREFIX,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_PREFIX,
    BackboneError,
    hf_folder_stats,
    hub_cache,
    preprocess_stats,
    read_open_clip_config,
)
from savlt.normalization import CLIP_STATS, Stats

if TYPE_CHECKING:
    from savlt.models.vision_language import VisionLanguage

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"


def _tower(hidden: int, layers: int, heads: int) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }


@dataclass(frozen=True)
class Preset:
    """A built-in backbone with random weights: its family and its shapes."""

    family: Literal["hf", "open_clip"]
    shapes: dict[str, Any]


# "tiny" for tests; "small" the architecture of the shipped tiny-oct; "random-vit-b16" the shapes
# of openai/clip-vit-base-patch16; "tiny-openclip" for tests and demos of the open_clip path;
# "random-biomedclip" BiomedCLIP's own shapes (timm ViT-B/16 trunk, BERT-base text tower, 512-d,
# context 256). The large ones measure speed and memory without the weights.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "hf", {"vision": _tower(96, 4, 4), "text": _tower(64, 2, 4), "projection": {"projection_dim": 64}}
    ),
    "small": Preset(
        "hf", {"vision": _tower(144, 4, 4), "text": _tower(128, 4, 4), "projection": {"projection_dim": 128}}
    ),
    "random-vit-b16": Preset(
        "hf",
        {"vision": _tower(768, 12, 12), "text": _tower(512, 12, 8), "projection": {"projection_dim": 512}},
    ),
    "tiny-openclip": Preset(
        "open_clip",
        {
            "width": 96,
            "layers": 4,
            "heads": 4,
            "text_width": 64,
            "text_layers": 2,
            "embed": 64,
            "context": 128,
        },
    ),
    "random-biomedclip": Preset(
        "open_clip",
        {
            "width": 768,
            "layers": 12,
            "heads": 12,
            "text_width": 768,
            "text_layers": 12,
            "embed": 512,
            "context": 256,
        },
    ),
}

# Backbones pretrained by `savlt pretrain` and shipped inside the package, loaded offline by name.
SHIPPED = ("tiny-oct",)

Kind = Literal[
    "preset", "shipped", "open_clip_arch", "open_clip_hub", "open_clip_folder", "hf_folder", "hf_hub"
]


def shipped_folder(name: str) -> Path:
    """Where a backbone shipped with the package lives (``savlt/backbones/<name>``)."""
    return Path(__file__).resolve().parents[1] / "backbones" / name


@dataclass(frozen=True)
class BackboneSource:
    """One resolved ``model.backbone``: its kind, and where its files are for the kinds that have
    a folder (shipped, local folders, an ``hf-hub:`` model found in the local cache)."""

    spec: str
    kind: Kind
    folder: Path | None = None

    def stats(self) -> Stats:
        """The mean and std the backbone declares, read from its files without building it
        (CLIP's when it declares none): what ``data.normalize=backbone`` stands for."""
        if self.folder is None:
            return CLIP_STATS
        try:
            if (self.folder / OPEN_CLIP_CONFIG).is_file():
                return preprocess_stats(read_open_clip_config(self.folder), self.folder / OPEN_CLIP_CONFIG)
            if self.folder.is_dir():
                return hf_folder_stats(self.folder)
        except OSError:  # not a usable path (e.g. too long): loading it says so
            pass
        return CLIP_STATS

    @property
    def local_folder(self) -> Path | None:
        """The folder on this machine that `spec` names (an input of the run), None for a
        built-in model, a hub name or a path that does not exist."""
        if self.kind in ("hf_folder", "open_clip_folder") and self.folder.exists():
            return self.folder
        return None

    def load(self, allow_download: bool = False, weights: str | None = None) -> VisionLanguage:
        """The backbone itself; ``weights`` is the local weights file of an ``open_clip:ARCH``."""
        if weights is not None and self.kind != "open_clip_arch":
            raise BackboneError(
                f"model.weights is only for open_clip:ARCH backbones; {self.spec!r} brings its own weights "
                "(remove model.weights)"
            )
        return LOADERS[self.kind](self, allow_download, weights)


# Each loader imports its family's module (torch, transformers or open_clip) only when called.


def _load_preset(source: BackboneSource, allow_download: bool, weights: str | None) -> VisionLanguage:
    return build_random(source.spec)


def _load_shipped(source: BackboneSource, allow_download: bool, weights: str | None) -> VisionLanguage:
    if not (source.folder / "model.safetensors").is_file():
        raise BackboneError(
            f"the weights of the built-in backbone {source.spec!r} are missing from this installation "
            f"({source.folder}); reinstall SAVLT, or rebuild them with `make tiny-oct` (docs/backbones.md)"
        )
    from savlt.models.hf_clip import load_hf

    return load_hf(str(source.folder), local_only=True, stats=source.stats(), name=source.spec)


def _load_hf_folder(source: BackboneSource, allow_download: bool, weights: str | None) -> VisionLanguage:
    if not source.folder.is_dir():
        raise BackboneError(f"backbone folder {source.folder} does not exist")
    if not (source.folder / "config.json").is_file():
        raise BackboneError(
            f"backbone folder {source.folder} holds neither config.json (a Hugging Face CLIP saved with "
            "save_pretrained) nor open_clip_config.json (an open_clip model with its weights)"
        )
    from savlt.models.hf_clip import load_hf_folder

    return load_hf_folder(source.folder, source.stats())


def _load_hf_hub(source: BackboneSource, allow_download: bool, weights: str | None) -> VisionLanguage:
    from savlt.models.hf_clip import load_hf_hub

    return load_hf_hub(source.spec, allow_download, source.stats())


def _load_open_clip_folder(
    source: BackboneSource, allow_download: bool, weights: str | None
) -> VisionLanguage:
    from savlt.models.openclip import load_open_clip_folder

    return load_open_clip_folder(source.folder, allow_download)


def _load_open_clip_hub(source: BackboneSource, allow_download: bool, weights: str | None) -> VisionLanguage:
    from savlt.models.openclip import load_open_clip_hub

    return load_open_clip_hub(source.spec, allow_download)


def _load_open_clip_arch(source: BackboneSource, allow_download: bool, weights: str | None) -> VisionLanguage:
    from savlt.models.openclip import load_open_clip_arch

    return load_open_clip_arch(source.spec, weights, allow_download)


Loader = Callable[[BackboneSource, bool, str | None], "VisionLanguage"]
LOADERS: dict[Kind, Loader] = {
    "preset": _load_preset,
    "shipped": _load_shipped,
    "hf_folder": _load_hf_folder,
    "hf_hub": _load_hf_hub,
    "open_clip_folder": _load_open_clip_folder,
    "open_clip_hub": _load_open_clip_hub,
    "open_clip_arch": _load_open_clip_arch,
}


def _cached_hub_folder(spec: str) -> Path | None:
    """The local cache folder of an ``hf-hub:`` open_clip model, when its config is there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(
            spec.removeprefix(HUB_PREFIX), OPEN_CLIP_CONFIG, cache_dir=hub_cache()
        )
    except ValueError:  # not a valid repository id: loading it says so
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def resolve(spec: str = DEFAULT_BACKBONE) -> BackboneSource:
    """What `spec` names, in the order of the module docstring (the one place names are read)."""
    if spec in SHIPPED:
        return BackboneSource(spec, "shipped", shipped_folder(spec))
    if spec in PRESETS:
        return BackboneSource(spec, "preset")
    if spec.startswith(OPEN_CLIP_PREFIX):
        return BackboneSource(spec, "open_clip_arch")
    if spec.startswith(HUB_PREFIX):
        return BackboneSource(spec, "open_clip_hub", _cached_hub_folder(spec))
    folder = Path(spec).expanduser()
    try:
        is_folder = folder.exists() or spec.startswith((".", "/", "~"))
        if is_folder and (folder / OPEN_CLIP_CONFIG).is_file():
            return BackboneSource(spec, "open_clip_folder", folder)
    except OSError:  # not a usable path (e.g. too long): loading it says so
        is_folder = False
    return BackboneSource(spec, "hf_folder", folder) if is_folder else BackboneSource(spec, "hf_hub")


def build_random(preset: str = "tiny") -> VisionLanguage:
    """A built-in backbone with random weights, the same every time."""
    entry = PRESETS[preset]
    if entry.family == "open_clip":
        from savlt.models.openclip import build_random_open_clip  # imports open_clip: only when needed

        return build_random_open_clip(preset, entry.shapes)
    from savlt.models.hf_clip import build_random_hf

    return build_random_hf(preset, entry.shapes)


def load_backbone(
    spec: str = DEFAULT_BACKBONE, allow_download: bool = False, weights: str | None = None
) -> VisionLanguage:
    """The backbone ``spec`` names (see the module docstring)."""
    return resolve(spec).load(allow_download, weights)
