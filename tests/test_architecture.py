"""The package's layers, checked on the source: imports run one way only.

ground (errors, io, processes, classes, methods, config, outputs, normalization) <- data <- models <- seg <- engine <- sweep/serve <- cli,
with report/ (tables and plots) importable from engine, seg, sweep, serve and cli. An import inside a
function counts the same as one at the top of a module, and ``from savlt import X`` counts as an
import of X. Every module belongs to a declared room (a new top-level module fails until it is
placed), the engine's modules have their own order (``ENGINE_LEVELS``), the ground imports no heavy
third-party library, and the command line, the sweep and the run identity start without torch or
transformers (checked in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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
            names = [f"savlt.{a.name}" if _is_module(a.name) else "savlt.__init__" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
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


def test_the_rule_reads_bare_package_imports(tmp_path: Path) -> None:
    source = tmp_path / "bare.py"
    source.write_text("from savlt import engine, io\nfrom savlt import Run\n")
    assert imported_rooms(source) == [(1, "engine"), (1, "io"), (2, "__init__")]


def test_every_module_belongs_to_a_declared_room() -> None:
    declared = GROUND | set(ROOMS) | {"__init__", "__main__"}
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert top - declared == set(), "place new modules in GROUND or ROOMS (and FORBIDDEN)"
    assert set(ROOMS) - {"cli"} <= set(FORBIDDEN), "every room but cli has its rules"


# The engine's own order: a module imports engine modules of lower levels only. A new engine module
# fails until it is placed here.
ENGINE_LEVELS: list[set[str]] = [
    {"runfolder", "checkpoint", "inputs", "metrics", "inference", "loop"},
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


# Libraries that take seconds to import or need a GPU stack: never in the ground.
HEAVY = {
    "torch", "torchvision", "transformers", "accelerate", "open_clip", "timm", "peft", "fastapi",
    "uvicorn", "albumentations", "cv2", "segmentation_models_pytorch", "sklearn", "matplotlib",
}  # fmt: skip


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
        "import savlt.cli, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.suppress(SystemExit):\n    savlt.cli.main(['--help'])",
        "import savlt.cli, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        "    savlt.cli.main(['config', '--list'])",
    ],
)
def test_the_command_line_and_the_sweep_start_without_torch(code: str) -> None:
    probe = f"{code}\nimport sys\nprint(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
