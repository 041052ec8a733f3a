"""The run folder: its layout, whether it holds a finished run, and claiming it for a new run.

RUN/config.yaml        the full resolved configuration (a run is reproduced from it)
RUN/split.json         the training center's split; RUN/fewshot.json the K-shot draw
RUN/train.log          the log; RUN/history.jsonl loss / validation per step (written as it goes)
RUN/adapter.safetensors  the trained tensors only (see engine.checkpoint)
RUN/calibration.json   temperature and referral threshold fitted on the validation draw
RUN/metrics.json       per-center metrics (written after each center; "complete": true at the end)
RUN/predictions/<center>.csv  per-scan predictions; RUN/report.md + PNGs
RUN/.savlt.lock        held by the process writing the run

A run is written only into a folder that is missing, empty, or holds the unfinished run of the
same configuration (an interrupted attempt, which is continued); anything else is refused with
what is there, unless ``overwrite``, which empties the folder first. One process writes a run
folder at a time. This module imports no model code, so the sweep can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from savlt.config import Config, load_config
from savlt.data.transforms import normalization
from savlt.errors import SavltError
from savlt.io import OutputError, exclusive, writable_folder
from savlt.models.backbone import declared_normalization, is_built_in

LOCK_NAME = ".savlt.lock"
SHOWN = 6


class RunPaths:
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
        self.lock = self.root / LOCK_NAME


def is_complete(run_folder: str | Path) -> bool:
    """True when the folder holds a finished run (metrics.json with "complete": true)."""
    try:
        return json.loads((Path(run_folder) / "metrics.json").read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _entries(folder: Path) -> list[str]:
    """What the folder holds, apart from the lock and write probes."""
    return sorted(
        p.name for p in folder.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".write-test")
    )


# Settings naming a file or folder; relative ones are made absolute when a run starts, so its
# config.yaml works from any directory (evaluate, predict, serve).
PATH_KEYS = (
    "data.root",
    "data.cache_dir",
    "data.split_file",
    "roi.segmenter",
    "model.weights",
    "pretrain.pairs",
)


def absolute_setting(key: str, value: Any) -> Any:
    """`value` of the dotted `key`, absolute against the current directory when it is a relative
    path (``model.backbone`` only when it names an existing folder and no built-in model)."""
    if not isinstance(value, str | Path) or not str(value):
        return value
    path = Path(value).expanduser()
    if key in PATH_KEYS:
        return str(path.resolve())
    if key == "model.backbone" and not is_built_in(str(value)) and path.exists():
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


def run_identity(cfg: Config) -> dict[str, Any]:
    """The configuration as it decides a run: ``data.normalize`` as the mean and std it stands for,
    so a run saved with ``clip`` (the default before backbones brought their own) equals the same
    run with ``backbone`` on a CLIP backbone."""
    tree = cfg.to_dict()
    stats = normalization(cfg.data.normalize, declared_normalization(cfg.model.backbone))
    tree["data"]["normalize"] = [list(part) for part in stats]
    return tree


def same_run(a: Config, b: Config) -> bool:
    """Whether two configurations make the same run (see ``run_identity``)."""
    return a == b or run_identity(a) == run_identity(b)


def _same_unfinished_run(paths: RunPaths, cfg: Config) -> bool:
    if is_complete(paths.root) or not paths.config.is_file():
        return False
    try:
        return same_run(load_config(paths.config), cfg)
    except (SavltError, OSError):
        return False


def folder_conflict(paths: RunPaths, cfg: Config) -> str | None:
    """What stands in the way of writing this run into `paths.root` (None: nothing)."""
    root = paths.root
    if root.exists() and not root.is_dir():
        raise OutputError(f"run folder {root} is an existing file, not a folder: choose another --out")
    if not root.is_dir():
        return None
    entries = _entries(root)
    if not entries or _same_unfinished_run(paths, cfg):
        return None
    shown = ", ".join(entries[:SHOWN]) + (f" … ({len(entries)} entries)" if len(entries) > SHOWN else "")
    if is_complete(root):
        what = "a finished run"
    elif paths.config.is_file():
        what = "an unfinished run of another configuration"
    else:
        what = "files that are not this run's"
    return f"{what} ({shown})"


def _inside(folder: Path, other: Path) -> bool:
    """Whether `other` is `folder` or lies below it."""
    folder, other = folder.resolve(), other.resolve()
    return other == folder or folder in other.parents


def _empty(folder: Path, keep: Path) -> None:
    for entry in folder.iterdir():
        if entry == keep:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            raise OutputError(
                f"cannot empty the run folder {folder}: {entry}: {exc.strerror or exc}"
            ) from None


@contextmanager
def claim_run_folder(paths: RunPaths, cfg: Config, overwrite: bool = False) -> Iterator[None]:
    """Hold `paths.root` for this run while the block runs: refuse a folder holding anything else
    (unless `overwrite`, which empties it first), a file or a read-only place in its stead, and a
    folder another process is writing. When a user error stops a run that started in an empty
    folder before its first training step, what it wrote is removed, so fixing the error and
    running the same command again is never refused."""
    conflict = folder_conflict(paths, cfg)
    if conflict is not None and not overwrite:
        raise OutputError(
            f"run folder {paths.root} is not empty: it holds {conflict}. Choose another --out, "
            "or pass --overwrite to replace it"
        )
    if overwrite and cfg.data.root and _inside(paths.root, Path(cfg.data.root)):
        raise OutputError(
            f"--overwrite would delete the data: run folder {paths.root} holds the data root {cfg.data.root}"
        )
    writable_folder(paths.root, "run folder")
    busy = f"another savlt process is writing the run folder {paths.root} (it holds {paths.lock})"
    with exclusive(paths.lock, busy):
        if overwrite:
            _empty(paths.root, keep=paths.lock)
        fresh = not _entries(paths.root)
        try:
            yield
        except SavltError:
            if fresh and not paths.history.exists() and not paths.checkpoint.exists():
                _empty(paths.root, keep=paths.lock)
            raise
