"""The methods table: every method is one entry, and a new entry is all a new baseline needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fast_config

from savlt.config import load_config
from savlt.engine.fit import FITS
from savlt.engine.loaded import load_run
from savlt.engine.training import train
from savlt.methods import METHODS, Method
from savlt.models.heads import HEADS


def test_every_method_names_a_known_head_and_fit() -> None:
    for method in METHODS.values():
        assert method.head in HEADS and method.fit in FITS, method
        cfg = load_config(overrides=[f"method={method.name}"])
        assert cfg.method_spec is method
        for key, value in method.fixed().items():
            assert cfg.get(key) == value


def test_a_new_method_is_one_table_entry(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    new = Method("proto_cls", "CLS pooling with prototypes only", pooling="cls", alpha=1.0)
    monkeypatch.setitem(METHODS, new.name, new)
    cfg = fast_config(synth_root, "method=proto_cls", "data.test_centers=[]")
    assert (cfg.model.pooling, cfg.model.alpha) == ("cls", 1.0)
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["method"] == "proto_cls" and metrics["centers"]["mixed"]["n"] > 0
    assert load_run(tmp_path / "run").model.head.prototypes is not None  # saved and reloaded
