"""The run folder: its layout, whether it holds a finished run, and claiming it for a new run or
an evaluation.

RUN/config.yaml        the full resolved configuration (a run is reproduced from it)
RUN/split.json         the training center's split; RUN/fewshot.json the K-shot draw
RUN/train.log          the log; RUN/history.jsonl loss / validation per step (written as it goes)
RUN/adapter.safetensors  the trained tensors only (see engine.checkpoint)
RUN/calibration.json   temperature and referral threshold fitted on the validation draw
RUN/metrics.json       per-center metrics (written after each center; "complete": true at the end)
RUN/predictions/<center>.csv  per-scan predictions; RUN/predictions/validation.csv those of the
                       validation draw (what the calibration was fitted on); RUN/report.md + PNGs
RUN/savlt-manifest.json  what wrote the folder and, once finished, every file it wrote (savlt.io)
RUN/.savlt.lock        held by the process writing the run

An evaluation folder (``savlt evaluate``, RUN/evaluation by default) holds evaluate.log,
metrics.json ("complete": true at the end), predictions/, report.md + PNGs and a manifest naming
the run.

A run is written only into a folder that is missing, empty, or holds the unfinished run of the
same configuration (an interrupted attempt, which is continued); an evaluation only into one that
is missing, empty or holds an evaluation of the same run (which it replaces). Anything else is
refused with what is there, unless ``overwrite``, which replaces a SAVLT run or evaluation folder
holding nothing SAVLT did not write and none of the command's inputs (``savlt.outputs``). Neither
is ever written inside, around or over the data root (an evaluation: neither the data root it
scores nor the one the run was trained on). One process writes a folder at a time. This module
imports neither torch nor transformers (the backbone registry resolves names and reads statistics
without them; tests/test_architecture.py checks it), so the sweep can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from savlt.config import Config, load_config
from savlt.errors import SavltError
from savlt.io import LOCK_NAME, MANIFEST_NAME, read_manifest
from savlt.models.backbone import resolve
from savlt.normalization import normalization
from savlt.outputs import claim_folder, is_complete

# predictions/<VALIDATION>.csv holds the validation draw's predictions, beside one file per center.
VALIDATION = "validation"


class RunPaths:
    """The paths of a run folder; what each file holds is the layout at the top of this module,
    the one description of it in the code (docs/getting-started.md shows it to the user)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.split = self.root / "split.json"
        self.few_shot = self.root / "fewshot.json"
        self.log = self.root / "train.log"
        self.history = self.root / "history.jsonl"
        self.checkpoint = self.root / "adapter.safetensors"
        self.calibration = self.root / "calibration.json"
        self.metrics = self.root / "metrics.json"
        self.predictions = self.root / "predictions"
        self.validation_predictions = self.predictions / f"{VALIDATION}.csv"
        self.manifest = self.root / MANIFEST_NAME
        self.lock = self.root / LOCK_NAME


# Settings naming a file or folder; relative ones are made absolute when a run starts, so its
# config.yaml works from any directory (evaluate, predict, serve).
PATH_KEYS = (
    "data.root",
    "data.cache_dir",
    "data.split_file",
    "data.fewshot_file",
    "roi.segmenter",
    "model.weights",
    "pretrain.pairs",
    "prompts.ensemble",
)


def absolute_setting(key: str, value: Any) -> Any:
    """`value` of the dotted `key`, absolute against the current directory when it is a relative
    path (``model.backbone`` only when it names a local folder: ``BackboneSource.local_folder``)."""
    if not isinstance(value, str | Path) or not str(value):
        return value
    path = Path(value).expanduser()
    if key in PATH_KEYS:
        return str(path.resolve())
    if key == "model.backbone" and resolve(str(value)).local_folder is not None:
        return str(path.resolve())
    return value


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with every file and folder setting absolute (see ``absolute_setting``)."""
    sections: dict[str, dict[str, Any]] = {}
    for key in (*PATH_KEYS, "model.backbone"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        resolved = absolute_setting(key, value)
        if resolved != value:
            sections.setdefault(section, {})[name] = resolved
    changed = {s: dataclasses.replace(getattr(cfg, s), **values) for s, values in sections.items()}
    return dataclasses.replace(cfg, **changed) if changed else cfg


# The sections a classification run never reads: the segmenter's and pretraining's own settings.
OTHER_COMMANDS = ("seg", "pretrain")


def run_identity(cfg: Config, leave_out: tuple[str, ...] = OTHER_COMMANDS) -> dict[str, Any]:
    """What defines a run (``Config.defining``: no worker counts, cache folders or other
    commands' sections, no ``prompts`` section for a method that has no prompts), with ``data.normalize`` as the mean and std it stands for, so a run saved
    with ``clip`` (the default before backbones brought their own) equals the same run with
    ``backbone`` on a CLIP backbone."""
    tree = cfg.defining(leave_out)
    if cfg.method_spec.prompt is None:
        tree.pop("prompts", None)  # read by the prompt-learning methods only
    stats = normalization(cfg.data.normalize, resolve(cfg.model.backbone).stats())
    tree["data"]["normalize"] = [list(part) for part in stats]
    return tree


def same_run(a: Config, b: Config, leave_out: tuple[str, ...] = OTHER_COMMANDS) -> bool:
    """Whether two configurations make the same run (see ``run_identity``); a pretraining run
    compares its own section too (`leave_out` without it)."""
    return a == b or run_identity(a, leave_out) == run_identity(b, leave_out)


def _same_unfinished_run(cfg: Config) -> Callable[[Path], bool]:
    """Whether a run folder holds the unfinished run of `cfg` (an interrupted attempt)."""

    def same(folder: Path) -> bool:
        paths = RunPaths(folder)
        if is_complete(folder) or not paths.config.is_file():
            return False
        try:
            return same_run(load_config(paths.config), cfg)
        except (SavltError, OSError):
            return False

    return same


def run_inputs(cfg: Config) -> dict[str, str]:
    """The files and folders a configuration reads (setting -> path)."""
    found = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in PATH_KEYS}
    if resolve(cfg.model.backbone).local_folder is not None:
        found["model.backbone"] = cfg.model.backbone
    return {key: str(value) for key, value in found.items() if value}


def run_folder_rules(
    cfg: Config, overwrite: bool = False, inputs: Mapping[str, str | Path] | None = None
) -> dict[str, Any]:
    """How a run of `cfg` claims its folder (``savlt.outputs.check_claim``): see the module's
    docstring; `inputs` (name -> path): files read besides the configuration's, e.g. --config."""
    return {
        "continues": _same_unfinished_run(cfg),
        "overwrite": overwrite,
        "replaceable": ("run", "evaluation"),
        "roots": {"the data root": [cfg.data.root]},
        "inputs": {**run_inputs(cfg), **(inputs or {})},
    }


@contextmanager
def claim_run_folder(
    paths: RunPaths, cfg: Config, overwrite: bool = False, inputs: Mapping[str, str | Path] | None = None
) -> Iterator[None]:
    """Hold `paths.root` for this run while the block runs (``savlt.outputs.claim_folder``, by
    ``run_folder_rules``). When a user error stops a run before its first training step, the
    folder is left as it was found, so fixing the error and running the same command again is
    never refused."""
    with claim_folder(
        paths.root,
        "run",
        committed=lambda: paths.history.exists() or paths.checkpoint.exists(),
        **run_folder_rules(cfg, overwrite, inputs),
    ):
        yield


@contextmanager
def claim_evaluation_folder(
    target: RunPaths, run: Path, cfg: Config, trained_on: str | Path | None, overwrite: bool = False
) -> Iterator[None]:
    """Hold `target.root` for an evaluation of the run folder `run` (trained on the data root
    `trained_on`) on ``cfg.data.root`` while the block runs: a missing or empty folder is
    written, an evaluation of the same run (its manifest names the run, or it is RUN/evaluation,
    also of a run moved or made before manifests) is replaced, so nothing stale stays beside the
    new one; anything else is refused unless `overwrite` (the rules of ``claim_run_folder``; the
    run folder is one of the inputs). Neither data root may hold it. A user error leaves the
    folder as it was found."""

    def of_this_run(folder: Path) -> bool:
        if folder.resolve() == (run / "evaluation").resolve():
            return True
        return (read_manifest(folder) or {}).get("run") == str(run.resolve())

    with claim_folder(
        target.root,
        "evaluation",
        record={"run": str(run.resolve())},
        replaces=of_this_run,
        overwrite=overwrite,
        replaceable=("run", "evaluation"),
        roots={"the data root": [cfg.data.root, trained_on]},
        inputs={"run folder": str(run), **run_inputs(cfg)},
    ):
        yield


def calibration_required(paths: RunPaths) -> str | None:
    """Why the run in `paths` must have its calibration.json (None: it was made before
    calibration existed, so it has none): a run with a manifest (manifests came after
    calibration) or whose metrics.json records the fit ("validation_fit") was calibrated."""
    manifest = read_manifest(paths.root)
    if manifest is not None and "files" not in manifest:
        return "this run is unfinished: run the same savlt train command again to finish it"
    if manifest is not None:
        return (
            f"the run wrote it ({paths.manifest.name} lists it): restore it from a copy of the run "
            "folder, or train the run again"
        )
    try:
        metrics = json.loads(paths.metrics.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(metrics, dict) and "validation_fit" in metrics:
        return (
            f"the run was calibrated ({paths.metrics.name} records the fit): restore it from a copy "
            "of the run folder, or train the run again"
        )
    return None
