"""Sweeps: the sweep file, resumable grid runs in subprocesses, and the mean ± std summary."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CENTER_SIZES, processes_left

from savlt.cli import main
from savlt.config import ConfigError, load_config
from savlt.io import write_manifest
from savlt.sweep import Sweep, SweepError, aggregate, build_sweep, is_complete, load_sweep, run_sweep
from savlt.sweep.runner import DevicePlan, SweepLayout, prepare_point_folders

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRIC_PATHS = {
    "accuracy": ("accuracy",),
    "macro_f1": ("macro_f1",),
    "binary_accuracy": ("binary", "accuracy"),
    "auc": ("binary", "auc"),
    "sensitivity": ("binary", "sensitivity"),
    "specificity": ("binary", "specificity"),
    "ppv": ("binary", "ppv"),
    "npv": ("binary", "npv"),
}
TWO_BY_TWO = [
    "method=clip_lora,seed=5",
    "method=clip_lora,seed=42",
    "method=savlt,seed=5",
    "method=savlt,seed=42",
]


def tiny_spec(root: Path, cache: Path, grid: dict | None = None) -> dict:
    """The FAST settings of conftest as a sweep base (nested sections, shorthands, dotted keys)."""
    return {
        "base": {
            "data": str(root),
            "data.cache_dir": str(cache),
            "data.num_workers": 0,
            "model": "tiny",
            "train": {"shots": 4, "max_steps": 4, "batch_size": 8, "val_every": 2},
            "eval": {"batch_size": 32, "bootstrap": 20},
        },
        "grid": grid or {"method": ["clip_lora", "savlt"], "seed": [5, 42]},
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_command(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "savlt.cli", "sweep", str(spec), "--out", str(out), *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def dig(metrics: dict, center: str, path: tuple[str, ...]):
    value = metrics["centers"][center]
    for part in path:
        value = value[part]
    return value


# ------------------------------------------------------------------ the sweep file (no training)


def test_shorthands_nested_base_and_point_configs(tmp_path: Path) -> None:
    spec = {
        "base": {
            "data": "rel/data",
            "model": "tiny",
            "train": {"n_iters": 3},
            "lr": 5e-4,
            "eval.bootstrap": 20,
        },
        "grid": {"method": ["clip_lora", "savlt"], "shots": [16, 32], "seed": [5, 42, 123]},
    }
    sweep = build_sweep(spec, "s.yaml")
    assert len(sweep.points) == 12
    assert [p.name for p in sweep.points[:4]] == [
        "method=clip_lora,shots=16,seed=5",
        "method=clip_lora,shots=16,seed=42",
        "method=clip_lora,shots=16,seed=123",
        "method=clip_lora,shots=32,seed=5",
    ]
    first, last = sweep.points[0].config, sweep.points[-1].config
    assert (first.method, first.train.shots, first.train.seed) == ("clip_lora", 16, 5)
    assert (last.method, last.train.shots, last.train.seed) == ("savlt", 32, 123)
    for cfg in (first, last):
        assert cfg.train.n_iters == 3 and cfg.train.lr == 5e-4 and cfg.eval.bootstrap == 20
        assert cfg.model.backbone == "tiny"
        assert cfg.data.root == str(Path("rel/data").resolve())  # relative to the current directory
    assert first.model.pooling == "cls" and first.model.alpha == 0.0  # the method's preset
    assert last.model.pooling == "roi"
    assert set(sweep.grid) == {"method", "train.shots", "train.seed"}

    other = build_sweep(
        {
            "base": {"data": "d", "peft": {"r": 4}, "model": {"backbone": "tiny", "heads": 2}},
            "grid": {"peft": ["lora", "loha"], "alpha": [0.25], "gradual_step": [2], "segmenter": ["seg/f0"]},
        }
    )
    cfg = other.points[1].config
    assert (cfg.peft.type, cfg.peft.r, cfg.model.alpha, cfg.peft.gradual_step) == ("loha", 4, 0.25, 2)
    assert (cfg.model.backbone, cfg.model.heads) == ("tiny", 2)
    assert cfg.roi.segmenter == str(Path("seg/f0").resolve())
    assert other.points[1].name == "peft=loha,alpha=0.25,gradual_step=2,segmenter=seg_f0"


def test_point_names_are_readable_and_filesystem_safe() -> None:
    sweep = build_sweep(
        {
            "base": {"data": "d"},
            "grid": {"model": ["org/clip b16", "tiny"], "train.lr": [1e-3, 0.0005], "train.hflip": [False]},
        }
    )
    names = [p.name for p in sweep.points]
    assert names[0] == "model=org_clip_b16,train.lr=0.001,train.hflip=false"
    assert names[1] == "model=org_clip_b16,train.lr=0.0005,train.hflip=false"
    assert all("/" not in n and " " not in n for n in names) and len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"base": {"data": "d"}, "grids": {"seed": [1]}}, "unknown top-level key 'grids'"),
        ({"base": {"data": "d", "train": {"n_iter": 3}}}, "base: unknown config key train.n_iter"),
        ({"base": {"data": "d"}, "grid": {"train.lrr": [1.0]}}, "unknown config key train.lrr"),
        ({"base": {"data": "d"}, "grid": {"seed": 5}}, "grid.seed: expected a non-empty list"),
        (
            {"base": {"data": "d", "seed": 1}, "grid": {"seed": [5]}},
            "train.seed is set in base and varied in grid",
        ),
        (
            {"base": {"data": "d"}, "grid": {"method": ["clip_lora"], "alpha": [0.3]}},
            "method clip_lora fixes model.alpha",
        ),
        ({"base": {"data": "d"}, "grid": {"shots": [16, 16]}}, "duplicate values"),
        (
            {"base": {"data": "d"}, "grid": {"method": ["savlt", "savlt_v2"]}},
            "point method=savlt_v2: method: 'savlt_v2'",
        ),
        ({"base": {"model": "tiny"}}, "no data root"),
        ({"base": {"data": "d", "model": "tiny", "model.backbone": "x"}}, "model.backbone is set twice"),
    ],
)
def test_sweep_file_errors_name_the_key(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="sweep file") as info:
        build_sweep(spec, "my_sweep.yaml")
    assert message in str(info.value) and "my_sweep.yaml" in str(info.value)


def test_errors_fail_fast_from_the_cli(tmp_path: Path, capsys) -> None:
    spec = write_spec(
        tmp_path / "bad.yaml", {"base": {"data": "d", "train": {"lrr": 1}}, "grid": {"seed": [1, 2]}}
    )
    started = time.time()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert time.time() - started < 5
    err = capsys.readouterr().err
    assert "unknown config key train.lrr" in err and str(spec) in err
    assert not (tmp_path / "out").exists()  # nothing was written or trained


def test_overrides_set_base_values_and_grid_axes(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "s.yaml",
        {
            "base": {"data": "d", "model": "openai/clip-vit-base-patch16", "train": {"n_iters": 10}},
            "grid": {"method": ["savlt", "clip_lora"], "seed": [5, 42, 123]},
        },
    )
    sweep = load_sweep(spec, ["model=tiny", "base.train.n_iters=3", "grid.seed=[5]", "lr=1e-2"])
    assert [p.name for p in sweep.points] == ["method=savlt,seed=5", "method=clip_lora,seed=5"]
    cfg = sweep.points[0].config
    assert (cfg.model.backbone, cfg.train.n_iters, cfg.train.lr) == ("tiny", 3, 0.01)
    with pytest.raises(ConfigError, match="train.seed is set in base and varied in grid"):
        load_sweep(spec, ["seed=7"])


def test_paper_sweep_file_is_the_published_protocol() -> None:
    sweep = load_sweep(CONFIGS / "sweep_paper.yaml")
    assert len(sweep.points) == 8 * 2 * 3
    assert sweep.grid["train.shots"] == [16, 32] and sweep.grid["train.seed"] == [5, 42, 123]
    assert set(sweep.grid["method"]) == {
        "zero_shot",
        "linear_probe",
        "clip_lora",
        "savlt",
        "savlt_no_roi",
        "savlt_every_block",
        "savlt_no_proto",
        "savlt_proto_only",
    }
    for point in sweep.points:
        cfg = point.config
        assert cfg.train.lr == 1e-3 and cfg.model.backbone == "openai/clip-vit-base-patch16"
        assert cfg.data.train_center == "mixed" and cfg.data.test_centers == ["xiangya", "huaxi"]


def finished_point(tmp_path: Path, seeds: list[int], *settings: str) -> Sweep:
    """A sweep over `seeds` whose point seed=5 is finished in its folder, trained with `settings`."""
    sweep = build_sweep({"base": {"data": str(tmp_path / "d"), "model": "tiny"}, "grid": {"seed": seeds}})
    folder = SweepLayout(tmp_path / "out").run("seed=5")
    folder.mkdir(parents=True)
    write_spec(SweepLayout(tmp_path / "out").sweep, sweep.to_json())  # an earlier sweep's folder
    write_manifest(tmp_path / "out", "sweep", ["sweep.yaml"])
    write_manifest(folder, "run", ["config.yaml", "metrics.json"])
    load_config(
        overrides=[f"data.root={tmp_path / 'd'}", "model.backbone=tiny", "train.seed=5", *settings]
    ).save(folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"complete": True, "centers": {}}))
    return sweep


def test_finished_point_with_another_config_is_refused(tmp_path: Path) -> None:
    sweep = finished_point(tmp_path, [5, 42], "train.lr=0.1", "data.num_workers=0")
    with pytest.raises(SweepError, match=r"train.lr \(0.1 in the run, 0.001 in the sweep\)\.") as refused:
        run_sweep(sweep, tmp_path / "out", progress=False)
    assert "num_workers" not in str(refused.value)  # only what defines a run is listed
    assert not SweepLayout(tmp_path / "out").run("seed=42").exists()  # refused before training anything


@pytest.mark.parametrize(
    "settings",
    [
        ["data.num_workers=0", "data.cache_dir=/elsewhere", "model.allow_download=true"],
        ["seg.epochs=3", "seg.arch=linknet", "pretrain.lr=0.1", "pretrain.max_steps=7"],
    ],
)
def test_a_setting_that_does_not_define_the_run_keeps_a_finished_point(tmp_path: Path, settings) -> None:
    result = run_sweep(finished_point(tmp_path, [5], *settings), tmp_path / "out", progress=False)
    assert (result.skipped, result.trained, result.failed) == (["seed=5"], [], [])


# ------------------------------------------------------------------ aggregation (fabricated runs)


def fake_metrics(
    method: str, shots: int, seed: int, acc: dict[str, float], auc: dict[str, float | None]
) -> dict:
    centers = {}
    for center in ("mixed", "xiangya"):
        centers[center] = {
            "n": 10,
            "accuracy": acc[center],
            "macro_f1": acc[center] / 2,
            "binary": {
                "accuracy": 0.5,
                "auc": auc[center],
                "sensitivity": 1.0,
                "specificity": 0.0,
                "ppv": None,
                "npv": 0.25,
            },
        }
    return {
        "method": method,
        "backbone": "tiny",
        "shots": shots,
        "seed": seed,
        "train_center": "mixed",
        "high_risk": [],
        "centers": centers,
        "complete": True,
    }


def test_aggregate_against_hand_computed_values(tmp_path: Path) -> None:
    spec = {
        "base": {"data": "d"},
        "grid": {"method": ["savlt", "clip_lora"], "lr": [1e-3, 1e-2], "seed": [5, 42, 123]},
    }
    sweep = build_sweep(spec)
    layout = SweepLayout(tmp_path / "sw")
    prepare_point_folders(sweep, layout)  # writes sweep.yaml and the point configs
    runs = {  # (method, lr, seed) -> (mixed acc, xiangya acc, mixed auc, xiangya auc)
        ("savlt", 1e-3, 5): (0.50, 0.40, 0.9, 0.7),
        ("savlt", 1e-3, 42): (0.70, 0.60, None, 0.8),  # an undefined AUC is left out, not counted as 0
        ("savlt", 1e-3, 123): (0.60, 0.20, 0.7, 0.9),
        ("savlt", 1e-2, 5): (0.30, 0.30, 0.5, 0.5),
        ("savlt", 1e-2, 42): (0.40, 0.10, 0.6, 0.6),
        ("clip_lora", 1e-3, 123): (0.25, 0.35, 0.55, 0.65),  # the only complete seed of its group
    }
    for (method, lr, seed), (am, ax, um, ux) in runs.items():
        folder = layout.run(f"method={method},lr={lr},seed={seed}")
        folder.mkdir(parents=True)
        metrics = fake_metrics(method, 16, seed, {"mixed": am, "xiangya": ax}, {"mixed": um, "xiangya": ux})
        (folder / "metrics.json").write_text(json.dumps(metrics))
    unfinished = layout.run("method=clip_lora,lr=0.001,seed=5")
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.json").write_text(
        json.dumps(
            {
                **fake_metrics(
                    "clip_lora", 16, 5, {"mixed": 1.0, "xiangya": 1.0}, {"mixed": 1.0, "xiangya": 1.0}
                ),
                "complete": False,
            }
        )
    )

    summary = aggregate(layout.root)
    assert len(summary.complete) == 6 and "method=clip_lora,lr=0.001,seed=5" in summary.incomplete
    rows = {
        (r["method"], r["lr"], r["center"], r["metric"]): r for r in read_csv(layout.root / "summary.csv")
    }
    assert list(read_csv(layout.root / "summary.csv")[0]) == [
        "method",
        "shots",
        "lr",
        "center",
        "metric",
        "mean",
        "std",
        "n",
        "runs",
        "values",
    ]

    def check(key, mean, std, n, runs):
        row = rows[key]
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-12)
        assert (row["std"] == "") if std is None else float(row["std"]) == pytest.approx(std, abs=1e-12)
        assert (int(row["n"]), int(row["runs"])) == (n, runs)

    check(("savlt", "0.001", "mixed", "accuracy"), 0.6, 0.1, 3, 3)  # sd of .5 .7 .6 (ddof=1) = 0.1
    check(("savlt", "0.001", "xiangya", "accuracy"), 0.4, 0.2, 3, 3)
    check(("savlt", "0.001", "mixed", "macro_f1"), 0.3, 0.05, 3, 3)
    check(("savlt", "0.001", "mixed", "auc"), 0.8, math.sqrt(0.02), 2, 3)  # the null is left out
    check(("savlt", "0.01", "mixed", "accuracy"), 0.35, math.sqrt(0.005), 2, 2)
    check(("clip_lora", "0.001", "xiangya", "auc"), 0.65, None, 1, 1)  # one seed: no std
    check(("savlt", "0.001", "mixed", "binary_accuracy"), 0.5, 0.0, 3, 3)
    ppv = rows[("savlt", "0.001", "mixed", "ppv")]
    assert (ppv["mean"], ppv["std"], ppv["n"]) == ("", "", "0")  # undefined everywhere
    assert rows[("savlt", "0.001", "mixed", "auc")]["values"] == "5:0.9;42:null;123:0.7"
    assert ("clip_lora", "0.01", "mixed", "accuracy") not in rows  # no complete run in that group
    assert len(rows) == 3 * 2 * 8  # groups × centers × metrics

    md = (layout.root / "summary.md").read_text()
    assert "## mixed (internal test)" in md and "## xiangya (external)" in md
    assert "| savlt | 16 | 0.001 | 3 | 0.600 ± 0.100 |" in md
    assert "0.800 ± 0.141 (n=2)" in md  # AUC with one undefined seed
    assert "| clip_lora | 16 | 0.001 | 1 | 0.250 |" in md
    assert "Complete runs: 6 of 12" in md and "Not finished (left out)" in md
    assert (layout.root / "summary.png").stat().st_size > 10_000


# ------------------------------------------------------------------ sweeps that train (tiny model)


@pytest.fixture(scope="module")
def two_by_two(
    synth_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """2 methods × 2 seeds, trained with --jobs 2 (one CPU thread each)."""
    work = tmp_path_factory.mktemp("sweep")
    spec = write_spec(work / "sweep.yaml", tiny_spec(synth_root, work / "cache"))
    out = work / "out"
    done = subprocess.run(
        sweep_command(spec, out, "--jobs", "2", "-q"), capture_output=True, text=True, timeout=300
    )
    return spec, out, done


@pytest.mark.slow
def test_sweep_end_to_end(two_by_two, capsys) -> None:
    spec, out, done = two_by_two
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("sweep.yaml", "status.json", "sweep.log", "summary.csv", "summary.md", "summary.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(TWO_BY_TWO)
    status = json.loads((out / "status.json").read_text())
    assert status["finished"] and status["counts"] == {"complete": 4}
    assert all(
        p["device"] == f"CPU, {max(1, len(os.sched_getaffinity(0)) // 2)} thread(s)"
        for p in status["points"].values()
    )
    metrics = {n: json.loads((out / "runs" / n / "metrics.json").read_text()) for n in TWO_BY_TWO}
    for name, m in metrics.items():
        assert m["complete"] and {c: v["n"] for c, v in m["centers"].items()} == CENTER_SIZES
        assert load_config(out / "points" / f"{name}.yaml") == load_config(
            out / "runs" / name / "config.yaml"
        )

    rows = read_csv(out / "summary.csv")
    assert len(rows) == 2 * 3 * 8 and {r["shots"] for r in rows} == {"4"}
    for row in rows:
        runs = [metrics[f"method={row['method']},seed={seed}"] for seed in (5, 42)]
        values = [dig(m, row["center"], METRIC_PATHS[row["metric"]]) for m in runs]
        present = [v for v in values if v is not None]
        assert int(row["n"]) == len(present) and int(row["runs"]) == 2
        if present:
            assert float(row["mean"]) == pytest.approx(sum(present) / len(present), abs=1e-12)
        if len(present) == 2:
            assert float(row["std"]) == pytest.approx(abs(present[0] - present[1]) / math.sqrt(2), abs=1e-12)
    md = (out / "summary.md").read_text()
    assert "## mixed (internal test)" in md and "| savlt | 4 | 2 |" in md and "| clip_lora | 4 | 2 |" in md
    assert "4 of 4 points complete" in done.stdout
    assert main(["sweep", str(spec), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("complete (skipped)") == 4


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_summary(two_by_two) -> None:
    spec, reference, _ = two_by_two
    out = reference.parent / "killed"
    first, second = (out / "runs" / n for n in TWO_BY_TWO[:2])
    mark = f"{os.getpid()}-killed-sweep"
    sweep = subprocess.Popen(
        sweep_command(spec, out, "--jobs", "1", "-q"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "SAVLT_TEST_MARK": mark},  # inherited by every process the sweep starts
    )
    deadline = time.time() + 120
    # wait until the first point is finished and the second one is in flight, then kill the sweep
    while not (is_complete(first) and (second / "config.yaml").is_file()):
        assert sweep.poll() is None and time.time() < deadline, "the sweep ended or stalled before the kill"
        time.sleep(0.1)
    sweep.send_signal(signal.SIGTERM)  # `kill PID`: the sweep stops its points and exits
    _, err = sweep.communicate(timeout=60)
    killed_at = time.time()
    # no process outlives the sweep: not a point, nor anything a point started (its workers)
    assert processes_left(mark) == {}
    assert sweep.returncode == 130, err[-2000:]
    assert "interrupted" in err
    status = json.loads((out / "status.json").read_text())
    assert status["points"][TWO_BY_TWO[0]]["state"] == "complete"
    assert status["points"][TWO_BY_TWO[1]]["state"] == "interrupted" and not status["finished"]
    assert second.is_dir() and not is_complete(second)
    assert "Complete runs: 1 of 4" in (out / "summary.md").read_text()  # a partial summary was written
    marker = {
        f: (first / f).stat().st_mtime_ns for f in ("adapter.safetensors", "metrics.json", "config.yaml")
    }

    resumed = subprocess.run(
        sweep_command(spec, out, "--jobs", "2", "-q"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 trained now, 1 earlier" in resumed.stdout
    assert {
        f: (first / f).stat().st_mtime_ns for f in marker
    } == marker  # the finished point was not retrained
    assert (second / "config.yaml").stat().st_mtime > killed_at  # the interrupted point was redone
    assert f"wiping the unfinished run folder of {TWO_BY_TWO[1]}" in (out / "sweep.log").read_text()
    assert json.loads((out / "status.json").read_text())["counts"] == {"complete": 3, "skipped": 1}

    mine, theirs = read_csv(out / "summary.csv"), read_csv(reference / "summary.csv")
    assert [[r[k] for k in r if k not in ("mean", "std", "values")] for r in mine] == [
        [r[k] for k in r if k not in ("mean", "std", "values")] for r in theirs
    ]
    for a, b in zip(mine, theirs, strict=True):  # runs with 1 or 2 CPU threads: equal up to rounding
        for key in ("mean", "std"):
            assert (a[key] == b[key] == "") or float(a[key]) == pytest.approx(float(b[key]), abs=1e-6)


@pytest.mark.slow
def test_failed_point_is_reported_and_the_others_finish(synth_root: Path, tmp_path: Path) -> None:
    grid = {"model": [str(tmp_path / "no_such_clip"), "tiny"]}
    spec = tiny_spec(synth_root, tmp_path / "cache", grid)
    del spec["base"]["model"]
    out = tmp_path / "out"
    done = subprocess.run(
        sweep_command(write_spec(tmp_path / "s.yaml", spec), out, "--jobs", "2", "-q"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    bad = next(name for name in status["points"] if "no_such_clip" in name)
    assert f"point {bad} failed (exit status 2)" in done.stderr
    assert "no_such_clip" in done.stderr.split(f"point {bad} failed", 1)[1]  # the tail of its log
    assert "1 point(s) failed" in done.stderr
    assert (
        status["points"][bad]["state"] == "failed" and status["points"]["model=tiny"]["state"] == "complete"
    )
    assert {r["center"] for r in read_csv(out / "summary.csv")} == set(CENTER_SIZES)
    assert "Complete runs: 1 of 2" in (out / "summary.md").read_text()


# ------------------------------------------------------------------ sharing the machine


def test_device_plan_on_cpu_splits_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    plan = DevicePlan.detect(jobs=3)
    assert (plan.gpus, plan.threads) == ([], 2)
    env = plan.env(1)
    assert env["OMP_NUM_THREADS"] == "2" and "CUDA_VISIBLE_DEVICES" not in env
    assert plan.summary() == "3 job(s) on the CPU, 2 thread(s) each"
    assert DevicePlan.detect(jobs=16).threads == 1  # never zero


def test_device_plan_gives_each_job_a_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    plan = DevicePlan.detect(jobs=3)
    assert plan.gpus == ["4", "6"]
    assert [plan.env(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["4", "6", "4"]
    assert plan.summary() == "3 job(s) on 2 GPU(s) (jobs share GPUs)" and plan.describe(1) == "GPU 6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert DevicePlan.detect(jobs=1).gpus == ["0", "1"]


# ------------------------------------------------------------------ frozen-feature points in one process


def test_frozen_feature_points_share_a_process_and_keep_their_own_state(
    synth_root: Path, tmp_path: Path
) -> None:
    """zero-shot and the feature-based baselines run several to a process (``savlt train-points``);
    each still gets its folder, log and state, and a point that fails there fails alone."""
    from savlt.sweep.runner import plan_jobs

    grid = {
        "method": ["zero_shot", "ss_text", "lp_pp", "savlt"],
        "model": ["tiny", str(tmp_path / "no_such_clip")],
    }
    spec = tiny_spec(synth_root, tmp_path / "cache", grid)
    del spec["base"]["model"]
    sweep = load_sweep(write_spec(tmp_path / "s.yaml", spec))
    plan = plan_jobs(sweep.points, jobs=1)
    assert sorted(len(group) for group in plan) == [1, 1, 3, 3]  # savlt alone, the frozen ones by three
    out = tmp_path / "out"
    done = subprocess.run(
        sweep_command(tmp_path / "s.yaml", out, "--jobs", "1", "-q"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    states = {name: p["state"] for name, p in json.loads((out / "status.json").read_text())["points"].items()}
    assert {n: s for n, s in states.items() if "no_such_clip" not in n} == dict.fromkeys(
        [f"method={m},model=tiny" for m in grid["method"]], "complete"
    )
    assert {s for n, s in states.items() if "no_such_clip" in n} == {"failed"}
    log = (out / "logs" / "method=lp_pp,model=tiny.log").read_text()
    assert "method lp_pp" in log and "method ss_text" not in log  # its own output only
    assert "point method=ss_text,model=" in done.stderr and "no_such_clip" in done.stderr  # its own failure
    ranking = read_csv(out / "ranking.csv")
    assert {r["method"] for r in ranking if r["model"] == "tiny"} == set(grid["method"])
    assert (out / "summary_center-huaxi.png").is_file()
