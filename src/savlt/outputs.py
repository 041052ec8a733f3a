"""The folders SAVLT writes: every kind with the files it writes, how a folder made before
manifests is recognised, and the one way a command claims its output folder (docs/outputs.md: "What SAVLT
writes and never touches").

A folder is SAVLT's when its manifest (``savlt.io``) says so or, made before manifests, when it
holds every file its kind always wrote, each with the content SAVLT gave it (a ``config.yaml``
that SAVLT reads as its configuration, a JSON object, …): a user's folder holding files of the
same names is not taken for one. A file in a SAVLT folder is SAVLT's when it matches its kind's
layout and, once the folder's manifest lists what was written, is listed there, or when it is one
that a later command adds (``Kind.later``: ``seg evaluate``'s report, a sweep's summary); a link
never is. Nothing else is ever deleted, replaced, or recorded as SAVLT's.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from savlt.config import load_config
from savlt.errors import SavltError
from savlt.io import (
    BOOKKEEPING,
    LOCK_NAME,
    SET_ASIDE_NAME,
    OutputError,
    check_inputs_outside,
    check_outside_data,
    exclusive,
    folder_entries,
    is_scratch,
    read_manifest,
    shown_entries,
    writable_folder,
    write_manifest,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ content checks


def _savlt_config(path: Path) -> bool:
    try:
        load_config(path)
    except (SavltError, OSError):
        return False
    return True


def _json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _sweep_file(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("points"), list) and "grid" in data


def _a_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


# ------------------------------------------------------------------------------ the kinds


@dataclass(frozen=True)
class Kind:
    name: str  # the manifest's kind
    what: str  # the folder, in words
    noun: str  # what it holds, in words
    layout: tuple[str, ...]  # the files it writes: relative paths, ``*`` standing for part of a name
    # a folder of this kind made before manifests: files it always holds, each with its check
    old_style: tuple[tuple[str, Callable[[Path], bool]], ...] = ()
    nested: tuple[str, ...] = ()  # kinds of SAVLT folder it may hold, judged by their own layout
    later: tuple[str, ...] = ()  # what other commands add to a finished one (never listed in it)


FIGURES = ("confusion_*.png", "roc_*.png", "reliability_*.png")
EVALUATION_LAYOUT = ("evaluate.log", "metrics.json", "report.md", "predictions/*.csv", *FIGURES)
KINDS = {
    kind.name: kind
    for kind in (
        Kind(
            "run",
            "run folder",
            "a run",
            (
                "config.yaml",
                "split.json",
                "fewshot.json",
                "train.log",
                "history.jsonl",
                "adapter.safetensors",
                "calibration.json",
                "metrics.json",
                "report.md",
                "predictions/*.csv",
                "training_curves.png",
                *FIGURES,
                # a run made before manifests holds its evaluation, made before them too, here
                *(f"evaluation/{pattern}" for pattern in EVALUATION_LAYOUT),
            ),
            (("config.yaml", _savlt_config), ("split.json", _json_object), ("fewshot.json", _json_object)),
            nested=("evaluation",),
        ),
        Kind(
            "evaluation",
            "evaluation folder",
            "an evaluation",
            EVALUATION_LAYOUT,
            (("evaluate.log", _a_file), ("metrics.json", _json_object)),
        ),
        Kind(
            "segmenter-training",
            "segmenter folder",
            "a segmenter training",
            (
                "config.yaml",
                "folds.json",
                "summary.json",
                "curves.png",
                "report.md",
                "fold*/model.safetensors",
                "fold*/segmenter.json",
                "fold*/history.json",
            ),
            (("config.yaml", _savlt_config), ("folds.json", _json_object)),
            # ``seg evaluate`` writes its report into the folder, or a fold's, by default
            later=("roi_quality.json", "roi_quality.md", "fold*/roi_quality.json", "fold*/roi_quality.md"),
        ),
        Kind(
            "pretraining",
            "pretraining folder",
            "a pretraining",
            (
                "config.yaml",
                "history.jsonl",
                "pretrain.log",
                "checkpoint/state.json",
                "checkpoint/trained.safetensors",
                "checkpoint/optimizer.pt",
                "README.md",
                # a Hugging Face CLIP folder: model (one file, or shards and their index), tokenizer
                # and image processor
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "model-*-of-*.safetensors",
                "model.safetensors.index.json",
                "preprocessor_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "added_tokens.json",
                "vocab.json",
                "merges.txt",
            ),
            (
                ("config.yaml", _savlt_config),
                ("pretrain.log", _a_file),
                ("checkpoint/state.json", _json_object),
            ),
        ),
        Kind(
            "sweep",
            "sweep folder",
            "a sweep",
            (
                "sweep.yaml",
                "status.json",
                "sweep.log",
                "points/*.yaml",
                "logs/*.log",
                ".sweep.lock",  # the lock of a sweep made before manifests
            ),
            (("sweep.yaml", _sweep_file), ("status.json", _json_object)),
            nested=("run",),
            # written once the sweep has ended
            later=("summary.csv", "summary.md", "summary.png", "summary_center-*.png", "ranking.csv"),
        ),
        Kind(
            "synth",
            "synthetic data folder",
            "a synthetic data set",
            (
                "*/images/*/*",
                "*/masks/*/*.png",
                "*/metadata.csv",
                "preview.png",
                "pairs.csv",
                "images/*/*.png",
            ),
        ),
    )
}


def is_complete(run_folder: str | Path) -> bool:
    """True when the folder holds a finished run or evaluation (metrics.json with "complete": true)."""
    try:
        return json.loads((Path(run_folder) / "metrics.json").read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def folder_kind(folder: str | Path) -> str | None:
    """What SAVLT wrote `folder` as: its manifest's kind, or the kind whose every file of a folder
    made before manifests it holds, with their content (``Kind.old_style``); None: not SAVLT's."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest["kind"]
    for kind in KINDS.values():
        if kind.old_style and all(check(folder / name) for name, check in kind.old_style):
            return kind.name
    return None


def describe(folder: Path, unknown: str = "files SAVLT did not write") -> str:
    """What `folder` holds, in words (`unknown` when it is not SAVLT's), with its first entries."""
    kind = folder_kind(folder)
    manifest = read_manifest(folder) or {}
    if kind is None:
        what = unknown
    elif kind not in KINDS:  # written by another version of SAVLT
        what = f"a SAVLT {kind} folder"
    elif kind == "run":
        what = "a finished run" if is_complete(folder) else "an unfinished run"
    elif kind == "evaluation":
        what = "an evaluation" + (f" of the run {manifest['run']}" if manifest.get("run") else "")
    elif manifest and "files" not in manifest:
        what = "an unfinished " + KINDS[kind].noun.split(" ", 1)[1]
    else:
        what = KINDS[kind].noun
    return f"{what} ({shown_entries(folder)})"


# ------------------------------------------------------------------------------ whose files


def _matches(parts: tuple[str, ...], pattern: str) -> bool:
    wanted = pattern.split("/")
    return len(wanted) == len(parts) and all(fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


def sorted_files(folder: str | Path, kind: str, inside_nested: bool = True) -> tuple[list[str], list[Path]]:
    """(the files below `folder` that SAVLT wrote there as a folder of `kind`, as relative POSIX
    paths; every other file and link). A subfolder that is a SAVLT folder of a kind `kind` may
    hold is left out of the first list, and judged by its own kind for the second unless not
    `inside_nested`; bookkeeping and scratch files are left out of both."""
    folder = Path(folder)
    manifest = read_manifest(folder) or {}
    listed = set(manifest["files"]) if isinstance(manifest.get("files"), list) else None
    layout, nested, later = KINDS[kind].layout, KINDS[kind].nested, KINDS[kind].later
    mine: list[str] = []
    others: list[Path] = []

    def savlts(rel: tuple[str, ...]) -> bool:
        written = any(_matches(rel, p) for p in layout) and (listed is None or "/".join(rel) in listed)
        return written or any(_matches(rel, p) for p in later)

    def visit(current: Path, parts: tuple[str, ...]) -> None:
        for entry in sorted(current.iterdir()):
            rel = (*parts, entry.name)
            if entry.name in BOOKKEEPING or is_scratch(entry.name):
                continue
            if entry.is_symlink():
                others.append(entry)
            elif entry.is_dir():
                inner = folder_kind(entry) if nested else None
                if inner in nested:
                    others.extend(sorted_files(entry, inner)[1] if inside_nested else [])  # type: ignore[arg-type]
                else:
                    visit(entry, rel)
            elif savlts(rel):
                mine.append("/".join(rel))
            else:
                others.append(entry)

    visit(folder, ())
    return mine, others


def check_foreign(folder: Path, kind: str, action: str) -> None:
    """Refuse to `action` `folder`, a SAVLT folder of `kind`, while it holds a file SAVLT did not
    write there: "replaced" or "wiped" (what the SAVLT folders in it hold counts too), "continued"
    (they are left alone)."""
    foreign = sorted_files(folder, kind, inside_nested=action != "continued")[1]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputError(
            f"{KINDS[kind].what} {folder} holds {foreign[0]}{more}, which SAVLT did not write there, so it "
            f"is not {action}: move such files out, or choose another output folder"
        )


# ------------------------------------------------------------------------------ claiming a folder


def check_claim(
    folder: str | Path,
    kind: str,
    *,
    continues: Callable[[Path], bool] | None = None,
    replaces: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    replaceable: Collection[str] = (),
    roots: Mapping[str, Sequence[str | Path | None]] | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
    advice: str = "choose another --out",
    unknown: str = "files SAVLT did not write",
) -> bool:
    """Whether a command writing a folder of `kind` may write `folder`, and how: False to write a
    missing or empty folder, or (without `overwrite`) to continue a folder of its kind that
    `continues` accepts, holding nothing SAVLT did not write; True to replace one that `replaces`
    accepts, or with `overwrite` one of a kind in `replaceable`, holding nothing SAVLT did not
    write and none of `inputs` (name -> path). Anything else is an OutputError saying what the folder holds (`unknown` for what
    is not SAVLT's) and `advice`, as is a folder in, around or over one of `roots` (the roots, in
    words -> paths: "the data root" -> [DATA]). Nothing is written."""
    folder = Path(folder)
    spec = KINDS[kind]
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{spec.what} {folder} is an existing file, not a folder: {advice}")
    for words, paths in (roots or {}).items():
        check_outside_data(folder, paths, spec.what, words)
    if not folder.is_dir() or not folder_entries(folder):
        return False
    found = folder_kind(folder)
    if found == kind and replaces is not None and replaces(folder):
        pass
    elif overwrite and replaceable:
        if found not in replaceable:
            nouns = " or ".join(KINDS[k].noun.split(" ", 1)[1] for k in replaceable)
            raise OutputError(
                f"{spec.what} {folder} holds {describe(folder, unknown)}, not a SAVLT {nouns}, so it is "
                f"not replaced: {advice}"
            )
    elif found == kind and continues is not None and continues(folder):
        check_foreign(folder, kind, "continued")
        return False
    else:
        held = describe(folder, unknown)
        if found == kind == "run" and not is_complete(folder):
            held = held.replace("an unfinished run", "an unfinished run of another configuration", 1)
        hint = ", or pass --overwrite to replace it" if replaceable else ""
        raise OutputError(f"{spec.what} {folder} is not empty: it holds {held}: {advice}{hint}")
    check_foreign(folder, found, "replaced")  # type: ignore[arg-type]
    check_inputs_outside(folder, inputs or {})
    return True


def _remove_entries(folder: Path, what: str) -> None:
    """Delete what `folder` holds, apart from its lock and what was set aside."""
    for entry in folder.iterdir():
        if entry.name in (LOCK_NAME, SET_ASIDE_NAME):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            raise OutputError(f"cannot empty the {what} {folder}: {entry}: {exc.strerror or exc}") from None


def _move_entries(source: Path, target: Path, what: str) -> None:
    """Move what `source` holds (its lock and set-aside folder apart) into `target`."""
    for entry in source.iterdir():
        if entry.name in (LOCK_NAME, SET_ASIDE_NAME):
            continue
        try:
            entry.rename(target / entry.name)
        except OSError as exc:
            raise OutputError(f"cannot replace the {what} {source}: {entry}: {exc.strerror or exc}") from None


@contextmanager
def claim_output_folder(
    folder: str | Path,
    kind: str,
    decide: Callable[[], bool],
    committed: Callable[[], bool] = lambda: False,
    **record: Any,
) -> Iterator[None]:
    """Hold `folder` for one command writing a folder of `kind` while the block runs.

    `decide` (``check_claim``) says whether the folder may be written and whether it is replaced;
    it runs before anything is created and again once the folder's lock is held (another process
    writing it is refused at once), so nothing changed in between is lost. The manifest says
    `kind` and `record`; when the block ends without an error it lists the files SAVLT wrote (those
    of the kind's layout), and any other file found there is named in a warning and left out.
    What a replaced folder held is set aside in FOLDER/.savlt-replaced and deleted only then. When
    a user error (SavltError) stops a block that started in an empty or replaced folder before
    `committed()`, what it wrote is removed and the folder is left as it was found: what was set
    aside is put back; a folder the command created is removed."""
    folder = Path(folder)
    what = KINDS[kind].what
    decide()
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    writable_folder(folder, what)
    lock = folder / LOCK_NAME
    had_lock = lock.exists()
    aside = folder / SET_ASIDE_NAME
    undone = False
    try:
        with exclusive(lock, f"another savlt process is writing the {what} {folder} (it holds {lock})"):
            try:
                replace = decide()  # again: nothing changed since the first look is lost
            except OutputError:
                if not had_lock:
                    lock.unlink(missing_ok=True)
                undone = True
                raise
            if replace and aside.exists():  # a replacement stopped before: what it set aside stays
                _remove_entries(folder, what)
            elif replace:
                aside.mkdir()
                _move_entries(folder, aside, what)
            fresh = not folder_entries(folder)
            write_manifest(folder, kind, **record)
            try:
                yield
            except SavltError:
                if fresh and not committed():
                    _remove_entries(folder, what)
                    if aside.is_dir():
                        _move_entries(aside, folder, what)
                        aside.rmdir()
                    if not had_lock:
                        lock.unlink(missing_ok=True)
                    undone = True
                raise
            written, others = sorted_files(folder, kind, inside_nested=False)
            if others:
                more = f" and {len(others) - 1} more" if len(others) > 1 else ""
                log.warning(
                    "%s %s holds %s%s, which SAVLT did not write: left out of its manifest and never "
                    "deleted; SAVLT neither replaces nor continues the folder until they are moved out",
                    what,
                    folder,
                    others[0],
                    more,
                )
            write_manifest(folder, kind, written, **record)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        for path in created if undone else []:
            try:
                path.rmdir()
            except OSError:
                break


@contextmanager
def claim_folder(
    folder: str | Path,
    kind: str,
    *,
    committed: Callable[[], bool] = lambda: False,
    record: Mapping[str, Any] | None = None,
    **rules: Any,
) -> Iterator[None]:
    """Hold `folder` for a command writing a folder of `kind` while the block runs, by the
    `rules` of ``check_claim`` (``claim_output_folder``; `record`: more for its manifest)."""
    with claim_output_folder(
        folder, kind, lambda: check_claim(folder, kind, **rules), committed, **(record or {})
    ):
        yield
