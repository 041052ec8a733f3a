"""Safe on a real hospital export: run folders are never mixed, no scan is dropped silently, bad
files stop a run before training, and what cannot be assessed is not diagnosed.

Every bad data root is built inside the test from small files (class folders spelled by people,
system debris, 16-bit and float TIFFs, a center without one class, scans in the wrong folder).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import FAST, fast_config
from PIL import Image

from savlt.classes import DEFAULT_CLASSES, ClassMap
from savlt.cli import main
from savlt.config import ConfigError, load_config
from savlt.data.check import check_dataset
from savlt.data.discover import DataError, scan_dataset
from savlt.data.prepare import resolve_few_shot, resolve_split
from savlt.data.quality import Thresholds, assess, check_scans
from savlt.data.splits import ratio_split, sample_few_shot
from savlt.engine.inputs import prepare_inputs
from savlt.engine.loaded import load_run
from savlt.engine.runfolder import RunPaths
from savlt.engine.training import train
from savlt.errors import SavltError
from savlt.io import OutputError, exclusive
from savlt.report.plots import heatmap_png, relative_attention

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ClassMap(tuple(DEFAULT_CLASSES))
HSIL = "high-grade_squamous_intraepithelial_lesion"


# ---------------------------------------------------------------- building bad data roots


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


@pytest.fixture(scope="module")
def export_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[Path, Path]:
    """A trained run on an export-like root: the training center `mixed` and a new hospital
    without cysts, with two scans that cannot be assessed (a black PNG, an all-NaN float TIFF)."""
    base = tmp_path_factory.mktemp("export")
    root = base / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    hospital = copy_center(synth_root / "huaxi", root / "newhosp", drop=("cyst",))
    black_png(hospital / "images" / "cancer" / "black.png")
    nan_tiff(hospital / "images" / "ectropion" / "nan.tif")
    out = base / "run"
    train(fast_config(root, "data.test_centers=[newhosp]"), out, progress=False)
    return root, out


# ---------------------------------------------------------------- 1-3: run folders


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [*FAST, f"data.cache_dir={root.parent / 'cache'}", "data.test_centers=[]"]
    return ["train", "--data", str(root), "--out", str(out), "-q", *(f"--set={s}" for s in sets), *extra]


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
    assert check_claim(paths.root, "run", **run_folder_rules(cfg)) is False  # the same unfinished run: continued
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
    spec.write_text(yaml.safe_dump({"base": {"data": str(synth_root), "model": "tiny"}, "grid": {"seed": [5]}}))
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


# ---------------------------------------------------------------- 4-6: one scanning rule, nothing dropped


def messy_root(synth_root: Path, tmp_path: Path) -> Path:
    """An export: two centers, an exports/ folder, a run folder, __MACOSX/, debris everywhere."""
    root = tmp_path / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    copy_center(synth_root / "xiangya", root / "xiangya")
    (root / "exports").mkdir()
    (root / "exports" / "study.zip").write_bytes(b"PK\x03\x04")
    (root / "exports" / "2024").mkdir()
    (root / "exports" / "2024" / "list.csv").write_text("a,b\n")
    run = root / "runs" / "k4"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: savlt\n")
    (run / "metrics.json").write_text("{}")
    scan_png(run / "roc_mixed.png")  # report figures are not scans
    scan_png(root / "__MACOSX" / "mixed" / "images" / "cyst" / "._a.png")
    for folder in (root, root / "mixed", root / "mixed" / "images", root / "mixed" / "images" / "cyst"):
        debris(folder)
    debris(root / "xiangya" / "masks" / "cancer")
    return root


def test_data_check_and_train_agree_on_what_a_center_is(synth_root: Path, tmp_path: Path, capsys) -> None:
    root = messy_root(synth_root, tmp_path)
    report = check_dataset(root, CLASSES, progress=False)
    assert sorted(report.scan.centers) == ["mixed", "xiangya"]
    assert set(report.scan.skipped) == {"exports", "runs"}  # __MACOSX is debris, not even a note
    assert report.clean, [p.message for p in report.problems]
    assert main(["data", "check", str(root), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Not centers" in out and "exports: it holds no class folders" in out and "No problems found" in out

    cfg = fast_config(root)
    inputs = prepare_inputs(cfg)  # what `train` reads: the same two centers, no failure
    assert inputs.test_centers == ["xiangya"]
    with pytest.raises(DataError, match=r"'exports' .* is not used as a center: it holds no class folders"):
        prepare_inputs(fast_config(root, "data.test_centers=[exports]"))
    with pytest.raises(DataError, match="looks like a center folder itself: pass the folder above it"):
        scan_dataset(root / "mixed", CLASSES)


def test_a_folder_of_scans_without_class_folders_is_reported_by_both(
    synth_root: Path, tmp_path: Path, caplog
) -> None:
    root = tmp_path / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    scan_png(root / "hospital3" / "CIN-III" / "a.png")  # a spelling no alias knows
    report = check_dataset(root, CLASSES, progress=False)
    assert [p.kind for p in report.problems] == ["not_a_center"]
    message = report.problems[0].message
    assert (
        "hospital3" in message and "1 image(s)" in message and "data.class_aliases.CIN-III=CLASS" in message
    )
    with caplog.at_level(logging.WARNING):
        prepare_inputs(fast_config(root))
    assert "hospital3" in caplog.text and "no class folders" in caplog.text


def test_images_outside_class_folders_are_reported_not_dropped(
    synth_root: Path, tmp_path: Path, caplog
) -> None:
    root = tmp_path / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    copy_center(synth_root / "huaxi", root / "huaxi")
    loose = [
        scan_png(root / "mixed" / "stray.png"),
        scan_png(root / "mixed" / "images" / "unsorted_1.png"),
        scan_png(root / "huaxi" / "images" / "unsorted_2.tif"),
    ]
    report = check_dataset(root, CLASSES, progress=False)
    assert sorted(p.path for p in report.problems) == sorted(loose)
    assert {p.kind for p in report.problems} == {"outside_class_folder"}
    with caplog.at_level(logging.WARNING):
        prepare_inputs(fast_config(root))
    assert "3 image(s) outside any class folder" in caplog.text
    assert all(str(p) in caplog.text for p in loose)  # the count and the first paths


def test_debris_is_ignored_everywhere_other_files_stay_reported(synth_root: Path, tmp_path: Path) -> None:
    root = messy_root(synth_root, tmp_path)
    notes = root / "mixed" / "images" / "cyst" / "notes.txt"
    notes.write_text("a note")
    (root / "xiangya" / "readme.pdf").write_bytes(b"%PDF")
    report = check_dataset(root, CLASSES, progress=False)
    assert sorted((p.kind, p.path) for p in report.problems) == [
        ("not_an_image", notes),
        ("not_an_image", root / "xiangya" / "readme.pdf"),
    ]
    assert report.scan.center("mixed").counts()["cyst"] == 8


# ---------------------------------------------------------------- 7: fail before training


def test_unreadable_files_stop_train_before_the_first_step_all_listed(
    synth_root: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    copy_center(synth_root / "huaxi", root / "huaxi")
    bad = [
        truncated_png(root / "huaxi" / "images" / "cyst" / "cut.png"),
        (root / "huaxi" / "images" / "cancer" / "empty.jpg"),
        (root / "mixed" / "images" / "cyst" / "text.png"),
    ]
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    out = tmp_path / "run"
    sets = [*FAST, f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "--data", str(root), "--out", str(out), "-q", *(f"--set={s}" for s in sets)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("savlt: error: 3 file(s) cannot be read, so nothing was trained")
    assert all(str(path) in err for path in bad)
    assert not out.exists()  # the failed attempt left nothing behind, not even the folder it made
    listed = {p.path for p in check_dataset(root, CLASSES, progress=False).problems}
    assert listed == set(bad)  # `savlt data check` finds the same files


def test_the_decode_check_runs_in_parallel_and_keeps_the_order(synth_root: Path, monkeypatch) -> None:
    import savlt.data.quality as quality

    scans = [(p, None) for p in sorted((synth_root / "xiangya" / "images").rglob("*.tif"))]
    serial = check_scans(scans, progress=False)
    monkeypatch.setattr(quality, "PARALLEL_MIN", 4)
    monkeypatch.setattr(quality.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert quality._worker_count(len(scans)) > 1 if sys.platform.startswith("linux") else True
    assert check_scans(scans, progress=False) == serial
    assert [c.path for c in serial] == [p for p, _ in scans]


# ---------------------------------------------------------------- 8: scans that cannot be assessed


def test_scans_that_cannot_be_assessed_are_recognised(synth_root: Path, tmp_path: Path) -> None:
    from savlt.data.imageio import decode_image

    def reason(path: Path) -> str | None:
        return assess(*decode_image(path), Thresholds())

    assert (
        reason(next((synth_root / "xiangya" / "images" / "cyst").glob("*.tif"))) is None
    )  # 16-bit, part range
    assert "near-constant" in reason(black_png(tmp_path / "black.png"))
    assert "no finite pixel values" in reason(nan_tiff(tmp_path / "nan.tif"))
    flat = (1000 + np.random.default_rng(0).integers(0, 3, (48, 64))).astype(np.uint16)
    tifffile.imwrite(tmp_path / "flat16.tif", flat)  # stretched to 0..255 by its own range, yet flat
    assert "near-constant" in reason(tmp_path / "flat16.tif")
    line = np.zeros((48, 64), np.uint8)
    line[-1] = 200
    Image.fromarray(line).save(tmp_path / "line.png")
    assert "almost no tissue" in reason(tmp_path / "line.png")
    assert reason(scan_png(tmp_path / "ok.png")) is None
    report = check_dataset(synth_root, CLASSES, progress=False)
    assert not [p for p in report.problems if p.kind == "unassessable"]  # synthetic data is fine


def test_predict_gives_no_diagnosis_for_a_black_scan(export_run, tmp_path: Path, capsys) -> None:
    root, run = export_run
    black = black_png(tmp_path / "black.png")
    good = next((root / "newhosp" / "images" / "cancer").glob("*.jpg"))
    assert main(["predict", str(run), str(black), str(good), "--json", "-q"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first["assessable"] is False and first["predicted"] is None and not first["probabilities"]
    assert "near-constant" in first["reason"] and first["high_risk_probability"] is None
    assert second["assessable"] is True and second["predicted"] in second["probabilities"]
    assert main(["predict", str(run), str(black), "-q"]) == 0
    assert "not assessable, no diagnosis" in capsys.readouterr().out


def test_evaluation_counts_unassessable_scans_and_excludes_them(export_run, tmp_path: Path) -> None:
    root, run = export_run
    metrics = json.loads((run / "metrics.json").read_text())
    hospital = metrics["centers"]["newhosp"]
    assert metrics["unassessable_policy"] == "exclude"
    assert hospital["unassessable"] == 2 and hospital["n"] == 32  # 4 classes × 8, the two left out
    assert metrics["centers"]["mixed"]["unassessable"] == 0
    report = (run / "report.md").read_text()
    assert "32 (+2 not assessable, excluded)" in report and "2 scan(s) could not be assessed" in report
    with (run / "predictions" / "newhosp.csv").open() as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert (
        rows["black.png"]["assessable"] == "0"
        and "near-constant" in rows["black.png"]["not_assessable_because"]
    )
    assert len(rows) == 34
    # a scan that cannot be assessed is not diagnosed in the CSV either: no class, probabilities or referral
    model_columns = [k for k in rows["black.png"] if k.startswith(("p_", "logit_"))]
    model_columns += ["predicted", "referral", "prediction_set", "auc_score", "roi_y0"]
    assert all(rows["black.png"][k] == "" for k in model_columns)
    assert all(rows[name][k] != "" for name in rows if name not in ("black.png", "nan.tif") for k in model_columns)

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "config.yaml").read_text().replace("unassessable: exclude", "unassessable: include")
    (copy / "config.yaml").write_text(text)
    included = load_run(copy).evaluate(centers=["newhosp"], progress=False)["centers"]["newhosp"]
    assert included["n"] == 34 and included["unassessable"] == 2
    with (copy / "evaluation" / "predictions" / "newhosp.csv").open() as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert rows["black.png"]["assessable"] == "0" and rows["black.png"]["predicted"]  # scored, as the policy says


# ---------------------------------------------------------------- 9: class aliases


def test_unknown_folder_error_shows_the_syntax_that_works(synth_root: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    copy_center(synth_root / "mixed", root / "mixed")
    (root / "mixed" / "images" / "cyst").rename(root / "mixed" / "images" / "Zyste")
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "r"), "--model", "tiny", "-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown class folder 'Zyste'" in err and err.count("\n") == 1
    flag = "--set data.class_aliases.Zyste=cyst"
    assert flag in err and "data: {class_aliases: {Zyste: cyst}}" in err  # the closest class is suggested
    cfg = load_config(overrides=[flag.split(" ", 1)[1]])  # what the message says works
    assert scan_dataset(root, cfg.class_map()).center("mixed").counts()["cyst"] == 8
    yaml_file = tmp_path / "aliases.yaml"
    yaml_file.write_text("data: {class_aliases: {Zyste: cyst}}\n")
    assert load_config(yaml_file).class_map().resolve("Zyste") == "cyst"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([f"data.class_aliases={{{HSIL}: HSIL}}"], r"wrong way round.*data.class_aliases.HSIL=high-grade"),
        (["data.class_aliases.HSIL=hsil-lesion"], "'hsil-lesion' is not a configured class"),
        (["data.class_aliases.cyst=cancer"], "'cyst' is already the name of class 'cyst'"),
        (["data.class_aliases={hsil: cancer, HSIL: cyst}"], "same folder name once case"),
        (
            [
                "data.high_risk=[]",
                "data.classes=[{name: Cyst, description: a}, {name: cyst, description: b}]",
            ],
            "'Cyst' and 'cyst' are the same folder name",
        ),
    ],
)
def test_bad_aliases_are_one_line_errors(overrides: list[str], message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
    argv = ["data", "check", str(tmp_path), *(a for o in overrides for a in ("--set", o))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_clinicians_spellings_map_to_the_default_classes() -> None:
    spellings = {
        "HSIL": HSIL,
        "CIN2+": HSIL,
        "CIN 3": HSIL,
        "carcinoma": "cancer",
        "SCC": "cancer",
        "Inflammation": "mild_inflammation",
        "cervicitis": "mild_inflammation",
        "Cervical Ectropion": "ectropion",
        "ectopy": "ectropion",
        "Nabothian cyst": "cyst",
    }
    assert {folder: CLASSES.resolve(folder) for folder in spellings} == spellings
    user = ClassMap(tuple(DEFAULT_CLASSES), (("SCC", "cyst"),))  # a user alias wins over a built-in
    assert user.resolve("scc") == "cyst"
    with pytest.raises(SavltError, match="unknown class folder 'tumour'"):
        CLASSES.resolve("tumour")


# ---------------------------------------------------------------- 10: seeds, schedules, caches, shots


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


def test_corrupt_cached_split_and_few_shot_files(synth_root: Path, tmp_path: Path, caplog) -> None:
    center = scan_dataset(synth_root, CLASSES, ["mixed"]).center("mixed")
    split = resolve_split(center, tmp_path, [0.45, 0.15, 0.40], 0)
    few = resolve_few_shot(split, center, 2, 5, tmp_path)
    (cached_split,) = tmp_path.glob("split_*.json")
    (cached_few,) = tmp_path.glob("fewshot_*.json")
    cached_few.write_bytes(b"\xff\xfe{ half")
    with caplog.at_level(logging.WARNING):
        assert resolve_few_shot(split, center, 2, 5, tmp_path).train == few.train  # drawn again
    assert str(cached_few) in caplog.text and "drawing it again" in caplog.text
    assert json.loads(cached_few.read_text())["train"] == few.train  # and rebuilt
    cached_split.write_bytes(b"\x00\x01 not json")
    with pytest.raises(DataError, match=f"delete {cached_split}"):
        resolve_split(center, tmp_path, [0.45, 0.15, 0.40], 0)


def test_a_corrupt_run_file_is_named_by_evaluate(export_run, tmp_path: Path, capsys) -> None:
    _, run = export_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "fewshot.json").write_text('{"train": [')
    assert main(["evaluate", str(copy), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"few-shot file {copy / 'fewshot.json'} is corrupt" in err and err.count("\n") == 1


def test_too_many_shots_are_refused_with_the_class_counts(synth_root: Path) -> None:
    center = scan_dataset(synth_root, CLASSES, ["mixed"]).center("mixed")
    split = ratio_split(center, [0.45, 0.15, 0.40], seed=0)  # 4 training images per class
    assert len(sample_few_shot(split, center, shots=16, seed=0).train) == 80  # 4× with repeats: allowed
    with pytest.raises(DataError, match=r"train.shots=17 .* \(training images per class: cancer 4, cyst 4"):
        sample_few_shot(split, center, shots=17, seed=0)


# ---------------------------------------------------------------- 11-12: new data


def test_predict_takes_folders_and_goes_on_past_unreadable_files(export_run, tmp_path: Path, capsys) -> None:
    root, run = export_run
    folder = tmp_path / "incoming"
    copy_center(root / "newhosp" / "images" / "cancer", folder / "day1")
    scan_png(folder / "day2" / "deep" / "a.png")
    truncated_png(folder / "day2" / "cut.png")
    (folder / "day2" / "notes.txt").write_text("x")
    debris(folder / "day2")
    table = tmp_path / "out" / "predictions.csv"
    assert main(["predict", str(run), str(folder), "--csv", str(table)]) == 1
    captured = capsys.readouterr()
    assert "predicting" in captured.err  # the progress bar
    assert "1 of 11 image(s) could not be read" in captured.err and "cut.png" in captured.err
    assert "1 file(s) that are not images left out" in captured.err
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 11 and {Path(r["path"]).name for r in rows} >= {"a.png", "cut.png", "black.png"}
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["cut.png"]["error"] and not by_name["cut.png"]["predicted"]
    assert by_name["black.png"]["assessable"] == "0" and not by_name["black.png"]["predicted"]
    assert by_name["a.png"]["predicted"] in DEFAULT_CLASSES and float(by_name["a.png"]["p_high_risk"]) >= 0
    assert (
        main(["predict", str(run), str(tmp_path / "empty-folder-missing")]) == 1
    )  # a missing file: reported


def test_evaluate_on_a_new_hospitals_export(export_run, tmp_path: Path, capsys) -> None:
    root, run = export_run
    new_root = tmp_path / "export"
    copy_center(root / "newhosp", new_root / "hosp2")
    out = tmp_path / "eval"
    assert (
        main(["evaluate", str(run), "--data", str(new_root), "--centers", "hosp2", "--out", str(out), "-q"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["centers"]) == ["hosp2"] and metrics["centers"]["hosp2"]["n"] == 32
    assert "hosp2" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(new_root), "--centers", "hosp2,mixed", "-q"]) == 2
    assert "leave it out of --centers" in capsys.readouterr().err


# ---------------------------------------------------------------- 13: the report


def test_report_shows_every_interval_per_class_tables_and_absent_classes(export_run) -> None:
    _, run = export_run
    report = (run / "report.md").read_text()
    for title in ("sensitivity [95% CI]", "specificity [95% CI]", "PPV [95% CI]", "NPV [95% CI]"):
        assert title in report
    metrics = json.loads((run / "metrics.json").read_text())
    ci = metrics["centers"]["newhosp"]["ci95"]["binary"]["sensitivity"]
    assert f"[{ci[0]:.3f}, {ci[1]:.3f}]" in report
    assert report.count("| class | scans | recall | precision | F1 |") == 2  # one per center
    assert "No scans of cyst in this center" in report
    section = report.split("## newhosp")[1]
    assert "| cyst | 0 | n/a |" in section and "| HSIL | 8 |" in section


def test_heat_maps_use_a_fixed_scale_with_a_colour_bar(tmp_path: Path) -> None:
    uniform = np.zeros((14, 14))
    uniform[4:] = 1 / (10 * 14)  # attention spread evenly over the ROI rows
    relative = relative_attention(uniform)
    assert np.allclose(relative[4:], 1.0) and np.all(relative[:4] == 0)  # "1 = uniform", not a hot spot
    peaked = uniform.copy()
    peaked[8, 8] += 0.2
    peaked /= peaked.sum()
    assert relative_attention(peaked)[8, 8] > 4 * relative_attention(peaked)[5, 5]
    image = np.full((96, 128, 3), 120, np.uint8)
    heatmap_png(image, uniform, (0.0, 0.3, 1.0, 1.0), tmp_path / "uniform.png")
    with Image.open(tmp_path / "uniform.png") as png:
        assert png.width > 2 * image.shape[1]  # the scan, a colour bar and its label
