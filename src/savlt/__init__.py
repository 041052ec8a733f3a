"""SAVLT: structure-aware vision-language tuning of CLIP for few-shot, multi-center cervical OCT.

Python API (the CLI is a thin layer over it)::

    from savlt import load_config, train, load_run
    cfg = load_config("configs/demo.yaml", ["data.root=data", "train.shots=16"])
    metrics = train(cfg, "runs/demo")
    run = load_run("runs/demo")
    predictions = run.predict(["scan.tif"])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `import savlt` (and the CLI) stay fast.
_API = {
    "Config": "savlt.config",
    "METHODS": "savlt.methods",
    "Method": "savlt.methods",
    "load_config": "savlt.config",
    "train": "savlt.engine.training",
    "load_run": "savlt.engine.loaded",
    "Run": "savlt.engine.loaded",
    "Prediction": "savlt.engine.loaded",
    "Ready": "savlt.engine.loaded",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'savlt' has no attribute {name!r}")
