"""Reading a sweep file into its grid points, each a fully validated ``Config``.

A sweep file holds two keys::

    base:                       # config values shared by every point
      data: data/               #   shorthand for data.root
      model: tiny               #   shorthand for model.backbone
      train: {n_iters: 3}       #   nested sections work too
    grid:                       # config key -> list of values; every combination is a point
      method: [clip_lora, savlt]
      shots: [16, 32]
      seed: [5, 42, 123]

Keys are full dotted config keys (``train.lr``, ``peft.type``, …) or the shorthands of
``SHORTHANDS``. A shorthand that is also a section name (``data``, ``model``, ``peft``) means
the section when its value is a mapping and the shorthand otherwise. Relative paths (data root,
cache folder, split file, segmenter, a local backbone folder) are resolved against the current
directory, so the points do not depend on where a sweep is resumed from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from savlt.config import Config, ConfigError, config_from_dict, parse_override, read_yaml, set_dotted
from savlt.engine.runfolder import absolute_setting

SHORTHANDS: dict[str, str] = {
    "data": "data.root",
    "model": "model.backbone",
    "shots": "train.shots",
    "seed": "train.seed",
    "lr": "train.lr",
    "alpha": "model.alpha",
    "peft": "peft.type",
    "gradual_step": "peft.gradual_step",
    "segmenter": "roi.segmenter",
}
# The short name of a dotted key, for names and table columns.
DISPLAY: dict[str, str] = {v: k for k, v in SHORTHANDS.items()}

SECTIONS = frozenset(
    f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING
)
TOP_LEVEL = ("base", "grid")


@dataclass
class SweepPoint:
    name: str  # the run folder's name, e.g. "method=savlt,shots=16,seed=5"
    values: dict[str, Any]  # dotted key -> this point's grid value
    config: Config


@dataclass
class Sweep:
    source: str  # the sweep file (or "<dict>")
    base: dict[str, Any]  # dotted key -> value
    grid: dict[str, list[Any]]  # dotted key -> values, in file order
    labels: dict[str, str]  # dotted key -> the key as written in the grid (used in names)
    points: list[SweepPoint] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The resolved sweep, as written to DIR/sweep.yaml."""
        return {
            "source": self.source,
            "base": dict(self.base),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "labels": dict(self.labels),
            "points": [{"name": p.name, "values": dict(p.values)} for p in self.points],
        }


def display_key(key: str) -> str:
    """``train.lr`` -> ``lr``; a key without a shorthand stays dotted."""
    return DISPLAY.get(key, key)


def _canonical(key: str, value: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: keys must be non-empty strings, got {key!r}")
    if key in SHORTHANDS and not isinstance(value, dict):
        return SHORTHANDS[key]
    return key


def flatten_base(base: dict[str, Any], where: str) -> dict[str, Any]:
    """Shorthands, dotted keys and nested sections -> {dotted key: value}."""
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in flat:
            raise ConfigError(f"{where}: {key} is set twice")
        flat[key] = value

    for key, value in base.items():
        canonical = _canonical(key, value, where)
        if canonical in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                put(f"{canonical}.{sub}", sub_value)
        else:
            put(canonical, value)
    return flat


def _read_grid(grid: dict[str, Any], where: str) -> tuple[dict[str, list[Any]], dict[str, str]]:
    axes: dict[str, list[Any]] = {}
    labels: dict[str, str] = {}
    for key, values in grid.items():
        canonical = _canonical(key, None, where)
        if canonical in SECTIONS:
            raise ConfigError(f"{where}: {key!r} is a config section; name one of its keys, e.g. {key}.<key>")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where}.{key}: expected a non-empty list of values (e.g. [16, 32]), got {values!r}; "
                "a single value belongs in base"
            )
        if any(isinstance(v, dict) for v in values):
            raise ConfigError(f"{where}.{key}: values must be plain values or lists, not mappings")
        if canonical in axes:
            raise ConfigError(f"{where}: {canonical} is given twice ({labels[canonical]} and {key})")
        seen = [yaml.safe_dump(v) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"{where}.{key}: duplicate values in {values!r}")
        axes[canonical] = list(values)
        labels[canonical] = str(key)
    return axes, labels


def _resolve_paths(flat: dict[str, Any]) -> dict[str, Any]:
    return {key: absolute_setting(key, value) for key, value in flat.items()}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "-".join(format_value(v) for v in value)
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def point_name(values: dict[str, Any], labels: dict[str, str]) -> str:
    """A readable, filesystem-safe folder name: ``method=savlt,shots=16,seed=5``."""
    if not values:
        return "base"
    name = _safe(",".join(f"{labels[k]}={format_value(v)}" for k, v in values.items()))
    if len(name) > 200:  # keep clear of the 255-byte file name limit
        name = f"{name[:180]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _point_values(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _tree(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(tree, key, value)
    return tree


def _split_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set KEY=VALUE`` (or ``base.KEY=VALUE``) sets a base value; ``grid.KEY=[…]`` an axis."""
    base: dict[str, Any] = {}
    grid: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("grid."):
            grid[key[len("grid.") :]] = value
        else:
            base[key.removeprefix("base.")] = value
    return base, grid


def build_sweep(spec: Any, source: str = "<dict>", overrides: Sequence[str] = ()) -> Sweep:
    """Validate a sweep mapping (``{"base": …, "grid": …}``) and every point's configuration."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {source} must hold a mapping with the keys base and grid")
    unknown = sorted(str(k) for k in spec if k not in TOP_LEVEL)
    if unknown:
        raise ConfigError(
            f"sweep file {source}: unknown top-level key {unknown[0]!r}; a sweep file has only "
            "base: (shared config values) and grid: (config key -> list of values)"
        )
    base = spec.get("base") or {}
    grid = spec.get("grid") or {}
    for part, value in (("base", base), ("grid", grid)):
        if not isinstance(value, dict):
            raise ConfigError(f"sweep file {source}: {part} must be a mapping, got {value!r}")
    try:
        set_base, set_grid = _split_overrides(overrides)
        flat_base = flatten_base(base, "base")
        for key, value in set_base.items():  # an override replaces the key however base spelled it
            flat_base.update(flatten_base({key: value}, "--set"))
        for key in set_grid:
            replaced = _canonical(key, None, "--set")
            grid = {k: v for k, v in grid.items() if _canonical(k, None, "grid") != replaced}
        axes, labels = _read_grid({**grid, **set_grid}, "grid")
    except ConfigError as exc:
        raise ConfigError(f"sweep file {source}: {exc}") from None
    both = sorted(set(flat_base) & set(axes))
    if both:
        raise ConfigError(
            f"sweep file {source}: {both[0]} is set in base and varied in grid; keep it in one place "
            f"(to narrow the grid from the command line use --set grid.{labels[both[0]]}=[...])"
        )
    flat_base = _resolve_paths(flat_base)
    try:
        config_from_dict(_tree(flat_base))
    except ConfigError as exc:
        raise ConfigError(f"sweep file {source}, base: {exc}") from None
    sweep = Sweep(source, flat_base, axes, labels)
    names: dict[str, int] = {}
    for values in _point_values(axes):
        name = point_name(values, labels)
        resolved = _resolve_paths({**flat_base, **values})
        try:
            cfg = config_from_dict(_tree(resolved))
        except ConfigError as exc:
            raise ConfigError(f"sweep file {source}, point {name}: {exc}") from None
        if cfg.data.root is None:
            raise ConfigError(
                f"sweep file {source}: no data root; set base.data (data.root) or pass --set data=ROOT"
            )
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:  # two values that read the same once made filesystem-safe
            digest = hashlib.sha1(yaml.safe_dump(values).encode()).hexdigest()[:8]
            name = f"{name}~{digest}"
        sweep.points.append(SweepPoint(name, {k: resolved.get(k, v) for k, v in values.items()}, cfg))
    return sweep


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read and validate a sweep file; every point is checked before anything runs."""
    return build_sweep(read_yaml(path, "sweep file"), str(path), overrides)
