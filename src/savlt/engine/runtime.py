"""What a command sets up before it touches a scan: the accelerator and its precision, seeding,
the log in the run folder, the backbone, model and mask source of a configuration, and the check
that every scan it will read can be decoded. Scoring and writing results is ``engine.scoring``;
the run folder itself (its layout and claiming it) is ``engine.runfolder``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from savlt.config import Config, ConfigError
from savlt.data.discover import ImageRecord
from savlt.data.masks import TissueMasks
from savlt.data.quality import Thresholds, check_scans, unreadable_error
from savlt.errors import SavltError
from savlt.io import PlainTextFormatter
from savlt.models.backbone import load_backbone
from savlt.models.savlt import SavltModel, model_from_config
from savlt.models.vision_language import VisionLanguage
from savlt.normalization import normalization
from savlt.processes import refuse_in_a_starting_worker

log = logging.getLogger("savlt")

T = TypeVar("T")


def on_main(accelerator: Accelerator, step: Callable[[], T], share: bool = False) -> T | None:
    """Run `step` on the main process only (its result is returned there, and on every process
    with `share`); a user error (SavltError) there is raised on every process, so no process
    waits for one that stopped."""
    result: T | None = None
    error: SavltError | None = None
    if accelerator.is_main_process:
        try:
            result = step()
        except SavltError as exc:
            error = exc
    if accelerator.num_processes > 1:
        shared: list[Any] = [None if error is None else str(error), result if share else None]
        broadcast_object_list(shared)
        if shared[0] is not None and error is None:
            error = SavltError(shared[0])
        if share:
            result = shared[1]
    if error is not None:
        raise error
    return result


def check_images(
    cfg: Config, records: Sequence[ImageRecord], progress: bool, consequence: str
) -> dict[Path, str]:
    """Decode every scan a run will read (and its mask when ``roi.mask_source=files``), in
    parallel, before the first step: an unreadable file stops the run with the full list. Returns
    the scans that cannot be assessed (path -> reason)."""
    masks = cfg.roi.mask_source == "files"
    unique = list({r.path: r for r in records}.values())
    checks = check_scans(
        [(r.path, r.mask_path if masks else None) for r in unique], Thresholds.of(cfg), progress
    )
    bad = [c.problem for c in checks if c.problem is not None]
    if bad:
        for problem in bad:
            log.error("%s", problem.message)
        raise unreadable_error(bad, consequence, cfg.data.root)
    flagged = {c.path: c.unassessable for c in checks if c.unassessable is not None}
    if flagged:
        scored = "left out of the metrics" if cfg.eval.unassessable == "exclude" else "scored all the same"
        log.warning(
            "%d scan(s) cannot be assessed and are %s (eval.unassessable=%s), e.g. %s: %s",
            len(flagged),
            scored,
            cfg.eval.unassessable,
            next(iter(flagged)),
            next(iter(flagged.values())),
        )
    return flagged


def make_accelerator(cfg: Config, device: str | None = None) -> Accelerator:
    """The accelerator of a command: a GPU when there is one, or `device` ("cpu" or "cuda") when
    given; either way at the precision ``train.mixed_precision`` resolves to there."""
    refuse_in_a_starting_worker()  # before joining the other processes of a distributed run
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    precision = resolved_precision(cfg, cuda)
    try:
        return Accelerator(mixed_precision=precision, cpu=not cuda)
    except ValueError as exc:  # accelerate holds one device and precision per process
        if "already been initialized" not in str(exc):
            raise
        raise SavltError(
            f"this process already runs models on another device or at another precision than this run's "
            f"({'cuda' if cuda else 'cpu'}, mixed precision {precision!r}): load it in a process of its own, "
            "or make --device and train.mixed_precision match"
        ) from None


def resolved_precision(cfg: Config, cuda: bool) -> str:
    """``train.mixed_precision`` with "auto" resolved: bf16 on a GPU that has it, else none."""
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def log_to(path: Path, enabled: bool):
    """Copy the savlt log into the run folder for the duration of a command."""
    if not enabled:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PlainTextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("savlt")
    root.addHandler(handler)
    previous = root.level
    root.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def backbone_for(cfg: Config) -> VisionLanguage:
    """The configured backbone, checked against data.image_size."""
    backbone = load_backbone(cfg.model.backbone, cfg.model.allow_download, cfg.model.weights)
    if cfg.data.image_size != backbone.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but backbone {backbone.source!r} takes "
            f"{backbone.image_size}×{backbone.image_size} inputs: set data.image_size={backbone.image_size}"
        )
    return backbone


def build_model(
    cfg: Config, device: torch.device, backbone: VisionLanguage | None = None
) -> tuple[SavltModel, str]:
    """The run's model (initialised from ``train.seed``) on `backbone`, loaded here when not given;
    returns the backbone's name."""
    backbone = backbone or backbone_for(cfg)
    torch.manual_seed(cfg.train.seed)
    return model_from_config(cfg, backbone).to(device), backbone.source


def tissue_masks(cfg: Config, model: SavltModel) -> TissueMasks:
    """The run's mask source: ``roi.mask_source``, where ``auto`` is the segmenter when one is
    given and the classical mask otherwise; a segmenter is loaded once, here, on `model`'s device.
    With ``roi.mask_timing=crop`` `model` segments each of its inputs with it (as the published
    code does) instead of taking each scan's mask cropped with the scan."""
    kind = cfg.roi.mask_source
    if kind == "auto":
        kind = "segmenter" if cfg.roi.segmenter else "classical"
    if kind != "segmenter":
        return TissueMasks(kind)
    from savlt.seg import load_segmenter  # the segmenter stack is imported only when used

    segmenter = load_segmenter(cfg.roi.segmenter, device=str(next(model.parameters()).device))
    per_input = cfg.roi.mask_timing == "crop"
    if per_input:
        stats = normalization(cfg.data.normalize, model.clip_model.normalization)
        model.input_masks = partial(segmenter.masks_of_inputs, stats=stats)
    return TissueMasks(kind, segmenter, per_input)
