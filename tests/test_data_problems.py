"""A real hospital export read as it is: what a center is, nothing dropped silently, debris
ignored, unreadable files stopping a run before training with the full list, scans that cannot
be assessed recognised, class folders spelled by people, corrupt cached splits, too many shots.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import (
    FAST,
    black_png,
    copy_center,
    debris,
    fast_config,
    nan_tiff,
    scan_png,
    truncated_png,
)
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
from savlt.errors import SavltError

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ClassMap(tuple(DEFAULT_CLASSES))
HSIL = "high-grade_squamous_intraepithelial_lesion"


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


def test_a_usable_scan_is_decoded_once_per_process_until_its_file_changes(
    small_tree: Path, monkeypatch
) -> None:
    import savlt.data.quality as quality

    monkeypatch.setattr(quality, "_USABLE", {})
    decoded: list[Path] = []
    check_all = quality._check_all

    def counting(items, progress, desc):
        decoded.extend(path for path, _, _ in items)
        return check_all(items, progress, desc)

    monkeypatch.setattr(quality, "_check_all", counting)
    scans = [(p, None) for p in sorted((small_tree / "mixed" / "images").rglob("*.png"))]
    first = check_scans(scans, progress=False)
    assert len(decoded) == len(scans)
    assert check_scans(scans, progress=False) == first and len(decoded) == len(scans)  # remembered
    os.utime(scans[0][0], ns=(1, 1))  # the file changed
    assert check_scans(scans, progress=False) == first and decoded[len(scans) :] == [scans[0][0]]
    stricter = check_scans(scans, Thresholds(min_contrast=1e9), progress=False)  # other thresholds: checked
    assert len(decoded) == 2 * len(scans) + 1 and all(c.unassessable for c in stricter)


def test_the_decode_check_runs_in_parallel_and_keeps_the_order(synth_root: Path, monkeypatch) -> None:
    import savlt.data.quality as quality

    scans = [(p, None) for p in sorted((synth_root / "xiangya" / "images").rglob("*.tif"))]
    serial = check_scans(scans, progress=False)
    monkeypatch.setattr(quality, "PARALLEL_MIN", 4)
    monkeypatch.setattr(quality.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert quality._worker_count(len(scans)) > 1 if sys.platform.startswith("linux") else True
    monkeypatch.setattr(quality, "_USABLE", {})  # decode them again, in parallel this time
    assert check_scans(scans, progress=False) == serial
    assert [c.path for c in serial] == [p for p, _ in scans]


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


def test_too_many_shots_are_refused_with_the_class_counts(synth_root: Path) -> None:
    center = scan_dataset(synth_root, CLASSES, ["mixed"]).center("mixed")
    split = ratio_split(center, [0.45, 0.15, 0.40], seed=0)  # 4 training images per class
    assert len(sample_few_shot(split, center, shots=16, seed=0).train) == 80  # 4× with repeats: allowed
    with pytest.raises(DataError, match=r"train.shots=17 .* \(training images per class: cancer 4, cyst 4"):
        sample_few_shot(split, center, shots=17, seed=0)
