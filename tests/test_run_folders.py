"""Run folders on a real export: never mixed, locked, refused when they hold anything else; outputs
that are files or read-only places are one-line errors; every file gets ordinary permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from conftest import fast_config, train_args

from savlt.cli import main
from savlt.config import load_config
from savlt.engine.runfolder import RunPaths
from savlt.io import OutputError, exclusive

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_refuses_a_folder_holding_something_else_and_overwrite_replaces_only_a_run(
    synth_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "other.csv").write_text("old")
    (out / "notes.txt").write_text("keep?")
    assert main(train_args(synth_root, out)) == 2
    err = capsys.readouterr().err
    assert f"run folder {out} is not empty" in err and "notes.txt" in err and "predictions" in err
    assert "--overwrite" in err and err.count("\n") == 1 and "Traceback" not in err
    assert (out / "notes.txt").is_file() and not (out / "config.yaml").exists()  # nothing touched
    assert main(train_args(synth_root, out, "--overwrite")) == 2  # not SAVLT's: never deleted
    assert "files SAVLT did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep?" and (out / "predictions" / "other.csv").is_file()

    shutil.rmtree(out)
    assert main(train_args(synth_root, out)) == 0
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
    capsys.readouterr()
    assert main(train_args(synth_root, out)) == 2  # a finished run is not trained over either
    assert "a finished run" in capsys.readouterr().err
    assert main(train_args(synth_root, out, "--overwrite", "--set=train.seed=6")) == 0  # a run is replaced
    assert load_config(out / "config.yaml").train.seed == 6 and not (out / ".savlt-replaced").exists()


def test_an_interrupted_run_of_the_same_configuration_is_continued(synth_root: Path, tmp_path: Path) -> None:
    from savlt.engine.runfolder import run_folder_rules
    from savlt.io import write_manifest
    from savlt.outputs import check_claim

    cfg = fast_config(synth_root, "data.test_centers=[]")
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    write_manifest(paths.root, "run")  # as an interrupted run leaves it: no list of files yet
    cfg.save(paths.config)
    (paths.history).write_text('{"step": 1}\n')
    paths.predictions.mkdir()
    assert (
        check_claim(paths.root, "run", **run_folder_rules(cfg)) is False
    )  # the same unfinished run: continued
    other = fast_config(synth_root, "data.test_centers=[]", "train.seed=6")
    with pytest.raises(OutputError, match="an unfinished run of another configuration"):
        check_claim(paths.root, "run", **run_folder_rules(other))
    paths.metrics.write_text(json.dumps({"complete": True}))
    with pytest.raises(OutputError, match="a finished run"):
        check_claim(paths.root, "run", **run_folder_rules(cfg))


def test_overwrite_never_deletes_the_data_root(synth_root: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth_root / "mixed", root / "mixed")
    assert main(train_args(root, tmp_path, "--overwrite")) == 2
    assert f"holds the data root {root}" in capsys.readouterr().err
    assert (root / "mixed").is_dir()


def test_a_second_process_writing_the_same_run_folder_is_refused(
    synth_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    with exclusive(RunPaths(out).lock, "held by the test"):  # as another `savlt train` would hold it
        assert main(train_args(synth_root, out)) == 2
    err = capsys.readouterr().err
    assert "another savlt process is writing the run folder" in err and "Traceback" not in err
    assert not (out / "config.yaml").exists()


def test_the_sweep_uses_the_same_lock(synth_root: Path, tmp_path: Path, capsys) -> None:
    import yaml

    spec, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    spec.write_text(
        yaml.safe_dump({"base": {"data": str(synth_root), "model": "tiny"}, "grid": {"seed": [5]}})
    )
    with exclusive(out / ".savlt.lock", "held by the test"):  # as another `savlt sweep` would hold it
        assert main(["sweep", str(spec), "--out", str(out), "-q"]) == 2
    assert "another savlt process is writing the sweep folder" in capsys.readouterr().err
    assert not (out / "sweep.yaml").exists()


def read_only_place() -> Path:
    """A folder nobody may write to, not even root (sysfs refuses new entries)."""
    if not sys.platform.startswith("linux") or not Path("/sys").is_dir():
        pytest.skip("needs Linux sysfs")
    return Path("/sys/savlt-test-output")


def test_outputs_that_are_files_or_read_only_are_one_line_errors(export_run, tmp_path: Path, capsys) -> None:
    root, run = export_run
    taken = tmp_path / "taken"
    taken.write_text("a file")
    image = str(next((root / "newhosp" / "images" / "cancer").glob("*.jpg")))
    commands = {
        "train --out FILE": train_args(root, taken),
        "train --out below a file": train_args(root, taken / "run"),
        "evaluate --out FILE": ["evaluate", str(run), "--out", str(taken), "-q"],
        "predict --heatmap FILE": ["predict", str(run), image, "--heatmap", str(taken), "-q"],
        "predict --csv FOLDER": ["predict", str(run), image, "--csv", str(tmp_path), "-q"],
        "train --out read-only": train_args(root, read_only_place() / "run"),
        "evaluate --out read-only": ["evaluate", str(run), "--out", str(read_only_place()), "-q"],
        "predict --heatmap read-only": [
            "predict",
            str(run),
            image,
            "--heatmap",
            str(read_only_place()),
            "-q",
        ],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("savlt: error: ") and err.count("\n") == 1 and "Traceback" not in err, (
            name,
            err,
        )
        assert str(taken) in err or str(tmp_path) in err or "/sys/" in err, (name, err)


def test_every_file_of_a_run_has_the_ordinary_permissions(export_run) -> None:
    _, run = export_run
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [p for p in run.rglob("*") if p.is_file() and p.name != ".savlt.lock"]
    assert (run / "adapter.safetensors") in files
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes["adapter.safetensors"] == expected
    assert set(modes.values()) == {expected}, modes


def test_a_diverged_run_is_one_line_and_its_folder_keeps_the_log(
    synth_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(train_args(synth_root, out, "--set", "train.lr=1e12")) == 2
    err = capsys.readouterr().err
    assert err.startswith("savlt: error: training diverged at step") and "try a lower train.lr" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (out / "history.jsonl").is_file() or (out / "train.log").is_file()  # what shows why it diverged
