"""The ground floor: small helpers every layer uses (files, tables, batches, state checks).

Nothing here imports another part of SAVLT except ``savlt.errors``, so ``data``, ``models``,
``engine``, ``report``, ``seg`` and ``sweep`` can all build on it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from savlt.errors import SavltError

T = TypeVar("T")


class OutputError(SavltError):
    """A place SAVLT cannot write to (an existing file, a read-only folder, a folder in use)."""


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
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, so a person can read it)."""
    write_text(path, json.dumps(data, indent=1))


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically (one header row, then `rows`)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


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
