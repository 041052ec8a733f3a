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
from collections.abc import Collection, Mapping, Sequence
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


def setting(
    default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, defines_run: bool = True
) -> Any:
    """A configuration field with its help text (shown by ``savlt config --list`` and in the
    documentation) and whether it defines a run: a field that cannot change a number (worker
    counts, cache folders, download permission) does not, so changing it keeps a finished run."""
    metadata = {"help": help, "defines_run": defines_run}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ClassSpec:
    name: str = setting(help="class name: the class folder's name (or an alias of it)")
    description: str = setting(help="the class's text description, the prompt of its text anchor")


def _default_classes() -> list[ClassSpec]:
    return [ClassSpec(name, text) for name, text in DEFAULT_CLASSES.items()]


@dataclass
class DataConfig:
    root: str | None = setting(None, help="the data root: one folder per center, each with images/<class>/")
    train_center: str = setting("mixed", help="the center whose split trains, validates and tests internally")
    test_centers: list[str] | None = setting(
        None, help="external test centers; null = every center under root other than train_center"
    )
    split_ratios: list[float] = setting(
        help="train, validation and test fractions of the training center", factory=lambda: [0.45, 0.15, 0.40]
    )
    split_seed: int = setting(
        0, help="seed of the split, apart from training's so every training seed meets the same test set"
    )
    split_file: str | None = setting(
        None, help="a split.json to use instead of drawing one (paths inside the data root)"
    )
    cache_dir: str | None = setting(
        None,
        help="where splits and few-shot lists are cached; null = <root>/.savlt (skipped if not writable)",
        defines_run=False,
    )
    image_size: int = setting(224, help="side of the square image the backbone sees, in pixels")
    normalize: Literal["backbone", "clip", "imagenet"] = setting(
        "backbone",
        help="pixel normalisation: the backbone's own statistics (CLIP's for OpenAI CLIP and BiomedCLIP, an "
        "open_clip folder's preprocess_cfg), CLIP's, or ImageNet's (what the published code uses)",
    )
    fewshot_seed: int | None = setting(
        None,
        help="seed of the few-shot draw; null = train.seed (every seed draws its own shots); the published "
        "code fixes one draw (42) for every training seed",
    )
    fewshot_sampler: Literal["savlt", "published"] = setting(
        "savlt",
        help="how the shots are drawn: savlt = K per class spread over patients (numpy, seeded); published = "
        "the published code's draw, per image (Dassl's generate_fewshot_dataset: Python's random seeded "
        "with the draw seed, random.sample per class in the split's order, random.choices with repeats "
        "for a class with fewer than K)",
    )
    fewshot_file: str | None = setting(
        None,
        help="a few-shot JSON to use instead of drawing one (savlt fewshot import's, or a run's "
        "fewshot.json): drawn from the run's split, with K = train.shots; the draw settings are then unused",
    )
    num_workers: int = setting(
        2,
        help="data-loader worker processes (a scan's augmentation is seeded by the sampler, so the numbers "
        "do not depend on it)",
        defines_run=False,
    )
    class_aliases: dict[str, str] = setting(
        help="folder name -> class name, for centers whose class folders are named otherwise", factory=dict
    )
    classes: list[ClassSpec] = setting(
        help="the classes in order, each with its name and text description", factory=_default_classes
    )
    high_risk: list[str] = setting(
        help="the classes that are referred (the high-risk screen)", factory=lambda: list(DEFAULT_HIGH_RISK)
    )
    patient_pattern: str | None = setting(
        None,
        help="regular expression taking the patient from a file name (group 'patient', else the first "
        "group, else the match) when a center has no metadata.csv; without either every scan is its own "
        "patient (a volume's pages one patient)",
    )
    shot_imbalance: float | None = setting(
        None,
        help="protocol=realistic: null draws the K × C shots from the training part's class distribution; "
        "r >= 1 makes the class sizes fall geometrically from the largest to r times fewer",
    )
    split_by: Literal["patient", "image"] = setting(
        "patient",
        help="split the training center and draw the shots by patient (a patient's scans never cross "
        "parts) or by image (patients may cross parts, recorded in metrics.json: for comparison only)",
    )

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
        _need(
            self.shot_imbalance is None or self.shot_imbalance >= 1,
            f"data.shot_imbalance: {self.shot_imbalance} must be null or a ratio >= 1 (largest / smallest class)",
        )
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
    mask_source: Literal["auto", "classical", "segmenter", "files"] = setting(
        "auto",
        help="where the tissue masks come from: auto = the segmenter when one is given, else the classical "
        "mask; files = each center's masks/ folder",
    )
    segmenter: str | None = setting(
        None, help="a segmenter checkpoint folder (savlt seg train), e.g. seg/fold0"
    )
    top_fraction: float = setting(
        0.1, help="the ROI starts at the first all-tissue row at or below this fraction of the height"
    )
    mask_timing: Literal["scan", "crop"] = setting(
        "scan",
        help="when the tissue mask is made: once per scan, then cropped and flipped with it (scan), or by the "
        "segmenter on each model input, the normalised and augmented crop, in training and evaluation (crop: "
        "the published code's way; needs the segmenter mask source)",
    )
    patch_rule: Literal["savlt", "published"] = setting(
        "savlt",
        help="a patch is in the ROI when wholly inside its box, compared with a 1e-6 tolerance (savlt) or "
        "exactly in float64 as the published code does (published: drops the patch row on the box edge at "
        "a few heights); a box without a whole patch uses the whole image, counted as a fallback",
    )

    def __post_init__(self) -> None:
        _need(0 <= self.top_fraction < 1, "roi.top_fraction must lie in [0, 1)")
        _need(
            self.mask_source != "segmenter" or self.segmenter is not None,
            "roi.mask_source=segmenter needs roi.segmenter (a segmenter checkpoint folder, e.g. --segmenter seg/fold0)",
        )
        _need(
            self.mask_timing == "scan"
            or (self.mask_source in ("segmenter", "auto") and self.segmenter is not None),
            f"roi.mask_timing=crop runs the segmenter on each model input, but roi.mask_source={self.mask_source} "
            f"{'has no segmenter' if self.mask_source in ('segmenter', 'auto') else 'is not the segmenter'}: give "
            "one with --segmenter DIR (and roi.mask_source segmenter or auto), or set roi.mask_timing=scan",
        )


@dataclass
class PeftConfig:
    type: Literal["lora", "dora", "adalora", "loha", "lokr"] = setting(
        "lora", help="the low-rank adapter family on the vision (and text) tower"
    )
    r: int = setting(8, help="rank of the vision adapters")
    alpha: float = setting(4.0, help="scaling numerator of the vision adapters (LoRA's alpha)")
    dropout: float = setting(0.25, help="dropout on the adapters' input")
    gradual_step: int | None = setting(
        None, help="adapt only the last this many vision layers; null = all of them"
    )
    text: bool = setting(False, help="adapt the text tower too")
    text_r: int = setting(2, help="rank of the text adapters")
    text_alpha: float = setting(16.0, help="scaling numerator of the text adapters")
    variant: Literal["savlt", "published"] = setting(
        "savlt",
        help="published = the published code's adapter settings (AdaLoRA init_r 32, total_step 1000, no "
        "rank re-allocation or orthogonality term; LoHa/LoKr module_dropout 0.1; text adapters with the "
        "vision r/alpha and a trained text projection)",
    )

    def __post_init__(self) -> None:
        _need(self.r >= 1 and self.text_r >= 1, "peft.r and peft.text_r must be >= 1")
        _need(0 <= self.dropout < 1, "peft.dropout must lie in [0, 1)")
        _need(self.gradual_step is None or self.gradual_step >= 1, "peft.gradual_step must be >= 1")


@dataclass
class ModelConfig:
    backbone: str = setting(
        "openai/clip-vit-base-patch16",
        help="a Hugging Face CLIP hub id (from the local cache), a local folder (Hugging Face or open_clip), "
        "hf-hub:ORG/NAME (an open_clip model such as BiomedCLIP, from the local cache), open_clip:ARCH "
        "(with model.weights), tiny-oct (shipped), or a built-in random model (tiny, tiny-openclip, …)",
    )
    weights: str | None = setting(None, help="the local weights file of an open_clip:ARCH backbone")
    pooling: Pooling = setting(
        "roi",
        help="how patch tokens become the image feature: roi = attention pooling over the ROI's patch "
        "tokens, cls = the CLS token, attn = attention pooling over every patch (a method may fix it)",
    )
    roi_masking: RoiMasking = setting(
        "pool",
        help="where the ROI acts: only in the pooling (pool); also zeroing the non-ROI patch tokens after "
        "every block as the published BiomedCLIP code does (every_block); or before the first block too, so "
        "no pixel outside the ROI reaches the ROI or CLS tokens (isolated)",
    )
    heads: int = setting(4, help="attention heads of the ROI pooling")
    token_layernorm: bool = setting(
        True,
        help="pool the patch tokens after the vision tower's final LayerNorm (true) or before it as the "
        "published code does (false)",
    )
    pool_init: Literal["identity", "reference"] = setting(
        "identity",
        help="pooling start: an identity D×D layer and N(0, 0.02) queries, or the published code's "
        "xavier-uniform queries and PyTorch's default random D×D layer (reference)",
    )
    alpha: float = setting(
        0.5, help="weight of the prototype branch: 0 = text anchors only, 1 = prototypes only"
    )
    inference_scale: float | None = setting(
        100.0,
        help="logit scale of the cosine similarities at inference; null = the backbone's learned logit scale "
        "(what the published BiomedCLIP variant evaluates with)",
    )
    allow_download: bool = setting(
        False,
        help="weights are read offline; only with this set may a missing checkpoint be fetched",
        defines_run=False,
    )

    def __post_init__(self) -> None:
        _need(0 <= self.alpha <= 1, f"model.alpha: {self.alpha} must lie in [0, 1]")
        _need(self.heads >= 1, "model.heads must be >= 1")


@dataclass
class TrainConfig:
    shots: int = setting(16, help="K: labelled training scans per class")
    seed: int = setting(5, help="training seed (and the few-shot draw's when data.fewshot_seed is null)")
    lr: float = setting(1e-3, help="AdamW learning rate, cosine-annealed to min_lr")
    weight_decay: float = setting(1e-4, help="AdamW weight decay")
    min_lr: float = setting(1e-6, help="learning rate at the end of the cosine schedule")
    n_iters: int = setting(
        10, help="optimiser steps = n_iters × shots (the published schedule), unless max_steps is set"
    )
    max_steps: int | None = setting(None, help="optimiser steps of the run, instead of n_iters × shots")
    batch_size: int = setting(32, help="scans per optimiser step (per process, before grad_accum)")
    grad_accum: int = setting(1, help="batches accumulated into one optimiser step")
    val_every: int = setting(50, help="validate (and record the validation loss) every this many steps")
    crop_scale: list[float] = setting(
        help="area range [low, high] of the random resized crop", factory=lambda: [0.75, 1.0]
    )
    hflip: bool = setting(True, help="random horizontal flips in training")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = setting(
        "auto", help="training precision; auto = bf16 on a GPU that has it, else full precision"
    )
    batches: Literal["full", "epoch"] = setting(
        "full",
        help="full: a stream of full batches; epoch: reshuffle every epoch and keep the short last batch "
        "(published), validating only at epoch ends whose step is a multiple of val_every",
    )
    double_adapter_update: bool = setting(
        False, help="published-code quirk: every trainable backbone tensor takes two AdamW updates per step"
    )
    eval_mode_after_validation: bool = setting(
        False,
        help="published-code quirk: the model stays in eval mode (LoRA dropout off) after the first "
        "validation",
    )

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
    batch_size: int = setting(64, help="scans per forward pass when scoring")
    bootstrap: int = setting(
        1000,
        help="bootstrap resamples (by patient) for the AUC and macro-F1 intervals (0: none); proportions "
        "always get Wilson intervals",
    )
    ci_level: float = setting(0.95, help="level of every confidence interval")
    auc_score: Literal["probability", "logit_sum", "logit_sum_float32"] = setting(
        "probability",
        help="score of the high-risk screen's AUC: probability = the probability mass on the high-risk "
        "classes (as float64 log-odds, so confident scans do not tie); logit_sum = the published "
        "sigmoid(Σ high-risk logits − Σ other logits), ranked in float64; logit_sum_float32 = the published "
        "score exactly, a float32 softmax of the model's logits that ties confident scans at 1.0",
    )
    transform: Literal["deterministic", "train"] = setting(
        "deterministic",
        help="the evaluation's input: a deterministic resize, or the random training crop and flip seeded per "
        "scan (train: what the published code evaluates with; repeatable, but each scan sees a random crop); "
        "savlt predict and the service always use the resize",
    )
    unassessable: Literal["exclude", "include"] = setting(
        "exclude",
        help="scans that cannot be assessed (no finite pixels, too few grey levels, too little tissue): left "
        "out of the metrics and counted per center (exclude), or scored like the others (include); savlt "
        "predict never diagnoses them",
    )
    min_contrast: float = setting(
        8.0,
        help="an assessable scan has at least this many grey levels between its 0.5th and 99.5th percentile",
    )
    min_tissue: float = setting(0.05, help="an assessable scan shows tissue on at least this fraction")
    patient_aggregate: Literal["mean", "max_risk"] = setting(
        "mean",
        help="a patient's class probabilities: the mean over its scans, or those of its scan with the "
        "highest high-risk probability (max_risk)",
    )
    target_sensitivity: float = setting(
        0.95,
        help="the referral threshold is the highest calibrated high-risk probability reaching this "
        "sensitivity on the validation draw (established only with at least ⌈1/(1 − target)⌉ high-risk "
        "validation scans)",
    )
    conformal_alpha: float = setting(
        0.1, help="prediction sets are split-conformal at coverage 1 − conformal_alpha (validation draw)"
    )
    conformal_score: Literal["lac", "aps"] = setting(
        "lac",
        help="conformal score: lac (1 − p of the class: the smallest sets, may be empty) or aps (the "
        "probability mass ranked at or above the class: larger sets on uncertain scans)",
    )

    figures: bool = setting(
        True,
        help="draw the run report's figures (confusion, ROC, reliability, training curves); a sweep of many "
        "runs may leave them out, the numbers are the same",
        defines_run=False,
    )

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
class BaselinesConfig:
    """Settings of the feature-based baselines (``savlt.engine.baselines``); the rest of each
    method's schedule is its published one (README, "Methods")."""

    views: int = setting(
        10,
        help="augmented training views per few-shot scan whose frozen features the feature-based methods "
        "train on (Tip-Adapter's augment_epoch); computed once per scan and cached",
    )
    tip_alpha: float = setting(
        1.0, help="Tip-Adapter's cache weight α: the start of the validation search, fixed without one"
    )
    tip_beta: float = setting(
        1.0, help="Tip-Adapter's affinity sharpness β: the start of the validation search, fixed without one"
    )
    clip_adapter_ratio: float = setting(0.2, help="CLIP-Adapter's residual ratio r: f' = r·A(f) + (1 − r)·f")
    clap_constraint: Literal["l2", "adaptive"] = setting(
        "l2",
        help="CLAP's class-wise penalty multipliers: l2 = fixed at the zero-shot confidence of each class "
        "(the paper's runs), adaptive = also updated after every epoch by the augmented Lagrangian (PHR) rule",
    )

    def __post_init__(self) -> None:
        _need(self.views >= 1, "baselines.views must be >= 1")
        _need(0 <= self.clip_adapter_ratio <= 1, "baselines.clip_adapter_ratio must lie in [0, 1]")
        _need(self.tip_beta > 0, "baselines.tip_beta must be > 0")


# BiomedCoOp's prompt ensemble shipped with SAVLT: descriptions of the default classes in cervical
# OCT (also at configs/prompt_ensemble_oct.yaml).
DEFAULT_ENSEMBLE = Path(__file__).resolve().parent / "ensembles" / "cervical_oct.yaml"


@dataclass
class PromptsConfig:
    """Settings of the prompt-learning methods (coop, kgcoop, cocoop, biomedcoop); the rest of each
    method's schedule is its published one (README, "Prompt learning")."""

    n_ctx: int | None = setting(
        None,
        help="context vectors of a context started at random; null = the method's published count (CoOp 16, "
        "the others 4); a context started from a phrase has the phrase's token count",
    )
    init: str | None = setting(
        None,
        help="the phrase whose token embeddings start the context, or random (N(0, 0.02²)); null = the "
        "method's published start (CoOp random, the others 'a photo of a')",
    )
    class_specific: bool = setting(False, help="one context per class (CoOp's CSC) instead of one shared")
    class_text: Literal["name", "description"] = setting(
        "name",
        help="what follows the context in each prompt: the class name (underscores as spaces, as CoOp) or the "
        "class description of data.classes",
    )
    kgcoop_weight: float = setting(
        8.0, help="KgCoOp's λ on 1 − mean cos(learnt, hand-written class features)"
    )
    sccm_weight: float = setting(1.0, help="BiomedCoOp's weight of the MSE to the ensemble's mean features")
    kdsp_weight: float = setting(1.0, help="BiomedCoOp's weight of the KL to the ensemble's zero-shot logits")
    tau: float = setting(1.5, help="BiomedCoOp's outlier threshold on the prompts' standardised scores")
    ensemble: str | None = setting(
        None,
        help="BiomedCoOp's prompt ensemble: a YAML file mapping every class name to a list of descriptions "
        "(the same number per class); null = the cervical-OCT ensemble shipped with SAVLT "
        "(configs/prompt_ensemble_oct.yaml)",
    )
    cocoop_batch: int = setting(
        1, help="CoCoOp's batch size (published: 1; its per-image prompts are batched)"
    )

    def __post_init__(self) -> None:
        _need(self.n_ctx is None or self.n_ctx >= 1, "prompts.n_ctx must be >= 1")
        _need(
            min(self.kgcoop_weight, self.sccm_weight, self.kdsp_weight) >= 0,
            "prompts.kgcoop_weight, sccm_weight and kdsp_weight must be >= 0",
        )
        _need(self.tau >= 1, "prompts.tau must be >= 1 (a smaller threshold can drop every description)")
        _need(self.cocoop_batch >= 1, "prompts.cocoop_batch must be >= 1")

    def ensemble_texts(self, class_names: Sequence[str]) -> dict[str, list[str]]:
        """The ensemble's descriptions of each class, in `class_names` order, read from its file."""
        path = Path(self.ensemble).expanduser() if self.ensemble else DEFAULT_ENSEMBLE
        what = f"prompts.ensemble: {path}"
        try:
            loaded = yaml.safe_load(read_text(path, "prompts.ensemble: the prompt ensemble", ConfigError))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} is not valid YAML ({' '.join(str(exc).split())})") from None
        _need(isinstance(loaded, dict), f"{what} must map each class name to a list of descriptions")
        texts: dict[str, list[str]] = {}
        for name in class_names:
            found = loaded.get(name)
            _need(
                isinstance(found, list)
                and len(found) >= 2
                and all(isinstance(t, str) and t.strip() for t in found),
                f"{what} has no list of at least two descriptions for class {name!r}; add one (the file names "
                f"{', '.join(map(str, loaded)) or 'no class'})",
            )
            texts[name] = found
        counts = {name: len(found) for name, found in texts.items()}
        _need(
            len(set(counts.values())) == 1,
            f"{what} must give every class the same number of descriptions (it gives {counts})",
        )
        return texts


@dataclass
class SegConfig:
    """Tissue-segmenter training (``savlt seg train``)."""

    arch: Literal["unet", "pspnet", "deeplabv3plus", "linknet", "segformer"] = setting(
        "unet", help="segmenter architecture (segmentation_models_pytorch)"
    )
    encoder: str = setting("resnet18", help="the segmenter's encoder")
    encoder_weights: str | None = setting(
        "auto",
        help="auto = ImageNet weights when they are in the local cache (as the published scripts use), "
        "else from scratch with a warning; imagenet insists on them; a file path; null = from scratch",
    )
    centers: list[str] | None = setting(
        None,
        help="centers whose masks train the segmenter; null = the training center only, so an external "
        "test center never trains the structure prior it is evaluated with",
    )
    folds: int = setting(5, help="k of the k-fold cross-validation")
    epochs: int = setting(
        30, help="training epochs per fold (the published scripts: 50 of batch 256 on a GPU)"
    )
    batch_size: int = setting(8, help="images per step")
    lr: float = setting(1e-4, help="Adam learning rate (as the published scripts)")
    image_size: int = setting(224, help="side of the square training image (a multiple of 32)")
    threshold: float = setting(0.5, help="probability above which a pixel is tissue")
    seed: int = setting(0, help="seed of the folds and of training")
    plateau_patience: int = setting(
        3, help="epochs without a better validation Dice before the learning rate is halved"
    )

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

    pairs: str | None = setting(
        None,
        help="a pairs CSV (columns file, text; files relative to the CSV's folder) or a data root whose class "
        "folders give each scan its class description as caption",
    )
    adapters: Literal["none", "lora"] = setting("none", help="none = full fine-tuning; lora = LoRA adapters")
    batch_size: int = setting(64, help="pairs per step (the loss contrasts the pairs of a batch)")
    grad_accum: int = setting(1, help="batches accumulated into one optimiser step")
    lr: float = setting(5e-4, help="AdamW peak learning rate")
    weight_decay: float = setting(0.1, help="AdamW weight decay")
    warmup: float = setting(0.05, help="fraction of the steps with a linear warm-up, then cosine decay to 0")
    max_steps: int = setting(1000, help="optimiser steps the learning-rate schedule spans")
    val_fraction: float = setting(0.1, help="held-out pairs for image→text and text→image recall@1/5")
    eval_every: int = setting(100, help="evaluate the held-out recall every this many steps")
    save_every: int = setting(100, help="write a resumable checkpoint every this many steps")
    seed: int = setting(0, help="seed of the held-out draw, the batches and the augmentation")
    init_temperature: float | None = setting(
        None,
        help="start the learnable temperature here (CLIP from scratch starts at 0.07); null keeps the "
        "backbone's own",
    )
    stop_after: int | None = setting(
        None,
        help="end after this many steps although the schedule spans max_steps (the same trajectory, stopped "
        "early; a run may be continued further later); null = max_steps",
        defines_run=False,
    )

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
    method: str = setting("savlt", help="the method, one of: " + ", ".join(METHODS))
    protocol: Literal["standard", "coop", "realistic"] = setting(
        "standard",
        help="the few-shot protocol: standard (K per class, validation min(K, 16) per class), coop "
        "(validation min(K, 4) per class) or realistic (K × C shots drawn from the class distribution, "
        "no validation set: every hyperparameter fixed in advance, no calibration)",
    )
    data: DataConfig = setting(help="the data set, its split and the few-shot draw", factory=DataConfig)
    roi: RoiConfig = setting(help="the tissue region of interest", factory=RoiConfig)
    model: ModelConfig = setting(help="the backbone and the SAVLT head", factory=ModelConfig)
    peft: PeftConfig = setting(help="the backbone's low-rank adapters", factory=PeftConfig)
    train: TrainConfig = setting(help="the few-shot training", factory=TrainConfig)
    eval: EvalConfig = setting(help="scoring, intervals, calibration and the referral", factory=EvalConfig)
    baselines: BaselinesConfig = setting(
        help="the feature-based baselines (tip_adapter, clip_adapter, lp_pp, clap, ss_text)",
        factory=BaselinesConfig,
    )
    prompts: PromptsConfig = setting(
        help="the prompt-learning methods (coop, kgcoop, cocoop, biomedcoop)", factory=PromptsConfig
    )
    seg: SegConfig = setting(
        help="tissue-segmenter training (savlt seg train); not part of a classification run's identity",
        factory=SegConfig,
    )
    pretrain: PretrainConfig = setting(
        help="contrastive pretraining (savlt pretrain); not part of a classification run's identity",
        factory=PretrainConfig,
    )

    def __post_init__(self) -> None:
        _need(self.method in METHODS, f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        _need(
            self.data.shot_imbalance is None or self.protocol == "realistic",
            "data.shot_imbalance applies to protocol=realistic only (the other protocols draw K per class)",
        )
        _need(
            self.data.fewshot_sampler == "savlt" or self.protocol != "realistic",
            "data.fewshot_sampler=published draws K scans per class: use protocol standard or coop, or "
            "data.fewshot_sampler=savlt",
        )
        _need(
            self.model.roi_masking == "pool" or self.model.pooling != "attn",
            f"model.roi_masking={self.model.roi_masking} needs ROI or CLS pooling (model.pooling=roi or cls), "
            "not attention pooling over every patch",
        )
        if self.method_spec.prompt is not None:
            phrase = self.prompt_init
            _need(
                self.prompts.n_ctx is None or not phrase,
                f"prompts.n_ctx={self.prompts.n_ctx} does not apply to a context started from the phrase "
                f"{phrase!r} (the context is its tokens): set prompts.init=random for {self.prompts.n_ctx} "
                "random context vectors, or leave prompts.n_ctx unset",
            )

    @property
    def method_spec(self) -> Method:
        """The entry of ``savlt.methods.METHODS`` this run uses."""
        return METHODS[self.method]

    @property
    def prompt_init(self) -> str:
        """The phrase starting a prompt-learning method's context ("" = random): prompts.init, else
        the method's published start."""
        style = self.method_spec.prompt
        init = self.prompts.init if self.prompts.init is not None else (style.init if style else "")
        return "" if init == "random" else init

    @property
    def prompt_n_ctx(self) -> int:
        """Context vectors of a randomly started context: prompts.n_ctx, else the method's count."""
        style = self.method_spec.prompt
        return self.prompts.n_ctx or (style.n_ctx if style else 16)

    @property
    def frozen_image_features(self) -> bool:
        """The run's image features are the frozen backbone's own (no adapters, CLS pooling, no ROI
        masking): they come from the feature cache and the run trains in well under a second."""
        return (
            not self.method_spec.adapters and self.model.pooling == "cls" and self.model.roi_masking == "pool"
        )

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.data.classes]

    def class_map(self) -> ClassMap:
        """How class folders map onto the configured classes (names plus user aliases)."""
        return ClassMap(tuple(self.class_names), tuple(self.data.class_aliases.items()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def defining(self, leave_out: Collection[str] = ()) -> dict[str, Any]:
        """``to_dict()`` without the fields that do not define a run (see ``setting``) and without
        the top-level sections in `leave_out`: what two configurations must share to make the same
        run."""
        tree = {name: value for name, value in self.to_dict().items() if name not in leave_out}
        for name, value in tree.items():
            if isinstance(value, dict) and dataclasses.is_dataclass(section := getattr(self, name)):
                for item in dataclasses.fields(section):
                    if not item.metadata["defines_run"]:
                        del value[item.name]
        return tree

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_yaml())

    def get(self, key: str) -> Any:
        """Value at a dotted key, e.g. ``cfg.get("train.shots")``."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value


# ---------------------------------------------------------------- the reference of every key


@dataclass(frozen=True)
class ConfigKey:
    """One configuration key as ``savlt config --list`` and the documentation show it."""

    key: str  # dotted, e.g. train.lr
    type: str
    default: str
    help: str
    defines_run: bool


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        item = args[0]
        if dataclasses.is_dataclass(item):
            return "list of {" + ", ".join(f.name for f in dataclasses.fields(item)) + "}"
        return f"list of {_type_name(item)}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    return getattr(hint, "__name__", str(hint))


def _default_text(value: Any) -> str:
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return "[" + ", ".join(item.name for item in value) + "] (with descriptions)"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def config_reference() -> list[ConfigKey]:
    """Every configuration key in order, with its type, default and help (from the field metadata)."""
    rows: list[ConfigKey] = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(Config)
            rows.append(_row(section, section.name, hints[section.name], value))
            continue
        hints = typing.get_type_hints(type(value))
        for item in dataclasses.fields(value):
            rows.append(
                _row(item, f"{section.name}.{item.name}", hints[item.name], getattr(value, item.name))
            )
    return rows


def _row(item: dataclasses.Field, key: str, hint: Any, default: Any) -> ConfigKey:
    return ConfigKey(
        key, _type_name(hint), _default_text(default), item.metadata["help"], item.metadata["defines_run"]
    )


def reference_markdown() -> str:
    """The reference as a Markdown table, one row per key (the documentation's configuration page)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")

    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for row in config_reference():
        meaning = row.help + ("" if row.defines_run else " *(does not define a run)*")
        lines.append(f"| `{row.key}` | {cell(row.type)} | `{cell(row.default)}` | {cell(meaning)} |")
    return "\n".join(lines) + "\n"


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
