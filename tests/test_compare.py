"""`savlt compare`: finished runs side by side, and a clear error for a folder without metrics."""

from __future__ import annotations

import json
from pathlib import Path

from savlt.cli import main


def write_run(folder: Path, accuracy: float, auc: float | None, centers=("mixed", "huaxi")) -> Path:
    folder.mkdir(parents=True)
    block = {c: {"accuracy": accuracy, "binary": {"auc": auc}} for c in centers}
    (folder / "metrics.json").write_text(json.dumps({"train_center": "mixed", "centers": block}))
    return folder


def test_runs_side_by_side(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "zero", 0.65, 0.991)
    b = write_run(tmp_path / "savlt", 0.925, None, centers=("mixed",))
    assert main(["compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "center",
        "zero",
        "accuracy",
        "zero",
        "AUC",
        "savlt",
        "accuracy",
        "savlt",
        "AUC",
    ]
    assert lines[2].split() == ["mixed", "(internal", "test)", "0.650", "0.991", "0.925", "n/a"]
    assert lines[3].split() == ["huaxi", "0.650", "0.991", "n/a", "n/a"]


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no readable metrics.json" in err and len(err.strip().splitlines()) == 1
