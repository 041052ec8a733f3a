"""The package's layers, checked on the source: imports run one way only.

ground (errors, io, processes, classes, methods, config, outputs) <- data <- models <- seg <- engine <- sweep/serve <- cli,
with report/ (tables and plots) importable from engine, seg, sweep, serve and cli. An import inside a
function counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "savlt"
GROUND = {"errors", "io", "processes", "classes", "methods", "config", "outputs"}
ROOMS = ("data", "models", "report", "engine", "seg", "sweep", "serve", "cli")

# What each room may not import (of the package's own rooms).
FORBIDDEN: dict[str, set[str]] = {
    "ground": set(ROOMS) | {"__init__"},
    "data": {"models", "engine", "seg", "sweep", "report", "cli", "serve"},
    "models": {"engine", "seg", "sweep", "cli", "serve", "report"},
    "report": {"data", "engine", "models", "seg", "sweep", "cli", "serve"},
    "seg": {"engine", "sweep", "cli", "serve"},
    "engine": {"sweep", "cli", "serve"},
    "sweep": {"cli", "serve"},
    "serve": {"cli", "sweep"},
}


def room_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) > 1:
        return parts[0]
    stem = path.stem
    return "ground" if stem in GROUND else stem


def imported_rooms(path: Path) -> list[tuple[int, str]]:
    """(line, room) of every import of savlt.<room> in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "savlt" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_relative_imports_are_not_used() -> None:
    relative = [
        f"{f.relative_to(PACKAGE)}:{n.lineno}"
        for f in PACKAGE.rglob("*.py")
        for n in ast.walk(ast.parse(f.read_text()))
        if isinstance(n, ast.ImportFrom) and n.level > 0
    ]
    assert not relative, relative  # the rule below reads absolute imports only


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_run_one_way(room: str) -> None:
    files = [f for f in PACKAGE.rglob("*.py") if room_of(f) == room]
    assert files, f"no source files for {room}"
    wrong = [
        f"{f.relative_to(PACKAGE)}:{line} imports savlt.{target}"
        for f in files
        for line, target in imported_rooms(f)
        if target in FORBIDDEN[room] or (room == "ground" and target not in GROUND)
    ]
    assert not wrong, wrong


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from savlt.engine.training import train\n")
    assert imported_rooms(source) == [(2, "engine")]
