"""The package's layers, checked on the source: imports run one way only.

ground (errors, io, processes, classes, methods, config, outputs, normalization) <- data <- models <- seg <- engine <- sweep/serve <- cli,
with report/ (tables and plots) importable from engine, seg, sweep, serve and cli. An import inside a
function counts the same as one at the top of a module, and ``from savlt import X`` counts as an
import of the module X comes from (``savlt/__init__.py`` hands out its API on first use). Every
module belongs to a declared room (a new top-level module fails until it is placed), the engine's
modules have their own order (``ENGINE_LEVELS``), the heavy third-party libraries are imported at
import time only where ``AT_IMPORT`` says (never in the ground), and the command line, the sweep and
the run identity start without torch or transformers (checked in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from savlt import _API as LAZY_API  # what `from savlt import X` hands out, and the module it comes from

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "savlt"
GROUND = {"errors", "io", "processes", "classes", "methods", "config", "outputs", "normalization"}
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


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


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
        if isinstance(node, ast.ImportFrom) and node.module == "savlt":  # from savlt import io, Run
            names = [
                f"savlt.{a.name}" if _is_module(a.name) else LAZY_API.get(a.name, "savlt.__init__")
                for a in node.names
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "savlt":  # a bare `import savlt` is an import of its __init__
                found.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))
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


def test_the_rule_reads_bare_package_imports(tmp_path: Path) -> None:
    source = tmp_path / "bare.py"
    source.write_text("from savlt import engine, io\nfrom savlt import Run, __version__\nimport savlt\n")
    expected = [(1, "engine"), (1, "io"), (2, "engine"), (2, "__init__"), (3, "__init__")]
    assert imported_rooms(source) == expected  # Run comes from savlt.engine.loaded


def test_every_module_belongs_to_a_declared_room() -> None:
    declared = GROUND | set(ROOMS) | {"__init__", "__main__"}
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert top - declared == set(), "place new modules in GROUND or ROOMS (and FORBIDDEN)"
    assert set(ROOMS) - {"cli"} <= set(FORBIDDEN), "every room but cli has its rules"


# The engine's own order: a module imports engine modules of lower levels only. A new engine module
# fails until it is placed here.
ENGINE_LEVELS: list[set[str]] = [
    {"runfolder", "checkpoint", "inputs", "metrics", "inference", "loop"},
    {"features", "baselines"},
    {"prompting"},
    {"calibration", "fit", "runtime"},
    {"scoring"},
    {"pretrain", "loaded", "training"},
]


def engine_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("savlt.engine."):
            found.append((node.lineno, node.module.split(".")[2]))
        elif isinstance(node, ast.ImportFrom) and node.module == "savlt.engine":
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.split(".")[2]) for a in node.names if a.name.startswith("savlt.engine.")
            ]
    return found


def test_the_engine_modules_import_in_their_order() -> None:
    level = {name: i for i, names in enumerate(ENGINE_LEVELS) for name in names}
    modules = {p.stem for p in (PACKAGE / "engine").glob("*.py")} - {"__init__"}
    assert modules == set(level), (
        f"place these engine modules in ENGINE_LEVELS: {sorted(modules ^ set(level))}"
    )
    wrong = [
        f"engine/{name}.py:{line} imports engine.{target}"
        for name in modules
        for line, target in engine_imports(PACKAGE / "engine" / f"{name}.py")
        if level[target] >= level[name]
    ]
    assert not wrong, wrong


# Libraries that take seconds to import or need a GPU stack, and where each may be imported at import
# time (at a module's top level, outside any function): a room, or a module (path under src/savlt).
# Everywhere else a module imports them inside the function that needs them; the ground never does.
AT_IMPORT: dict[str, set[str]] = {
    "torch": {"data", "models", "engine", "seg"},
    "accelerate": {"engine"},
    "peft": {"models/adapters.py", "models/savlt.py", "engine/pretrain.py"},
    "transformers": {"models/hf_clip.py", "models/openclip.py"},
    "open_clip": {"models/openclip.py"},
    "timm": {"models/openclip.py"},
    "segmentation_models_pytorch": {"seg"},
    "fastapi": {"serve/app.py"},
    "uvicorn": set(),
    "torchvision": set(),
    "albumentations": {"data"},
    "cv2": {"data", "report/plots.py", "seg/model.py"},
    "sklearn": {"engine/fit.py", "seg/train.py"},
    "matplotlib": {"report/plots.py", "seg/plots.py"},
}
HEAVY = set(AT_IMPORT)


def import_time_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import that runs when the file is imported: none inside a function
    or under ``if TYPE_CHECKING:``."""
    found, todo = [], list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        todo += ast.iter_child_nodes(node)
    return sorted(found)


def test_heavy_libraries_are_imported_at_import_time_only_where_declared() -> None:
    entries = set().union(*AT_IMPORT.values())
    assert all(e in ROOMS or (PACKAGE / e).is_file() for e in entries), "AT_IMPORT names a missing module"
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        where = {room_of(path), path.relative_to(PACKAGE).as_posix()}
        wrong += [
            f"{path.relative_to(PACKAGE)}:{line} imports {name}"
            for line, name in import_time_imports(path)
            if name.split(".")[0] in HEAVY and not where & AT_IMPORT[name.split(".")[0]]
        ]
    assert not wrong, f"import these inside the function that needs them, or declare them: {wrong}"


def test_the_rule_reads_only_what_runs_at_import_time(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\nelse:\n    import numpy\n"
        "try:\n    from transformers import CLIPModel\nexcept ImportError:\n    pass\n"
        "def f():\n    import open_clip\nclass C:\n    import fastapi\n"
    )
    assert import_time_imports(source) == [(1, "typing"), (5, "numpy"), (7, "transformers"), (13, "fastapi")]


def test_the_ground_imports_no_heavy_library() -> None:
    wrong = []
    for path in PACKAGE.glob("*.py"):
        if room_of(path) != "ground":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            wrong += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in HEAVY]
    assert not wrong, wrong


@pytest.mark.parametrize(
    "code",
    [
        "import savlt.cli",
        "import savlt.sweep",
        "import savlt.engine.runfolder, savlt.models.backbone; savlt.models.backbone.resolve('tiny-oct').stats()",
        "import savlt.cli, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        "    savlt.cli.main(['config', '--list'])",
    ],
)
def test_the_command_line_and_the_sweep_start_without_torch(code: str) -> None:
    probe = f"{code}\nimport sys\nprint(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_savlt_help_starts_without_torch() -> None:
    """The command itself, as a user runs it; -X importtime lists every module it imported."""
    command = [sys.executable, "-X", "importtime", "-m", "savlt.cli", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: savlt"), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "savlt.config" in imported and not imported & {"torch", "transformers", "open_clip"}
