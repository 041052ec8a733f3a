"""The typed configuration: YAML + overrides, validation with clear messages, round trip."""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import train_args

from savlt.cli import main
from savlt.config import Config, ConfigError, config_reference, load_config
from savlt.methods import METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_published_method() -> None:
    cfg = load_config()
    assert cfg.method == "savlt" and cfg.model.backbone == "openai/clip-vit-base-patch16"
    assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout, cfg.peft.gradual_step) == (8, 4.0, 0.25, None)
    assert (cfg.peft.text_r, cfg.peft.text_alpha) == (2, 16.0)
    assert (
        cfg.train.lr,
        cfg.train.weight_decay,
        cfg.train.min_lr,
        cfg.train.n_iters,
        cfg.train.batch_size,
    ) == (1e-3, 1e-4, 1e-6, 10, 32)
    assert cfg.model.alpha == 0.5 and cfg.model.heads == 4 and cfg.roi.top_fraction == 0.1
    assert cfg.data.split_ratios == [0.45, 0.15, 0.40] and cfg.train.crop_scale == [0.75, 1.0]
    assert cfg.class_names[3] == "high-grade_squamous_intraepithelial_lesion"


def test_yaml_then_overrides_and_round_trip(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  shots: 8\n  lr: 5e-4\nmodel:\n  backbone: tiny\n")
    cfg = load_config(
        tmp_path / "c.yaml", ["train.shots=32", "data.test_centers=[huaxi]", "peft.gradual_step=null"]
    )
    assert cfg.train.shots == 32 and cfg.train.lr == 5e-4 and cfg.data.test_centers == ["huaxi"]
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert cfg.get("train.shots") == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key train.lrr; valid keys here: batch_size"),
        (["train.shots=abc"], "train.shots: expected an integer"),
        (["model.pooling=mean"], "model.pooling: 'mean' is not one of roi, attn, cls"),
        (["method=fancy"], "method: 'fancy' is not one of savlt"),
        (["model.alpha=1.5"], r"model.alpha: 1.5 must lie in \[0, 1\]"),
        (["data.split_ratios=[0.5,0.5,0.5]"], "summing to 1"),
        (["data.high_risk=[tumour]"], "'tumour' is not a configured class"),
        (["method=clip_lora", "model.pooling=roi"], "method clip_lora fixes model.pooling='cls'"),
        (["roi.mask_source=segmenter"], "needs roi.segmenter"),
        (["train"], "not of the form key=value"),
    ],
)
def test_bad_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_methods_fix_their_parts() -> None:
    assert load_config(overrides=["method=clip_lora"]).model.pooling == "cls"
    assert load_config(overrides=["method=savlt_proto_only"]).model.alpha == 1.0
    assert load_config(overrides=["method=savlt_no_roi"]).model.pooling == "attn"
    assert load_config(overrides=["method=savlt", "model.alpha=0.3"]).model.alpha == 0.3  # alpha stays free
    assert set(METHODS) >= {"zero_shot", "linear_probe"}


def test_shipped_configs_load() -> None:
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.model.backbone == "tiny-oct" and demo.train.shots == 16
    paper = load_config(CONFIGS / "paper.yaml")
    assert paper.train.shots == 32 and paper.model.backbone == "openai/clip-vit-base-patch16"
    assert paper.train == Config().train.__class__(
        shots=32, seed=5, mixed_precision="no"
    )  # fp32 as published


def test_a_missing_or_broken_config_file_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["data", "check", str(tmp_path), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", ["on", "yes", "null", "1e3", "a: b", "[x]"])
def test_flag_values_are_taken_as_values(tmp_path: Path, name: str) -> None:
    """A data root or model folder whose name YAML would read as a bool, null, number or list."""
    root = tmp_path / name
    cfg = load_config(values={"data.root": root, "model.backbone": name, "train.shots": 4})
    assert cfg.data.root == str(root) and cfg.model.backbone == name and cfg.train.shots == 4


def test_precedence_defaults_yaml_flags_set(tmp_path: Path) -> None:
    import argparse

    from savlt.config import add_config_arguments, config_from_args

    (tmp_path / "c.yaml").write_text("train: {shots: 8, seed: 1, lr: 5e-4}\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--set", "train.seed=3"])
    cfg = config_from_args(args, {"train.shots": 16, "train.seed": 2, "data.root": None})
    assert (cfg.train.shots, cfg.train.seed, cfg.train.lr, cfg.data.root) == (16, 3, 5e-4, None)


def test_the_cli_passes_a_data_root_named_like_a_yaml_value(tmp_path: Path, capsys) -> None:
    root = tmp_path / "on"
    assert main(["data", "check", str(root), "-q"]) == 2  # no such folder: a one-line data error
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"data root {root} does not exist" in err and "Traceback" not in err


def test_sections_check_their_own_fields() -> None:
    from savlt.config import EvalConfig, PeftConfig, TrainConfig

    with pytest.raises(ConfigError, match="train.shots must be >= 1"):
        TrainConfig(shots=0)
    with pytest.raises(ConfigError, match="peft.dropout"):
        PeftConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="eval.ci_level"):
        EvalConfig(ci_level=1.0)
    assert TrainConfig(shots=4, n_iters=3).total_steps == 12 and TrainConfig(max_steps=7).total_steps == 7


def _leaf_keys(node: object, prefix: str = "") -> list[str]:
    keys = []
    for item in dataclasses.fields(node):
        value = getattr(node, item.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{item.name}.")
        else:
            keys.append(prefix + item.name)
    return keys


def test_every_key_is_documented_once_in_order() -> None:
    rows = config_reference()
    assert [row.key for row in rows] == _leaf_keys(Config())
    undocumented = [row.key for row in rows if len(row.help.split()) < 3]
    assert not undocumented, f"keys without a help text: {undocumented}"
    shots = next(row for row in rows if row.key == "train.shots")
    assert (shots.type, shots.default, shots.defines_run) == ("int", "16", True)
    normalize = next(row for row in rows if row.key == "data.normalize")
    assert normalize.type == "backbone | clip | imagenet"
    assert not next(row for row in rows if row.key == "data.num_workers").defines_run


def test_defining_leaves_out_what_cannot_change_a_number() -> None:
    a = load_config(overrides=["data.num_workers=0", "seg.epochs=3"])
    b = load_config(overrides=["data.num_workers=5", "seg.epochs=9"])
    assert a.defining(("seg", "pretrain")) == b.defining(("seg", "pretrain"))
    assert a.defining() != b.defining()  # seg is part of the tree unless left out
    assert load_config(overrides=["train.lr=0.1"]).defining() != Config().defining()


def test_config_command_lists_every_key(capsys) -> None:
    assert main(["config", "--list"]) == 0
    listed = capsys.readouterr().out
    for row in config_reference():
        assert f"{row.key}  {row.type} = {row.default}" in listed
    assert main(["config", "--markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[:2] == ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    assert len(table) == 2 + len(config_reference())
    assert any(line.startswith("| `data.normalize` | backbone \\| clip \\| imagenet |") for line in table)


def test_config_command_prints_the_resolved_configuration(capsys) -> None:
    assert main(["config", "--config", str(CONFIGS / "demo.yaml"), "--set", "train.lr=5e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(CONFIGS / "demo.yaml", ["train.lr=5e-4"]).to_dict()
    assert printed == expected and printed["train"]["lr"] == 0.0005
    assert main(["config", "--set", "train.lrr=1"]) == 2
    assert "unknown config key train.lrr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "train.seed (--seed): -1 is not a valid seed"),
        (["--seed", str(2**32)], "4294967296 is not a valid seed"),
        (["--set", "data.split_seed=-5"], "data.split_seed: -5 is not a valid seed"),
        (["--set", "train.val_every=0"], "train.val_every: 0 must be >= 1"),
    ],
)
def test_bad_seeds_and_schedules_are_one_line_errors(
    argv: list[str], message: str, synth_root: Path, tmp_path: Path, capsys
) -> None:
    assert main(train_args(synth_root, tmp_path / "run", *argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch, capsys) -> None:
    """`savlt config --list | head` and the like: no traceback when the reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return write_end

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["config", "--list"]) == 1
    finally:
        os.close(write_end)
    assert capsys.readouterr().err == ""
