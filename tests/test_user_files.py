"""SAVLT never destroys, mixes or mis-states a user's files (README: "What SAVLT writes and never
touches"): no output goes into a data root, --overwrite replaces only SAVLT's own folders and never
one holding an input, synth writes only into its own folders, evaluations follow the run-folder
rules, and a file missing from a run is named instead of being taken for an old run.

Every case runs the CLI as a user would, on a copy of the synthetic data, and checks that every
file of the data root (and of any other folder in harm's way) is still there, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FAST, train_args, tree_digest

from savlt.cli import main
from savlt.engine.runfolder import RunPaths, is_complete
from savlt.io import exclusive

pytestmark = pytest.mark.usefixtures("one_thread")

MANIFEST_NAME = "savlt-manifest.json"  # the names the README gives
LOCK_NAME = ".savlt.lock"

SYNTH = ["--per-class", "1", "--size", "96", "128", "--no-preview"]


@pytest.fixture
def data(synth_root: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic data, as a hospital's export would be (no synth manifest)."""
    root = Path(shutil.copytree(synth_root, tmp_path / "data"))
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    return root


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[Path, Path]:
    """(its data root, a finished run) trained through the CLI on a copy of the synthetic data."""
    base = tmp_path_factory.mktemp("trained")
    root = Path(shutil.copytree(synth_root, base / "data"))
    run = base / "run"
    assert main(train_args(root, run)) == 0
    return root, run


def copy_run(run: Path, target: Path) -> Path:
    """A copy of a run folder without its lock file (a lock holds the pid of its last writer)."""
    return Path(shutil.copytree(run, target, ignore=shutil.ignore_patterns(LOCK_NAME)))


def refused(argv: list[str], capsys) -> str:
    """Run a command that must stop with a one-line error; its message."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("savlt: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def seg_train(root: Path, out: Path) -> list[str]:
    return ["seg", "train", "--data", str(root), "--out", str(out), "--folds", "2", "--epochs", "1"] + [
        "--image-size",
        "32",
        "--encoder-weights",
        "none",
        "-q",
    ]


def pretrain(root: Path, out: Path) -> list[str]:
    return ["pretrain", str(root), "--model", "tiny", "--max-steps", "1", "--out", str(out), "-q"]


def sweep(root: Path, out: Path, folder: Path) -> list[str]:
    base = {
        "data": str(root),
        "data.cache_dir": str(root.parent / "cache"),
        **{key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in FAST)},
    }
    spec = folder / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": base, "grid": {"seed": [5]}}))
    return ["sweep", str(spec), "--out", str(out), "-q"]


# ---------------------------------------------------------------- 1: the data root


@pytest.mark.parametrize("inside", ["huaxi", "mixed", "xiangya/images/cyst"])
def test_overwrite_never_deletes_scans_in_the_data_root(data: Path, inside: str, capsys) -> None:
    before = tree_digest(data)
    err = refused(train_args(data, data / inside, "--overwrite"), capsys)
    assert f"run folder {data / inside} lies inside the data root {data}" in err
    assert tree_digest(data) == before


def test_no_command_writes_its_outputs_into_the_data_root(
    data: Path, trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    _, run = trained
    before = tree_digest(data)
    commands = {
        "run folder": train_args(data, data / "runs" / "k4"),
        "evaluation folder": ["evaluate", str(run), "--data", str(data), "--out", str(data), "-q"],
        "segmenter folder": seg_train(data, data),
        "pretraining folder": pretrain(data, data / "mixed" / "pt"),
        "sweep folder": sweep(data, data / "mixed", tmp_path),
    }
    for what, argv in commands.items():
        err = refused(argv, capsys)
        assert what in err and "never writes its outputs into a data set" in err, err
    assert tree_digest(data) == before


def test_overwrite_never_deletes_files_savlt_did_not_write(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    export = Path(shutil.copytree(root / "huaxi", tmp_path / "export" / "huaxi"))  # elsewhere
    before = tree_digest(export.parent)
    assert "files SAVLT did not write" in refused(train_args(root, export.parent, "--overwrite"), capsys)
    assert tree_digest(export.parent) == before

    mine = copy_run(run, tmp_path / "mine")
    (mine / "notes.txt").write_text("the user's")
    before = tree_digest(mine)
    for argv in (
        train_args(root, mine, "--overwrite"),
        ["evaluate", str(run), "--out", str(mine), "--overwrite", "-q"],
    ):
        err = refused(argv, capsys)
        assert f"holds {mine / 'notes.txt'}, which SAVLT did not write there" in err
    assert tree_digest(mine) == before


def test_seg_train_pretrain_and_sweep_never_write_over_another_output(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    mine = copy_run(run, tmp_path / "run")
    before = tree_digest(mine)
    for argv in (seg_train(root, mine), pretrain(root, mine), sweep(root, mine, tmp_path)):
        assert f"{mine} is not empty" in refused(argv, capsys)
    assert tree_digest(mine) == before


def test_a_sweep_wipes_an_unfinished_point_only_when_savlt_wrote_all_of_it(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, _ = trained
    out = tmp_path / "sweep"
    point = out / "runs" / "seed=5"
    point.mkdir(parents=True)
    (out / MANIFEST_NAME).write_text('{"kind": "sweep"}')  # an earlier sweep's folder
    (point / MANIFEST_NAME).write_text('{"kind": "run"}')  # its point, interrupted
    (point / "config.yaml").write_text("method: savlt\n")
    (point / "notes.txt").write_text("the user's")
    before = tree_digest(out)
    err = refused(sweep(root, out, tmp_path), capsys)
    assert f"holds {point / 'notes.txt'}, which SAVLT did not write there" in err
    assert tree_digest(out) == before


# ---------------------------------------------------------------- 2: synth


def test_synth_never_deletes_an_export(data: Path, capsys) -> None:
    before = tree_digest(data)
    err = refused(["synth", str(data), "--centers", "huaxi", *SYNTH], capsys)
    assert f"{data} is not empty" in err and "its own earlier output" in err
    assert tree_digest(data) == before


def test_synth_replaces_exactly_its_own_output_and_nothing_else(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    argv = ["synth", str(out), "--centers", "mixed", *SYNTH]
    assert main(argv) == 0
    capsys.readouterr()
    mine = out / "mixed" / "images" / "cyst" / "mixed_cyst_0000_annotated.png"  # a user's file
    shutil.copy(out / "mixed" / "images" / "cyst" / "mixed_cyst_0000.png", mine)
    before = tree_digest(out)
    assert f"holds {mine}, which SAVLT did not write there, so it is not replaced" in refused(argv, capsys)
    assert tree_digest(out) == before
    mine.unlink()
    assert main(argv) == 0  # its own output alone is replaced
    assert sorted(json.loads((out / MANIFEST_NAME).read_text())["files"]) == sorted(
        set(tree_digest(out)) - {MANIFEST_NAME, LOCK_NAME}
    )


# ---------------------------------------------------------------- 3: inputs inside the folder replaced


def test_overwrite_refuses_a_folder_holding_an_input(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    old = copy_run(run, tmp_path / "old")
    before = tree_digest(old)
    for name, extra in {
        "data.split_file": [f"--set=data.split_file={old / 'split.json'}"],
        "config file": ["--config", str(old / "config.yaml")],
    }.items():
        err = refused(train_args(root, old, "--overwrite", "--set=train.seed=6", *extra), capsys)
        assert f"{name} " in err and f"lies inside {old}" in err, err
        assert tree_digest(old) == before


def test_a_replacement_stopped_by_a_user_error_puts_the_old_run_back(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    old = copy_run(run, tmp_path / "old")
    before = tree_digest(old)
    err = refused(train_args(root, old, "--overwrite", "--set=data.train_center=nowhere"), capsys)
    assert "nowhere" in err
    assert tree_digest(old) == before


def test_a_failed_train_leaves_the_folder_as_it_found_it(synth_root: Path, tmp_path: Path, capsys) -> None:
    new, empty = tmp_path / "new" / "run", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        refused(train_args(synth_root, out, "--set=data.train_center=nowhere"), capsys)
    assert not (tmp_path / "new").exists() and not list(empty.iterdir())


# ---------------------------------------------------------------- 4-5: evaluation folders


def test_evaluate_never_writes_over_a_run(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, run = trained
    other = copy_run(run, tmp_path / "other")
    before = tree_digest(other)
    err = refused(["evaluate", str(run), "--out", str(other), "-q"], capsys)
    assert f"evaluation folder {other} is not empty: it holds a finished run" in err and "--overwrite" in err
    err = refused(["evaluate", str(other), "--out", str(other), "--overwrite", "-q"], capsys)
    assert f"run folder {other} lies inside {other}" in err  # the run evaluated is never replaced
    assert tree_digest(other) == before and is_complete(other)

    assert main(["evaluate", str(run), "--out", str(other), "--overwrite", "-q"]) == 0
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "evaluation" and manifest["run"] == str(run.resolve())
    assert not (other / "adapter.safetensors").exists() and not (other / ".savlt-replaced").exists()


def test_an_evaluation_replaces_its_own_earlier_one_entirely(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = trained
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--centers", "huaxi", "--out", str(out), "-q"]) == 0
    assert (out / "predictions" / "huaxi.csv").is_file() and (out / "confusion_huaxi.png").is_file()
    assert main(["evaluate", str(run), "--centers", "xiangya", "--out", str(out), "-q"]) == 0
    assert [p.name for p in (out / "predictions").iterdir()] == ["xiangya.csv"]
    assert not list(out.glob("*huaxi*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["centers"]) == ["xiangya"] and metrics["complete"] is True
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert sorted(files) == sorted(set(tree_digest(out)) - {MANIFEST_NAME, LOCK_NAME})


def test_one_process_evaluates_into_a_folder_at_a_time(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    _, run = trained
    out = tmp_path / "eval"
    with exclusive(RunPaths(out).lock, "held by the test"):  # as another `savlt evaluate` would hold it
        err = refused(["evaluate", str(run), "--out", str(out), "-q"], capsys)
    assert f"another savlt process is writing the evaluation folder {out}" in err
    assert not (out / "metrics.json").exists()


def test_a_stopped_evaluation_never_looks_finished(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    import savlt.engine.loaded

    _, run = trained
    out = tmp_path / "eval"
    argv = ["evaluate", str(run), "--centers", "huaxi", "--out", str(out), "-q"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(savlt.engine.loaded, "write_run_report", killed)
    assert main(argv) == 130
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["centers"]) == ["huaxi"] and "complete" not in metrics
    monkeypatch.undo()
    assert main(argv) == 0  # the stopped evaluation of this run is replaced
    assert json.loads((out / "metrics.json").read_text())["complete"] is True


# ---------------------------------------------------------------- 7: a run's missing files


def test_a_missing_calibration_is_named_not_taken_for_an_old_run(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    copy = copy_run(run, tmp_path / "run")
    (copy / "calibration.json").unlink()
    scan = str(next((root / "huaxi" / "images").rglob("*.jpg")))
    predict = ["predict", str(copy), scan, "-q"]
    for argv in (predict, ["evaluate", str(copy), "-q"]):
        err = refused(argv, capsys)
        assert f"calibration file {copy / 'calibration.json'} is missing: the run wrote it" in err
    assert not (copy / "evaluation").exists()

    (copy / MANIFEST_NAME).unlink()  # a run made before manifests, whose metrics.json records the fit
    assert "records the fit" in refused(predict, capsys)

    metrics = json.loads((copy / "metrics.json").read_text())
    del metrics["validation_fit"]  # a run made before calibration existed: it loads, and says so
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert main(predict) == 0
    assert "this run predates calibration" in capsys.readouterr().out


# ---------------------------------------------------------------- folders recognised by their content


def test_user_files_named_like_a_run_are_never_taken_for_one(data: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    (mine / "predictions").mkdir(parents=True)
    (mine / "config.yaml").write_text("method: savlt\n")  # even one SAVLT reads as its configuration
    (mine / "report.md").write_text("# my report\n")
    (mine / "metrics.json").write_text('{"accuracy": 0.9}')
    (mine / "predictions" / "mine.csv").write_text("file,label\n")
    before = tree_digest(mine)
    err = refused(train_args(data, mine, "--overwrite"), capsys)
    assert "files SAVLT did not write" in err and "not a SAVLT run or evaluation" in err
    assert tree_digest(mine) == before


def test_pretrain_continues_only_a_pretraining(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    root, run = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("method: savlt\n")
    (mine / "README.md").write_text("# my model\n")
    (mine / "notes.txt").write_text("the user's")
    old = copy_run(run, tmp_path / "old")
    (old / MANIFEST_NAME).unlink()  # a run made before manifests
    stopped = tmp_path / "stopped"  # a pretraining stopped before its first checkpoint ...
    stopped.mkdir()
    (stopped / MANIFEST_NAME).write_text('{"kind": "pretraining"}')
    (stopped / "notes.txt").write_text("the user's")  # ... holding a file of the user's
    before = {folder: tree_digest(folder) for folder in (mine, old, stopped)}
    for folder in (mine, old):
        err = refused(pretrain(root, folder), capsys)
        assert f"pretraining folder {folder} is not empty" in err
    err = refused(pretrain(root, stopped), capsys)
    assert f"holds {stopped / 'notes.txt'}, which SAVLT did not write there, so it is not continued" in err
    assert {folder: tree_digest(folder) for folder in (mine, old, stopped)} == before
    # the run made before manifests is still recognised as a run, and replaced as one
    assert main(["evaluate", str(run), "--centers", "huaxi", "--out", str(old), "--overwrite", "-q"]) == 0


# ---------------------------------------------------------------- what the manifest records


def test_a_file_dropped_in_while_a_command_runs_is_never_recorded_as_savlts(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch, caplog, capsys
) -> None:
    import savlt.engine.loaded

    _, run = trained
    out = tmp_path / "eval"
    argv = ["evaluate", str(run), "--centers", "huaxi", "--out", str(out), "-q"]
    report = savlt.engine.loaded.write_run_report

    def the_user_drops_a_file(folder, *args, **kwargs):
        (folder / "notes.txt").write_text("the user's")
        return report(folder, *args, **kwargs)

    monkeypatch.setattr(savlt.engine.loaded, "write_run_report", the_user_drops_a_file)
    assert main(argv) == 0
    assert f"holds {out / 'notes.txt'}, which SAVLT did not write: left out of its manifest" in caplog.text
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert "notes.txt" not in files and "metrics.json" in files
    monkeypatch.undo()
    before = tree_digest(out)
    err = refused(argv, capsys)  # an evaluation of the same run is replaced: not while it holds that
    assert f"holds {out / 'notes.txt'}, which SAVLT did not write there, so it is not replaced" in err
    assert tree_digest(out) == before


def test_an_unfinished_run_holding_a_users_file_is_not_continued(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    stopped = copy_run(run, tmp_path / "run")
    (stopped / MANIFEST_NAME).write_text('{"kind": "run"}')  # as a run stopped halfway leaves it
    metrics = json.loads((stopped / "metrics.json").read_text())
    del metrics["complete"]
    (stopped / "metrics.json").write_text(json.dumps(metrics))
    (stopped / "notes.txt").write_text("the user's")
    before = tree_digest(stopped)
    err = refused(train_args(root, stopped), capsys)
    assert f"holds {stopped / 'notes.txt'}, which SAVLT did not write there, so it is not continued" in err
    assert tree_digest(stopped) == before


# ---------------------------------------------------------------- predict, serve: the files named


def test_predict_never_writes_over_an_input_a_users_file_or_into_the_data(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    scan = next((root / "huaxi" / "images").rglob("*.jpg"))
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("patient,age\n1,40\n")
    before = tree_digest(root), theirs.read_bytes()
    for csv_file, message in (
        (scan, "is one of the scans to predict"),
        (theirs, "is not a predictions CSV SAVLT wrote"),
        (root / "huaxi" / "predictions.csv", f"lies inside the data root {root}"),
    ):
        assert message in refused(["predict", str(run), str(scan), "--csv", str(csv_file), "-q"], capsys)
    assert (tree_digest(root), theirs.read_bytes()) == before
    ours = tmp_path / "ours.csv"
    for _ in range(2):  # a predictions CSV SAVLT wrote is replaced
        assert main(["predict", str(run), str(scan), "--csv", str(ours), "-q"]) == 0
    assert ours.read_text().startswith("path,predicted,p_high_risk,")


def test_heat_maps_never_go_into_the_data_or_over_a_users_file(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, run = trained
    scans = Path(shutil.copytree(root / "huaxi" / "images" / "cyst", tmp_path / "scans"))
    scan = sorted(scans.iterdir())[0]
    heat = tmp_path / "heat"
    theirs = heat / f"0000_{scan.stem}_heatmap.png"  # the user's file, named as the heat map would be
    theirs.parent.mkdir()
    shutil.copy(scan, theirs)
    before = tree_digest(root), tree_digest(tmp_path)
    for folder, message in (
        (root / "huaxi" / "images" / "cyst", f"lies inside the data root {root}"),
        (scans / "heat", f"lies inside the input folder {scans}"),
        (heat, f"{theirs} exists and is not a heat map SAVLT wrote"),
    ):
        argv = [
            "predict",
            str(run),
            str(scans if "input" in message else scan),
            "--heatmap",
            str(folder),
            "-q",
        ]
        assert message in refused(argv, capsys)
    assert (tree_digest(root), tree_digest(tmp_path)) == before and not (scans / "heat").exists()
    theirs.unlink()
    for _ in range(2):  # its own heat maps are replaced
        assert main(["predict", str(run), str(scan), "--heatmap", str(heat), "-q"]) == 0
    assert [p.name for p in heat.iterdir()] == [theirs.name]


def test_serve_never_keeps_uploads_in_the_data_root(trained: tuple[Path, Path], capsys) -> None:
    root, run = trained
    kept = root / "uploads"
    # an address nobody can listen on: a server that got past the check stops there, not serving
    err = refused(["serve", str(run), "--keep-uploads", str(kept), "--host", "203.0.113.1"], capsys)
    assert f"upload folder (--keep-uploads) {kept} lies inside the data root {root}" in err
    assert not kept.exists()


def test_evaluate_on_other_data_never_writes_into_the_runs_own_data(
    data: Path, trained: tuple[Path, Path], capsys
) -> None:
    root, run = trained
    before = tree_digest(root)
    out = root / "reports"
    err = refused(["evaluate", str(run), "--data", str(data), "--out", str(out), "-q"], capsys)
    assert f"evaluation folder {out} lies inside the data root {root}" in err
    assert tree_digest(root) == before and not out.exists()


# ---------------------------------------------------------------- seg: masks and reports


@pytest.mark.slow
def test_seg_predict_overwrites_only_the_masks_it_predicted(data: Path, tmp_path: Path, capsys) -> None:
    seg = tmp_path / "seg"
    assert main(seg_train(data, seg)) == 0
    masks = data / "mixed" / "masks"
    drawn = tree_digest(masks)  # every mask of the copy is a ground truth drawn by hand
    predict = ["seg", "predict", str(seg), "--data", str(data), "--centers", "mixed", "-q"]
    assert main([*predict, "--overwrite"]) == 0
    assert "kept 40 existing file(s) SAVLT did not write" in capsys.readouterr().out
    assert tree_digest(masks) == drawn

    gone = sorted(masks.rglob("*.png"))[:2]  # two scans without a mask get predicted ones
    for mask in gone:
        mask.unlink()
    assert main(predict) == 0
    predicted = {m: m.read_bytes() for m in gone}
    gone[0].write_bytes(with_a_line(gone[0]))  # the user corrects one predicted mask
    corrected = gone[0].read_bytes()
    assert main([*predict, "--overwrite"]) == 0
    assert "wrote 1 mask(s)" in capsys.readouterr().out
    assert gone[0].read_bytes() == corrected and gone[1].read_bytes() == predicted[gone[1]]
    still = {k: v for k, v in tree_digest(masks).items() if (masks / k) not in gone}
    assert still == {k: v for k, v in drawn.items() if (masks / k) not in gone}

    assert main(["seg", "evaluate", str(seg), "--data", str(data), "--centers", "mixed"]) == 0
    assert (seg / "roi_quality.json").is_file()
    assert main([*seg_train(data, seg), "--overwrite"]) == 0  # its own report is SAVLT's too
    assert not (seg / "roi_quality.json").exists()


def with_a_line(mask: Path) -> bytes:
    """The PNG bytes of `mask` with its first row set, as a user's correction would."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(mask) as image:
        pixels = np.asarray(image).copy()
    pixels[0] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_seg_evaluate_never_replaces_a_users_report_nor_writes_into_the_data(
    data: Path, tmp_path: Path, capsys
) -> None:
    evaluate = ["seg", "evaluate", "--data", str(data), "--centers", "mixed", "-q", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "roi_quality.md").write_text("# my notes on the masks\n")
    before = tree_digest(data), tree_digest(mine)
    for out, message in (
        (mine, f"{mine / 'roi_quality.md'} exists and is not a report SAVLT wrote"),
        (data / "reports", f"lies inside the data root {data}"),
    ):
        assert message in refused([*evaluate, str(out)], capsys)
    assert (tree_digest(data), tree_digest(mine)) == before and not (data / "reports").exists()
    for _ in range(2):  # its own report is replaced
        assert main([*evaluate, str(tmp_path / "ours")]) == 0


def test_seg_import_never_replaces_a_file(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "segmenter.json").write_text('{"my": "notes"}')
    before = tree_digest(mine)
    argv = ["seg", "import", str(tmp_path / "unet.pth"), "--arch", "unet", "--encoder", "resnet18"]
    err = refused([*argv, "--out", str(mine)], capsys)
    assert f"segmenter folder {mine} already holds segmenter.json" in err
    assert tree_digest(mine) == before


# ---------------------------------------------------------------- sweep, synth: the lock


def test_a_sweep_checks_a_point_folder_again_right_before_wiping_it(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    import savlt.sweep.runner

    root, _ = trained
    out = tmp_path / "sweep"
    point = out / "runs" / "seed=5"
    point.mkdir(parents=True)
    (out / MANIFEST_NAME).write_text('{"kind": "sweep"}')  # an earlier sweep's folder
    (point / MANIFEST_NAME).write_text('{"kind": "run"}')  # its point, interrupted
    warm = savlt.sweep.runner.warm_data_cache

    def the_user_drops_a_file(points):  # after the sweep checked its folder, before the point starts
        (point / "notes.txt").write_text("the user's")
        return warm(points)

    monkeypatch.setattr(savlt.sweep.runner, "warm_data_cache", the_user_drops_a_file)
    err = refused(sweep(root, out, tmp_path), capsys)
    assert f"holds {point / 'notes.txt'}, which SAVLT did not write there, so it is not wiped" in err
    assert (point / "notes.txt").read_text() == "the user's"


def test_synth_takes_the_folders_lock(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    with exclusive(out / LOCK_NAME, "held by the test"):  # as another `savlt synth` would hold it
        err = refused(["synth", str(out), "--centers", "mixed", *SYNTH], capsys)
    assert f"another savlt process is writing the synthetic data folder {out}" in err
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
