"""``savlt train``: train a method on the few-shot draw into a run folder, then evaluate it.

The folder layout is described in ``savlt.engine.runfolder``; ``train`` reads as its steps: claim
and prepare the folder, draw the inputs, check that every scan decodes, build the model, fit it
(the method's fit, ``savlt.engine.fit``), save the checkpoint, calibrate on the validation draw
(``savlt.engine.calibration``), score every center, write the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from savlt.config import Config
from savlt.data.dataset import OCTDataset
from savlt.data.discover import DataError, ImageRecord
from savlt.data.prepare import cache_folder
from savlt.engine.calibration import calibrate
from savlt.engine.checkpoint import save_checkpoint
from savlt.engine.features import FeatureCache
from savlt.engine.fit import FITS, FitJob
from savlt.engine.inference import start_loader_workers
from savlt.engine.inputs import RunInputs, prepare_inputs
from savlt.engine.runfolder import VALIDATION, RunPaths, claim_run_folder, with_absolute_paths
from savlt.engine.runtime import (
    backbone_for,
    build_model,
    check_images,
    log_to,
    make_accelerator,
    on_main,
    seed_everything,
    tissue_masks,
)
from savlt.engine.scoring import Scoring, run_header, score_sets, write_predictions, write_run_report
from savlt.io import append_line, write_json
from savlt.models.adapters import parameter_counts
from savlt.models.savlt import check_prompts
from savlt.models.vision_language import VisionLanguage

log = logging.getLogger("savlt")


def _start_folder(paths: RunPaths, cfg: Config, accelerator: Accelerator) -> None:
    """Create the folder, drop what an interrupted attempt left, save the configuration."""
    if accelerator.is_main_process:
        paths.root.mkdir(parents=True, exist_ok=True)
        for stale in (paths.metrics, paths.history, paths.checkpoint, paths.calibration):
            stale.unlink(missing_ok=True)
        cfg.save(paths.config)
    accelerator.wait_for_everyone()


def _draw_inputs(cfg: Config, paths: RunPaths, accelerator: Accelerator) -> RunInputs:
    """Scan, split and draw; the main process writes the caches first, the others then read them."""
    main = accelerator.is_main_process
    inputs = on_main(accelerator, lambda: prepare_inputs(cfg))  # a data error stops every process
    accelerator.wait_for_everyone()
    if not main:
        inputs = prepare_inputs(cfg)
    if VALIDATION in inputs.eval_sets():
        raise DataError(
            f"a test center is named {VALIDATION!r}, the name of the validation draw's predictions "
            f"({paths.validation_predictions}): rename that center's folder"
        )
    if main:
        write_json(paths.split, inputs.split.to_json())
        write_json(paths.few_shot, inputs.few_shot.to_json())
    log.info(
        "method %s, %d-shot, seed %d, training center %s (%d train / %d val images), test centers %s",
        cfg.method,
        cfg.train.shots,
        cfg.train.seed,
        inputs.train_center,
        len(inputs.few_shot.train),
        len(inputs.few_shot.val),
        ", ".join(inputs.eval_sets()),
    )
    return inputs


def _touched(inputs: RunInputs) -> list[ImageRecord]:
    """Every scan of every center the run reads: the training center and the test centers."""
    centers = dict.fromkeys([inputs.train_center, *inputs.test_centers])
    return [r for name in centers for r in inputs.scan.center(name).records]


def train(
    cfg: Config,
    out: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    inputs: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Train on the few-shot draw, save the run folder, evaluate every center; returns metrics.

    `out` must be missing, empty or hold this configuration's unfinished run (which is continued);
    `overwrite` replaces a SAVLT run or evaluation folder holding nothing else, and none of the
    run's inputs: its settings' files and `inputs` (name -> path, e.g. the --config file); see
    ``claim_run_folder``. Relative paths in `cfg` are taken from the current directory and saved
    absolute."""
    cfg = with_absolute_paths(cfg)
    paths = RunPaths(out)
    accelerator = make_accelerator(cfg)
    start_loader_workers(cfg, OCTDataset)
    backbone = backbone_for(cfg)  # first: a backbone that cannot be loaded leaves no folder behind
    check_prompts(cfg, backbone)
    claim = claim_run_folder(paths, cfg, overwrite, inputs)
    with ExitStack() as hold:  # the main process holds the folder's lock for the whole run
        on_main(accelerator, lambda: hold.enter_context(claim))
        return _train(cfg, paths, accelerator, progress, backbone)


def _train(
    cfg: Config, paths: RunPaths, accelerator: Accelerator, progress: bool, backbone: VisionLanguage
) -> dict[str, Any]:
    main = accelerator.is_main_process
    _start_folder(paths, cfg, accelerator)
    with log_to(paths.log, main):
        started = time.time()
        seed_everything(cfg.train.seed)
        inputs = _draw_inputs(cfg, paths, accelerator)
        check = partial(check_images, cfg, _touched(inputs), progress, "nothing was trained")
        unassessable = on_main(accelerator, check, share=True) or {}
        drawn = [r.path for r in inputs.train_records() if r.path in unassessable]
        if drawn:
            log.warning(
                "%d scan(s) of the few-shot draw cannot be assessed (e.g. %s: %s); they are trained on as drawn",
                len(drawn),
                drawn[0],
                unassessable[drawn[0]],
            )

        model, backbone_name = build_model(cfg, accelerator.device, backbone)
        trainable, total = parameter_counts(model)
        log.info(
            "parameters: %s trainable of %s (%.2f %%)",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
        masks = tissue_masks(cfg, model)
        features = (
            FeatureCache(model, cfg, accelerator, cache_folder(cfg.data.root, cfg.data.cache_dir))
            if model.frozen_features
            else None
        )

        history: list[dict[str, Any]] = []

        def record(entry: dict[str, Any]) -> None:
            history.append(entry)
            if main:
                append_line(paths.history, json.dumps(entry))

        fit = FITS[cfg.method_spec.fit]
        fit(
            FitJob(
                model,
                cfg,
                accelerator,
                inputs.train_records(),
                inputs.val_records(),
                masks,
                record,
                progress,
                features,
            )
        )
        if main:
            save_checkpoint(model, paths.checkpoint, backbone_name, cfg.method)
        log.info("training took %.1f s", time.time() - started)
        calibration, validation = calibrate(
            model, inputs.val_records(), cfg, accelerator, masks, progress, unassessable, features
        )
        if main:
            calibration.save(paths.calibration)
            if validation is not None:  # what the temperature, threshold and sets were fitted on
                write_predictions(paths.validation_predictions, validation, cfg, unassessable, calibration)

        header = run_header(cfg, backbone_name, inputs, masks, calibration)
        scoring = Scoring(
            cfg,
            accelerator,
            masks,
            paths,
            header,
            calibration,
            unassessable,
            inputs.patient_sources(),
            progress,
            features,
        )
        metrics, results = score_sets(model, inputs.eval_sets(), scoring)
        if main:
            title = f"SAVLT run: {paths.root.name}"
            report = write_run_report(paths.root, metrics, results, cfg, history, title, calibration)
            log.info("report: %s", report)
            metrics["complete"] = True  # the marker a sweep uses to skip a finished point
            write_json(paths.metrics, metrics)
    accelerator.wait_for_everyone()
    return metrics
