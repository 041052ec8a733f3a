"""The argument checks of the public functions, which fail with a one-line SynthError before anything is
written."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from savlt.errors import SavltError

MIN_SIZE = 64
MAX_SIZE = 4096
_CENTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SynthError(SavltError):
    """A bad argument to the synthetic data generator; the message names it and says what to give instead."""


def check_int(name: str, value: object, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SynthError(f"{name} must be a whole number >= {lowest}, got {value!r}")
    if value < lowest:
        raise SynthError(f"{name} must be >= {lowest}, got {value}")
    return int(value)


def check_centers(centers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(centers, str) or not isinstance(centers, Sequence):
        raise SynthError(
            f"centers must be a list of center names such as ['mixed', 'huaxi'], got {centers!r}"
        )
    if not centers:
        raise SynthError("centers is empty: name at least one center, e.g. mixed")
    seen: set[str] = set()
    for center in centers:
        if not isinstance(center, str) or not _CENTER_NAME.match(center):
            raise SynthError(
                f"bad center name {center!r}: use letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        if center.lower() in seen:
            raise SynthError(
                f"duplicate center name {center!r}: names are compared case-insensitively, so give each center "
                "a different name"
            )
        seen.add(center.lower())
    return tuple(centers)


def check_size(size: Sequence[int]) -> tuple[int, int]:
    if isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 2:
        raise SynthError(f"size must be two whole numbers (height, width), got {size!r}")
    height, width = (check_int(name, v, MIN_SIZE) for name, v in zip(("height", "width"), size, strict=True))
    if max(height, width) > MAX_SIZE:
        raise SynthError(f"size must be at most {MAX_SIZE} x {MAX_SIZE} pixels, got {height} x {width}")
    return height, width
