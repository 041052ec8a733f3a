"""The ground floor: small helpers every layer uses (files, output folders, tables, batches, state
checks).

Nothing here imports another part of SAVLT except ``savlt.errors``, so ``data``, ``models``,
``engine``, ``report``, ``seg`` and ``sweep`` can all build on it.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from savlt.errors import SavltError

T = TypeVar("T")


class OutputError(SavltError):
    """A place SAVLT cannot write to (an existing file, a read-only folder, a folder in use)."""


class NoSpaceError(OutputError):
    """The disk (or the user's quota) is full; the message names the file that could not be written."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space_message(path: str | Path) -> str:
    return f"cannot write {path}: no space left on the device; free some space or choose another place"


# ------------------------------------------------------------------------------ file names as text


def plain_text(text: str) -> str:
    """`text` as SAVLT writes it in every CSV, JSON, report and log line (docs/data.md, "File names that are not UTF-8").

    File names are bytes on Linux and Python holds the bytes that are not UTF-8 as lone
    surrogates, which no UTF-8 file can hold. Text without them is returned unchanged; in text
    with them, each byte that is not UTF-8 is written ``\\xNN`` (its hex value) and each
    backslash ``\\x5c``, so ``name_from_text`` recovers the exact bytes.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes of the name, as os.fsencode gives them
    except UnicodeEncodeError:  # a surrogate no file name decodes to: shown, not recoverable
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def name_from_text(text: str) -> str:
    """The file name that `plain_text` wrote as `text` (`text` itself when it is no such name)."""
    if "\\x" not in text:
        return text
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m[1], 16)]), text.encode("utf-8"))
    name = raw.decode("utf-8", "surrogateescape")
    return name if plain_text(name) == text else text


def plain_json(data: Any) -> Any:
    """`data` (JSON-like) with every string, keys included, written by `plain_text`."""
    if isinstance(data, str):
        return plain_text(data)
    if isinstance(data, dict):
        return {plain_json(k): plain_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [plain_json(v) for v in data]
    return data


class PlainTextFormatter(logging.Formatter):
    """Log lines with file names written by the rule of `plain_text`."""

    def format(self, record: logging.LogRecord) -> str:
        return plain_text(super().format(record))


# ------------------------------------------------------------------------------ files


def ordinary_permissions(path: str | Path) -> None:
    """Give a file the permissions of a new file under the umask (libraries that write model
    files privately, 0600, would otherwise keep colleagues from loading a shared run)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step.

    The temporary name is private to this process, so two processes writing the same file never
    mix their bytes, and an interrupted write never leaves half a file under the real name. The
    file gets the ordinary permissions of a new file (umask), whatever the writer used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.exists():
            ordinary_permissions(tmp)
        tmp.replace(path)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise NoSpaceError(no_space_message(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically (file names in it by the rule of `plain_text`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(plain_text(text), encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, so a person can read it; file names by `plain_text`)."""
    write_text(path, json.dumps(plain_json(data), indent=1))


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a UTF-8 CSV file atomically (one header row, then `rows`; file names by `plain_text`)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([plain_text(c) if isinstance(c, str) else c for c in row] for row in rows)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a file kept as it goes (a history, a log); a full disk is an error naming it."""
    try:
        with Path(path).open("a", encoding="utf-8") as handle:
            handle.write(plain_text(line) + "\n")
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise NoSpaceError(no_space_message(path)) from None


def read_text(path: str | Path, what: str, error: type[SavltError] = SavltError) -> str:
    """The text of an input file SAVLT reads (UTF-8; a byte-order mark is allowed). A missing
    file, a directory in its place, an unreadable file or one that is not UTF-8 is `error`, one
    line naming `what` and the path."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file: give the file's path")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "save it as UTF-8"
        ) from None


def writable_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` (with its parents) and check that a file can be written in it.

    An existing file in its place, a read-only place or any other refusal of the system is an
    OutputError naming the path, instead of a traceback halfway through a command.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is an existing file, not a folder: choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write to {what} {path} ({reason}): choose a writable place") from None
    return path


def writable_file(path: str | Path, what: str = "output file") -> Path:
    """Check, before any work is done, that `path` can be written as a file (see writable_folder)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is an existing folder, not a file: choose a file name")
    writable_folder(path.parent, f"the folder of {what} {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write to {what} {path} (it is read-only): choose a writable place")
    return path


@contextmanager
def exclusive(lock: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` while the block runs; when another process holds
    it, raise OutputError(`busy`) at once. The lock dies with the process that holds it."""
    import fcntl

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = lock.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OutputError(busy) from None
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


# ------------------------------------------------------------------------------ output folders
#
# Every folder a command writes (a run, an evaluation, a segmenter training, a pretraining, a sweep,
# a synthetic data set) holds a manifest saying what wrote it, with which version, and, once the
# command has finished, which files it wrote. SAVLT recognises its own folders by it and never
# deletes anything else (``savlt.outputs``; docs/outputs.md).

MANIFEST_NAME = "savlt-manifest.json"
LOCK_NAME = ".savlt.lock"
SET_ASIDE_NAME = ".savlt-replaced"  # what a replaced folder held, until the command replacing it ends
BOOKKEEPING = frozenset({MANIFEST_NAME, LOCK_NAME, SET_ASIDE_NAME})


def savlt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("savlt")
    except PackageNotFoundError:
        return "unknown"


def is_scratch(name: str) -> bool:
    """A write probe (``writable_folder``) or a write that never finished (``atomic_path``)."""
    return name.startswith(".write-test.") or (name.startswith(".") and name.endswith(".tmp"))


def folder_entries(folder: str | Path) -> list[str]:
    """The names in `folder`, SAVLT's bookkeeping (manifest, lock, set-aside files) and scratch
    files left out."""
    return sorted(
        p.name for p in Path(folder).iterdir() if p.name not in BOOKKEEPING and not is_scratch(p.name)
    )


def shown_entries(folder: str | Path, shown: int = 6) -> str:
    """The first entries of `folder` (``folder_entries``), for a message."""
    entries = folder_entries(folder)
    return ", ".join(entries[:shown]) + (f" … ({len(entries)} entries)" if len(entries) > shown else "")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a folder SAVLT wrote; None when it has none (or one that is not SAVLT's)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def write_manifest(folder: str | Path, kind: str, files: Sequence[str] | None = None, **record: Any) -> None:
    """FOLDER's manifest: `kind`, the SAVLT version, `record` and, once the command has finished,
    the `files` it wrote (relative POSIX paths)."""
    data: dict[str, Any] = {"kind": kind, "savlt": savlt_version(), **record}
    if files is not None:
        data["files"] = list(files)
    write_json(Path(folder) / MANIFEST_NAME, data)


def contains(folder: str | Path, other: str | Path) -> bool:
    """Whether `other` is `folder` or lies below it (links resolved)."""
    folder, other = Path(folder).resolve(), Path(other).resolve()
    return other == folder or folder in other.parents


def check_outside_data(
    folder: str | Path,
    roots: Iterable[str | Path | None],
    what: str,
    data: str = "the data root",
    holding: bool = True,
) -> None:
    """Refuse an output `folder` that is a data root (`data`, in words), lies inside one or, unless
    not `holding` (for a folder whose files are only ever added to, never replaced), holds one:
    outputs mixed into a data set would be scanned as data, and replacing the folder would delete
    scans."""
    for root in roots:
        if not root:
            continue
        if contains(folder, root) and (holding or contains(root, folder)):
            where = "is" if contains(root, folder) else "holds"
        elif contains(root, folder):
            where = "lies inside"
        else:
            continue
        raise OutputError(
            f"{what} {folder} {where} {data} {root}: SAVLT never writes its outputs into a data set: "
            "choose a folder outside it"
        )


def check_inputs_outside(folder: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse to write over `folder` while an input of the command (name -> path) lies inside it."""
    for name, path in inputs.items():
        if path and contains(folder, path):
            raise OutputError(
                f"{name} {path} lies inside {folder}, which this command would replace: move it out "
                "of there first, or choose another output folder"
            )


# ------------------------------------------------------------------------------ tables


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns for the terminal: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ batches


def progress_batches(
    items: Sequence[T], batch_size: int, desc: str, progress: bool = True, unit: str = "img"
) -> Iterator[list[T]]:
    """Consecutive chunks of `items`, with a progress bar counting items (not chunks)."""
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress or not items)
    try:
        for start in range(0, len(items), batch_size):
            chunk = list(items[start : start + batch_size])
            yield chunk
            bar.update(len(chunk))
    finally:
        bar.close()


# ------------------------------------------------------------------------------ state dicts


def state_mismatch(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]) -> str | None:
    """None when `found` has exactly the names and shapes of `expected`, else a short description
    ("2 missing (a, b), 1 of another shape (c)") for a one-line error naming the file."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    parts = [
        f"{len(names)} {label} ({', '.join(names[:3])}{' …' if len(names) > 3 else ''})"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
        if names
    ]
    return "; ".join(parts) or None
