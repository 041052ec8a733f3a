"""The one typed configuration object of a SAVLT run.

Defaults live in the dataclasses below (the published method's values). A YAML file and
``key=value`` overrides (dotted keys, YAML-typed values) are merged on top, every key and type is
checked, and the resolved object is saved into each run folder so the run can be reproduced from
that folder alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from savlt.classes import DEFAULT_CLASSES, DEFAULT_HIGH_RISK, ClassMap
from savlt.errors import SavltError
from savlt.io import read_text, write_text
from savlt.methods import METHODS, Method, Pooling, RoiMasking


class ConfigError(SavltError):
    """A configuration value, key or file that cannot be used; the message names it."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


SEED_LIMIT = 2**32  # numpy's legacy seeding accepts [0, 2^32)


def _need_seed(value: int | None, key: str) -> None:
    _need(
        value is None or 0 <= value < SEED_LIMIT,
        f"{key}: {value} is not a valid seed; use an integer from 0 to {SEED_LIMIT - 1}",
    )


@dataclass
class ClassSpec:
    name: str
    description: str


def _default_classes() -> list[ClassSpec]:
    return [ClassSpec(name, text) for name, text in DEFAULT_CLASSES.items()]


@dataclass
class DataConfig:
    root: str | None = None
    train_center: str = "mixed"
    # External test centers; None = every center under root other than train_center.
    test_centers: list[str] | None = None
    split_ratios: list[float] = field(default_factory=lambda: [0.45, 0.15, 0.40])
    # The split is seeded separately from training so every training seed meets the same test set.
    split_seed: int = 0
    split_file: str | None = None
    # Where splits and few-shot lists are cached; None = <root>/.savlt (skipped if not writable).
    cache_dir: str | None = None
    image_size: int = 224
    # Pixel normalisation: the backbone's own statistics (CLIP's for every OpenAI CLIP and for
    # BiomedCLIP; an open_clip folder's preprocess_cfg), CLIP's, or ImageNet's (what the published
    # code uses).
    normalize: Literal["backbone", "clip", "imagenet"] = "backbone"
    # Seed of the few-shot draw; None = train.seed (every seed draws its own shots). The published
    # code fixes one draw (seed 42) for every training seed.
    fewshot_seed: int | None = None
    num_workers: int = 2
    class_aliases: dict[str, str] = field(default_factory=dict)
    classes: list[ClassSpec] = field(default_factory=_default_classes)
    high_risk: list[str] = field(default_factory=lambda: list(DEFAULT_HIGH_RISK))
    # Patients: a center's metadata.csv (columns file, patient[, volume, …]) when it has one, else
    # this regular expression on the file name (its group "patient", else its first group, else the
    # whole match); without either every scan is its own patient (a volume's pages one patient).
    patient_pattern: str | None = None
    # The training center is split, and the shots drawn, by patient (a patient's scans never cross
    # parts) or by image (patients may cross parts, recorded in metrics.json: for comparison only).
    split_by: Literal["patient", "image"] = "patient"

    def __post_init__(self) -> None:
        ratios = self.split_ratios
        _need(
            len(ratios) == 3 and all(r >= 0 for r in ratios) and abs(sum(ratios) - 1) < 1e-6,
            f"data.split_ratios: {ratios} must be three non-negative fractions (train, val, test) summing to 1",
        )
        names = [c.name for c in self.classes]
        _need(len(names) >= 2, "data.classes: at least two classes are needed")
        _need(len(set(names)) == len(names), f"data.classes: duplicate class names in {names}")
        for name in self.high_risk:
            _need(name in names, f"data.high_risk: {name!r} is not a configured class ({', '.join(names)})")
        _need(self.image_size >= 32, "data.image_size must be at least 32")
        _need(self.num_workers >= 0, "data.num_workers must be >= 0")
        _need_seed(self.split_seed, "data.split_seed")
        _need_seed(self.fewshot_seed, "data.fewshot_seed")
        if self.patient_pattern is not None:
            try:
                re.compile(self.patient_pattern)
            except re.error as exc:
                raise ConfigError(
                    f"data.patient_pattern: {self.patient_pattern!r} is not a regular expression ({exc}); "
                    r"e.g. '^(P\d+)_' takes the patient from file names such as P012_scan3.png"
                ) from None
        try:  # class names that collide, aliases to unknown classes or written the wrong way round
            ClassMap(tuple(names), tuple(self.class_aliases.items()))
        except SavltError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class RoiConfig:
    # auto = the segmenter when one is given, else the classical mask.
    mask_source: Literal["auto", "classical", "segmenter", "files"] = "auto"
    segmenter: str | None = None
    # The ROI starts at the first all-tissue row at or below this fraction of the height.
    top_fraction: float = 0.1

    def __post_init__(self) -> None:
        _need(0 <= self.top_fraction < 1, "roi.top_fraction must lie in [0, 1)")
        _need(
            self.mask_source != "segmenter" or self.segmenter is not None,
            "roi.mask_source=segmenter needs roi.segmenter (a segmenter checkpoint folder, e.g. --segmenter seg/fold0)",
        )


@dataclass
class PeftConfig:
    type: Literal["lora", "dora", "adalora", "loha", "lokr"] = "lora"
    r: int = 8
    alpha: float = 4.0
    dropout: float = 0.25
    # Adapt the last `gradual_step` vision layers; None = all of them.
    gradual_step: int | None = None
    text: bool = False
    text_r: int = 2
    text_alpha: float = 16.0
    # "published": the published code's adapter settings (AdaLoRA init_r 32, total_step 1000, no
    # rank re-allocation or orthogonality term; LoHa/LoKr module_dropout 0.1; text adapters with
    # the vision r/alpha and a trained text projection). See the README's reproduction table.
    variant: Literal["savlt", "published"] = "savlt"

    def __post_init__(self) -> None:
        _need(self.r >= 1 and self.text_r >= 1, "peft.r and peft.text_r must be >= 1")
        _need(0 <= self.dropout < 1, "peft.dropout must lie in [0, 1)")
        _need(self.gradual_step is None or self.gradual_step >= 1, "peft.gradual_step must be >= 1")


@dataclass
class ModelConfig:
    # A Hugging Face CLIP hub id (read from the local cache), a local folder (Hugging Face or
    # open_clip), hf-hub:ORG/NAME (an open_clip model such as BiomedCLIP, from the local cache),
    # open_clip:ARCH (with model.weights), tiny-oct (shipped), or a built-in random model (tiny,
    # tiny-openclip, …; for demos and tests). See the README's "Medical CLIP backbones".
    backbone: str = "openai/clip-vit-base-patch16"
    # The local weights file of an open_clip:ARCH backbone.
    weights: str | None = None
    pooling: Pooling = "roi"
    # Where the ROI acts: only in the pooling ("pool"); also inside the backbone, zeroing the
    # non-ROI patch tokens after every block as the published BiomedCLIP code does ("every_block");
    # or after every block and before the first, so no pixel outside the ROI reaches the ROI or
    # CLS tokens ("isolated").
    roi_masking: RoiMasking = "pool"
    heads: int = 4
    # Pool the patch tokens after the vision tower's final LayerNorm (true), or before it as the
    # published code does (false).
    token_layernorm: bool = True
    # Pooling start: identity D×D layer and N(0, 0.02) queries, or the published code's
    # xavier-uniform queries and PyTorch's default random D×D layer ("reference").
    pool_init: Literal["identity", "reference"] = "identity"
    # Weight of the prototype branch: 0 = text anchors only, 1 = prototypes only.
    alpha: float = 0.5
    inference_scale: float = 100.0
    # Reading weights is offline-first; only with this set may a missing checkpoint be fetched.
    allow_download: bool = False

    def __post_init__(self) -> None:
        _need(0 <= self.alpha <= 1, f"model.alpha: {self.alpha} must lie in [0, 1]")
        _need(self.heads >= 1, "model.heads must be >= 1")


@dataclass
class TrainConfig:
    shots: int = 16
    seed: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    min_lr: float = 1e-6
    # Total optimiser steps = n_iters * shots (the published schedule), unless max_steps is set.
    n_iters: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    val_every: int = 50
    crop_scale: list[float] = field(default_factory=lambda: [0.75, 1.0])
    hflip: bool = True
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # "full": a stream of full batches; "epoch": reshuffle every epoch and keep the short last
    # batch (published), validating only at epoch ends whose step is a multiple of val_every.
    batches: Literal["full", "epoch"] = "full"
    # Published-code quirks, off by default (see the README's reproduction table): every trainable
    # backbone tensor takes two AdamW updates per step; the model stays in eval mode (LoRA dropout
    # off) after the first validation.
    double_adapter_update: bool = False
    eval_mode_after_validation: bool = False

    def __post_init__(self) -> None:
        _need(self.shots >= 1, "train.shots must be >= 1")
        _need_seed(self.seed, "train.seed (--seed)")
        _need(self.val_every >= 1, f"train.val_every: {self.val_every} must be >= 1 (validate every N steps)")
        _need(
            self.batch_size >= 1 and self.grad_accum >= 1,
            "train.batch_size and train.grad_accum must be >= 1",
        )
        _need(self.lr > 0 and self.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
        _need(self.n_iters >= 1, "train.n_iters must be >= 1")
        _need(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1")
        _need(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            f"train.crop_scale: {self.crop_scale} must be [low, high] with 0 < low <= high <= 1",
        )
        _need(
            not (self.double_adapter_update and self.mixed_precision == "fp16"),
            "train.double_adapter_update cannot run with fp16 loss scaling: use mixed_precision no or bf16",
        )

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the run: max_steps, else n_iters × shots (the published schedule)."""
        return self.max_steps or self.n_iters * self.shots


@dataclass
class EvalConfig:
    batch_size: int = 64
    bootstrap: int = 1000
    ci_level: float = 0.95
    # Score of the high-risk screen's AUC: "probability" ranks by the probability mass on the
    # high-risk classes (computed as log-odds in float64, so confident scans do not tie);
    # "logit_sum" is the published sigmoid(Σ high-risk logits − Σ other logits).
    auc_score: Literal["probability", "logit_sum"] = "probability"
    # Scans that cannot be assessed (no finite pixel values, fewer than `min_contrast` grey levels
    # of the stored type between the 0.5th and 99.5th percentile, tissue on less than
    # `min_tissue` of the scan): left out of the metrics and counted per center ("exclude"), or
    # scored like the others ("include"). `savlt predict` never diagnoses them.
    unassessable: Literal["exclude", "include"] = "exclude"
    min_contrast: float = 8.0
    min_tissue: float = 0.05
    # A patient's class probabilities: the mean over its scans, or those of its scan with the
    # highest high-risk probability ("max_risk").
    patient_aggregate: Literal["mean", "max_risk"] = "mean"
    # The referral threshold on the calibrated high-risk probability is the highest that reaches
    # this sensitivity on the validation draw.
    target_sensitivity: float = 0.95
    # Prediction sets: split-conformal at coverage 1 − conformal_alpha, fitted on the validation
    # draw, with the LAC score (1 − p of the class: the smallest sets) or APS (the probability mass
    # ranked at or above the class: larger sets on uncertain scans).
    conformal_alpha: float = 0.1
    conformal_score: Literal["lac", "aps"] = "lac"

    def __post_init__(self) -> None:
        _need(self.bootstrap >= 0, "eval.bootstrap must be >= 0")
        _need(
            0 < self.target_sensitivity <= 1,
            f"eval.target_sensitivity: {self.target_sensitivity} must lie in (0, 1], e.g. 0.95",
        )
        _need(0 < self.ci_level < 1, "eval.ci_level must lie in (0, 1)")
        _need(
            0 < self.conformal_alpha < 1,
            f"eval.conformal_alpha: {self.conformal_alpha} must lie in (0, 1), e.g. 0.1 for 90 % coverage",
        )
        _need(self.min_contrast >= 0, "eval.min_contrast must be >= 0")
        _need(0 <= self.min_tissue < 1, "eval.min_tissue must lie in [0, 1)")


@dataclass
class SegConfig:
    """Tissue-segmenter training (``savlt seg train``)."""

    arch: Literal["unet", "pspnet", "deeplabv3plus", "linknet", "segformer"] = "unet"
    encoder: str = "resnet18"
    # "auto": ImageNet weights when they are in the local cache (as the published scripts use),
    # else from scratch with a warning; "imagenet" insists on them; a file path; None = scratch.
    encoder_weights: str | None = "auto"
    # Centers whose masks train the segmenter; None = the training center (data.train_center)
    # only, so an external test center never trains the structure prior it is evaluated with.
    centers: list[str] | None = None
    folds: int = 5
    epochs: int = 30  # the published scripts: 50 epochs of batch 256 on a GPU
    batch_size: int = 8
    lr: float = 1e-4  # Adam, as the published scripts
    image_size: int = 224
    threshold: float = 0.5
    seed: int = 0
    plateau_patience: int = 3

    def __post_init__(self) -> None:
        _need(self.folds >= 2, "seg.folds must be >= 2 (k-fold cross-validation)")
        _need(self.epochs >= 1 and self.batch_size >= 1, "seg.epochs and seg.batch_size must be >= 1")
        _need(
            self.image_size >= 32 and self.image_size % 32 == 0,
            "seg.image_size must be a multiple of 32, at least 32",
        )
        _need(0 < self.threshold < 1, "seg.threshold must lie in (0, 1)")
        _need(self.lr > 0, "seg.lr must be > 0")
        _need_seed(self.seed, "seg.seed")


@dataclass
class PretrainConfig:
    """Contrastive image–text pretraining (``savlt pretrain``) of the backbone in model.backbone."""

    # A pairs CSV (columns file, text; files relative to the CSV's folder) or a data root whose
    # class folders give each scan its class description as caption.
    pairs: str | None = None
    adapters: Literal["none", "lora"] = "none"  # none = full fine-tuning
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of the steps with a linear warm-up, then cosine decay to 0
    max_steps: int = 1000
    val_fraction: float = 0.1  # held-out pairs for image→text and text→image recall@1/5
    eval_every: int = 100
    save_every: int = 100  # a resumable checkpoint every this many steps
    seed: int = 0
    # Start the learnable temperature here (CLIP starts from scratch at 0.07); None keeps the
    # backbone's own, as for an already pretrained CLIP.
    init_temperature: float | None = None
    # End after this many steps although the learning-rate schedule spans max_steps (the same
    # trajectory, stopped early); None = max_steps.
    stop_after: int | None = None

    def __post_init__(self) -> None:
        _need(self.batch_size >= 2, "pretrain.batch_size must be >= 2 (the loss contrasts pairs in a batch)")
        _need(
            self.grad_accum >= 1 and self.max_steps >= 1,
            "pretrain.grad_accum and pretrain.max_steps must be >= 1",
        )
        _need(
            self.lr > 0 and self.weight_decay >= 0, "pretrain.lr must be > 0 and pretrain.weight_decay >= 0"
        )
        _need(0 <= self.warmup < 1, "pretrain.warmup must lie in [0, 1)")
        _need(0 < self.val_fraction < 1, "pretrain.val_fraction must lie in (0, 1)")
        _need(
            self.eval_every >= 1 and self.save_every >= 1,
            "pretrain.eval_every and pretrain.save_every must be >= 1",
        )
        _need_seed(self.seed, "pretrain.seed")
        _need(
            self.stop_after is None or 1 <= self.stop_after <= self.max_steps,
            "pretrain.stop_after must lie in [1, pretrain.max_steps]",
        )
        _need(
            self.init_temperature is None or 0.01 <= self.init_temperature <= 1,
            "pretrain.init_temperature must lie in [0.01, 1] (CLIP starts at 0.07)",
        )


@dataclass
class Config:
    method: str = "savlt"
    data: DataConfig = field(default_factory=DataConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        _need(self.method in METHODS, f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        _need(
            self.model.roi_masking == "pool" or self.model.pooling != "attn",
            f"model.roi_masking={self.model.roi_masking} needs ROI or CLS pooling (model.pooling=roi or cls), "
            "not attention pooling over every patch",
        )

    @property
    def method_spec(self) -> Method:
        """The entry of ``savlt.methods.METHODS`` this run uses."""
        return METHODS[self.method]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.data.classes]

    def class_map(self) -> ClassMap:
        """How class folders map onto the configured classes (names plus user aliases)."""
        return ClassMap(tuple(self.class_names), tuple(self.data.class_aliases.items()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def get(self, key: str) -> Any:
        """Value at a dotted key, e.g. ``cfg.get("train.shots")``."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value


# ---------------------------------------------------------------- loading and validation


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=5e-4"`` -> ("train.lr", 0.0005); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=5e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "class_aliases":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one YAML value against a type hint; errors name the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):  # a path given as a value (CLI flag, Python API)
            return os.fspath(value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _apply_method(tree: dict[str, Any], user_keys: dict[str, Any]) -> None:
    """Fix the values a method defines; an explicit conflicting setting is an error."""
    method = tree.get("method", Config.method)
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    for key, value in METHODS[method].fixed().items():
        if key in user_keys and user_keys[key] != value:
            raise ConfigError(
                f"method {method} fixes {key}={value!r}, but the configuration sets {key}={user_keys[key]!r}; "
                "remove that setting or choose another method"
            )
        set_dotted(tree, key, value)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Validate a (possibly partial) nested mapping into a Config."""
    tree = dict(tree)
    _apply_method(tree, _flatten(tree))
    return _build(Config, tree, "")


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of `path`; a missing, unreadable or non-UTF-8 file, a directory in its place
    or bad YAML is a ConfigError naming `what` and the file."""
    text = read_text(path, what, ConfigError)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults <- YAML file <- `values` <- ``key=value`` overrides, checked into a Config.

    `values` maps dotted keys to Python values taken as they are (a path stays a path, whatever
    its name); `overrides` are ``key=value`` strings whose values are read as YAML (``--set``).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    for key, value in (values or {}).items():
        set_dotted(tree, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        where = f" (from {path})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None


# ---------------------------------------------------------------- the command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE``, the same on every command that reads a Config."""
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=5e-4 (applied last)",
    )


def config_from_args(args: argparse.Namespace, flags: Mapping[str, Any] | None = None) -> Config:
    """Defaults <- --config YAML <- the command's own flags (dotted key -> value; None = not
    given) <- --set key=value."""
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    return load_config(args.config, args.set, given)
