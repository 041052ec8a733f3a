"""Evaluating and predicting on a new hospital's export: what cannot be assessed is not
diagnosed and is counted, folders are searched, unreadable files named, corrupt run files named.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import (
    black_png,
    copy_center,
    debris,
    scan_png,
    truncated_png,
)

from savlt.classes import DEFAULT_CLASSES
from savlt.cli import main
from savlt.engine.loaded import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert all(
        rows[name][k] != "" for name in rows if name not in ("black.png", "nan.tif") for k in model_columns
    )

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "config.yaml").read_text().replace("unassessable: exclude", "unassessable: include")
    (copy / "config.yaml").write_text(text)
    included = load_run(copy).evaluate(centers=["newhosp"], progress=False)["centers"]["newhosp"]
    assert included["n"] == 34 and included["unassessable"] == 2
    with (copy / "evaluation" / "predictions" / "newhosp.csv").open() as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert (
        rows["black.png"]["assessable"] == "0" and rows["black.png"]["predicted"]
    )  # scored, as the policy says


def test_a_corrupt_run_file_is_named_by_evaluate(export_run, tmp_path: Path, capsys) -> None:
    _, run = export_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "fewshot.json").write_text('{"train": [')
    assert main(["evaluate", str(copy), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"few-shot file {copy / 'fewshot.json'} is corrupt" in err and err.count("\n") == 1


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
