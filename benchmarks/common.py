"""Shared set-up for the benchmarks: a random CLIP of ViT-B/16 shapes and a timer.

The tests' slow reference implementations (``tests/reference.py``) are importable from here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from savlt.config import load_config
from savlt.models.backbone import build_random
from savlt.models.savlt import SavltModel, model_from_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def parse(description: str, batch: int = 32) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--preset", default="random-vit-b16", help="random-vit-b16 or tiny")
    return parser.parse_args()


def model_for(method: str, preset: str, device: str, steps: int = 100) -> SavltModel:
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"method={method}", f"model.backbone={preset}", f"train.max_steps={steps}"])
    return model_from_config(cfg, build_random(preset)).to(device)


def batch_for(size: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(size, 3, 224, 224, generator=generator)
    masks = torch.zeros(size, 224, 224, dtype=torch.uint8)
    tops = torch.randint(20, 120, (size,), generator=generator)
    rows = torch.arange(224)[None, :, None] >= tops[:, None, None]  # (B, 224, 1): rows below the surface
    masks |= rows.to(torch.uint8)
    labels = torch.arange(size) % 5
    return pixels.to(device), masks.to(device), labels.to(device)


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, called in turns (one call of each per round) after
    one warm-up round, so a load change on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    return side_by_side({"fn": fn}, repeats, device)["fn"]
