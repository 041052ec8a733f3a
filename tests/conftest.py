"""Shared fixtures and helpers: small synthetic data sets made in-process, fast training settings,
tiny models, and one torch thread for the tests that train."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL = (96, 128)

# Overrides that make a tiny-backbone run take seconds: few steps, no loader workers, few resamples.
FAST = [
    "model.backbone=tiny",
    "train.shots=4",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.val_every=2",
    "data.num_workers=0",
    "eval.batch_size=32",
    "eval.bootstrap=20",
]


# Scans per center of `synth_root`: 8 per class and 5 classes; mixed's test split keeps 3 per class.
CENTER_SIZES = {"mixed": 15, "xiangya": 40, "huaxi": 40}


def fast_config(root: Path, *extra: str):
    """FAST settings on `root`, with the split cache beside it (the data folder stays untouched)."""
    from savlt.config import load_config

    return load_config(
        overrides=[*FAST, *extra], values={"data.root": root, "data.cache_dir": root.parent / "cache"}
    )


def tiny_model(*overrides: str, steps: int = 20):
    """The SAVLT model of a configuration (`overrides`) on the tiny backbone, seeded."""
    from savlt.config import load_config
    from savlt.models.backbone import build_random
    from savlt.models.savlt import model_from_config

    torch.manual_seed(0)
    cfg = load_config(overrides=[*overrides, f"train.max_steps={steps}"])
    return model_from_config(cfg, build_random())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module that trains: on a shared 2-core machine two spinning
    threads are several times slower, and one thread is repeatable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three centers × five classes × 8 small scans, with masks (read-only by convention)."""
    from savlt.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, seed=0, per_class=8, size=SMALL, preview=False, progress=False)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below `root` (its relative path, a name that is not UTF-8 kept byte for byte as
    ``os.fsdecode`` gives it -> the SHA-256 of its bytes; a symbolic link -> where it points):
    equal before and after a command exactly when the command deleted, changed and added nothing
    there."""
    found = {}
    for current, folders, files in os.walk(os.fsencode(root)):
        for name in files + [f for f in folders if os.path.islink(os.path.join(current, f))]:
            path = os.path.join(current, name)
            key = os.fsdecode(os.path.relpath(path, os.fsencode(root)))
            if os.path.islink(path):
                found[key] = "link to " + os.fsdecode(os.readlink(path))
            else:
                found[key] = hashlib.sha256(Path(os.fsdecode(path)).read_bytes()).hexdigest()
    return found


def short_caption_pairs(synth_root: Path, folder: Path) -> Path:
    """`folder`/pairs.csv pairing a copy of the `mixed` scans with their class's short name (a
    caption a tiny CLIP learns in a few dozen steps); the images are copied into `folder`."""
    from savlt.classes import short_name

    shutil.copytree(synth_root / "mixed" / "images", folder / "images")
    records = sorted(p.relative_to(folder) for p in (folder / "images").rglob("*.png"))
    lines = ["file,text", *(f"{p.as_posix()},{short_name(p.parent.name)}" for p in records)]
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def write_png(path: Path, value: int = 128, size: tuple[int, int] = (40, 48)) -> Path:
    """A small grayscale PNG with a dark band on top (so it has a tissue surface)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full(size, value, dtype=np.uint8)
    pixels[: size[0] // 4] = 5
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (40, 48), top: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, dtype=np.uint8)
    mask[top:] = 255
    Image.fromarray(mask).save(path)
    return path


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    """ROOT/mixed with two classes × 3 PNGs (+ masks) and ROOT/ext without the images/ level."""
    root = tmp_path / "root"
    for cls in ("cyst", "cancer"):
        for i in range(3):
            write_png(root / "mixed" / "images" / cls / f"{cls}_{i}.png", value=100 + 20 * i)
            write_mask(root / "mixed" / "masks" / cls / f"{cls}_{i}.png")
    for cls in ("Mild Inflammation", "CANCER"):
        write_png(root / "ext" / cls / "a.png")
    return root


def marked_processes(mark: str) -> dict[int, tuple[int, str]]:
    """The processes still running (a zombie has ended) with ``SAVLT_TEST_MARK=<mark>`` in their
    environment: every process a command started, however deep and in whatever session or process
    group; pid -> (parent pid, command line)."""
    needle = f"SAVLT_TEST_MARK={mark}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            marked = needle in (entry / "environ").read_bytes().split(b"\0")
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile, or not ours
            continue
        if marked and state != "Z":
            found[int(entry.name)] = (int(parent), command.strip())
    return found


def processes_left(mark: str, seconds: float = 3.0) -> dict[int, tuple[int, str]]:
    """`marked_processes` once none is left, or when `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ---------------------------------------------------------------- export-like data (small files)


def scan_png(path: Path, size: tuple[int, int] = (48, 64)) -> Path:
    """A small scan with a dark air band over brighter, textured tissue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = rng.integers(90, 200, size, dtype=np.uint8)
    pixels[: size[0] // 4] = 8
    Image.fromarray(pixels).save(path)
    return path


def black_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(path)
    return path


def nan_tiff(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((48, 64), np.nan, np.float32))
    return path


def truncated_png(path: Path) -> Path:
    scan_png(path)
    path.write_bytes(path.read_bytes()[:120])
    return path


def copy_center(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop))
    return target


def debris(folder: Path) -> None:
    """What Windows and macOS leave in a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Thumbs.db").write_bytes(b"\x00" * 10)
    (folder / "desktop.ini").write_text("[.ShellClassInfo]")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "._scan_0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble: not a PNG at all


@pytest.fixture(scope="session")
def export_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A trained run on an export-like root: the training center `mixed` and a new hospital
    without cysts, with two scans that cannot be assessed (a black PNG, an all-NaN float TIFF).
    Trained once for the session (read-only by convention), on one torch thread."""
    from savlt.engine.training import train

    base = tmp_path_factory.mktemp("export")
    root = base / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    hospital = copy_center(synth_root / "huaxi", root / "newhosp", drop=("cyst",))
    black_png(hospital / "images" / "cancer" / "black.png")
    nan_tiff(hospital / "images" / "ectropion" / "nan.tif")
    out = base / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(fast_config(root, "data.test_centers=[newhosp]"), out, progress=False)
    finally:
        torch.set_num_threads(previous)
    return root, out


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [*FAST, f"data.cache_dir={root.parent / 'cache'}", "data.test_centers=[]"]
    return ["train", "--data", str(root), "--out", str(out), "-q", *(f"--set={s}" for s in sets), *extra]
