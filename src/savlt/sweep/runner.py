"""Running a sweep: every grid point is an ordinary run folder, trained in its own process, except
points whose image features are frozen (``Config.frozen_image_features``: zero-shot, the linear
probe and the feature-based baselines), which train in well under a second from the feature cache:
they run up to ``GROUP`` at a time in one process (``savlt train-points``), so the start-up is paid
once per group; each still has its own run folder, log and state.

DIR/sweep.yaml            the resolved sweep (base, grid, points)
DIR/points/<name>.yaml    each point's full configuration (what ``savlt train --config`` reads)
DIR/runs/<name>/          each point's run folder (see savlt.engine.runfolder.RunPaths)
DIR/logs/<name>.log       each point's console output (the failure report quotes its tail)
DIR/status.json           the state of every point, rewritten as the sweep goes
DIR/sweep.log             one line per event

A point whose ``metrics.json`` says ``"complete": true`` is skipped (after checking that its
saved configuration is the one the sweep asks for); a point folder without it was interrupted
and is wiped and trained again (only when it holds nothing SAVLT did not write, checked again
right before). Killing a sweep therefore loses only the points in flight. DIR must be missing,
empty or a sweep's holding nothing SAVLT did not write there (``savlt.outputs``), and lie outside
every point's data root.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml
from tqdm import tqdm

from savlt.config import ConfigError, load_config
from savlt.engine.runfolder import OTHER_COMMANDS, is_complete, same_run
from savlt.errors import SavltError
from savlt.io import OutputError, append_line, folder_entries, write_json, write_text
from savlt.outputs import check_claim, check_foreign, claim_folder, describe, folder_kind
from savlt.processes import die_with_parent, stop_groups
from savlt.sweep.grid import Sweep, SweepPoint

LOG_TAIL_LINES = 25
GROUP = 40  # frozen-feature points per process at most
GROUP_DONE = "savlt train-points: exit status"  # the line `savlt train-points` ends each point's log with


class SweepError(SavltError):
    """The sweep cannot run as asked (a busy or mismatched output folder, bad data)."""


@dataclass
class PointFailure:
    name: str
    returncode: int | None
    log: Path
    tail: str


@dataclass
class SweepResult:
    out: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete from an earlier invocation
    failed: list[PointFailure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0


class SweepLayout:
    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)
        self.sweep = self.root / "sweep.yaml"
        self.status = self.root / "status.json"
        self.log = self.root / "sweep.log"

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    def point_config(self, name: str) -> Path:
        return self.root / "points" / f"{name}.yaml"

    def point_log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    # progress bars redraw with carriage returns: keep what the terminal would show last
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in shown[-lines:])


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _config_differences(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(f"{prefix}{key} ({right!r} in the run, {left!r} in the sweep)")
    return keys


def _check_finished(point: SweepPoint, folder: Path) -> None:
    """A finished point is reused only if it was trained with this point's configuration."""
    try:
        saved = load_config(folder / "config.yaml")
    except (ConfigError, OSError) as exc:
        raise SweepError(f"{folder} is complete but its config.yaml cannot be read ({exc})") from None
    if not same_run(saved, point.config):
        diff = _config_differences(point.config.defining(OTHER_COMMANDS), saved.defining(OTHER_COMMANDS))
        raise SweepError(
            f"{folder} was trained with another configuration than the sweep's point {point.name}: "
            f"{'; '.join(diff[:3])}. Use another --out folder, or delete that run folder to retrain it"
        )


@dataclass
class DevicePlan:
    """How the parallel jobs share the machine: one GPU per job, or the CPU cores split evenly."""

    jobs: int
    gpus: list[str]  # visible GPU ids
    threads: int  # CPU threads per job

    @classmethod
    def detect(cls, jobs: int) -> DevicePlan:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            import torch

            count = torch.cuda.device_count()
        except Exception:  # no usable CUDA is simply "no GPU"
            count = 0
        if visible is not None and visible.strip():
            ids = [v.strip() for v in visible.split(",") if v.strip()][:count]
        else:
            ids = [str(i) for i in range(count)]
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        return cls(jobs, ids, max(1, cores // jobs))

    def env(self, slot: int) -> dict[str, str]:
        env = {
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def summary(self) -> str:
        if not self.gpus:
            return f"{self.jobs} job(s) on the CPU, {self.threads} thread(s) each"
        shared = " (jobs share GPUs)" if self.jobs > len(self.gpus) else ""
        return f"{self.jobs} job(s) on {len(self.gpus)} GPU(s){shared}"

    def describe(self, slot: int) -> str:
        return f"GPU {self.gpus[slot % len(self.gpus)]}" if self.gpus else f"CPU, {self.threads} thread(s)"


@dataclass
class _Running:
    points: list[SweepPoint]  # one, or a group of frozen-feature points
    process: subprocess.Popen
    slot: int
    started: float
    log: IO[str]
    reported: set[str] = field(default_factory=set)  # points of the group already recorded
    mark: float = 0.0  # when the group's previous point ended (or the process started)

    def __post_init__(self) -> None:
        self.mark = self.started


def plan_jobs(points: list[SweepPoint], jobs: int) -> list[list[SweepPoint]]:
    """The processes to run, in order: every point alone, except the frozen-feature points, which
    go in groups of up to ``GROUP`` (fewer when there are few, so every job gets work)."""
    frozen = [p for p in points if p.config.frozen_image_features]
    size = max(1, min(GROUP, -(-len(frozen) // (2 * jobs)))) if frozen else 1
    plan: list[list[SweepPoint]] = []
    for point in points:
        if not point.config.frozen_image_features:
            plan.append([point])
        elif plan and len(plan[-1]) < size and plan[-1][0].config.frozen_image_features:
            plan[-1].append(point)
        else:
            plan.append([point])
    return plan


class _Status:
    """DIR/status.json and DIR/sweep.log, kept current as points change state."""

    def __init__(self, layout: SweepLayout, sweep: Sweep, jobs: int) -> None:
        self.layout = layout
        self.data: dict[str, Any] = {
            "sweep": sweep.source,
            "out": str(layout.root),
            "pid": os.getpid(),
            "jobs": jobs,
            "started": _now(),
            "updated": _now(),
            "finished": False,
            "counts": {},
            "points": {p.name: {"state": "pending"} for p in sweep.points},
        }

    def event(self, message: str) -> None:
        append_line(self.layout.log, f"{_now()} {message}")

    def set(self, name: str, state: str, **info: Any) -> None:
        entry = self.data["points"][name]
        entry["state"] = state
        entry.update(info)
        self.write()

    def write(self, finished: bool = False) -> None:
        states = [p["state"] for p in self.data["points"].values()]
        self.data["counts"] = {s: states.count(s) for s in sorted(set(states))}
        self.data["updated"] = _now()
        self.data["finished"] = finished
        write_json(self.layout.status, self.data)


def classify_points(sweep: Sweep, layout: SweepLayout) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """Split the points into (finished, to do); a finished run with another config is an error."""
    done: list[SweepPoint] = []
    todo: list[SweepPoint] = []
    for point in sweep.points:
        folder = layout.run(point.name)
        if is_complete(folder):
            _check_finished(point, folder)
            done.append(point)
        else:
            todo.append(point)
    return done, todo


def _sweep_rules(sweep: Sweep) -> dict[str, Any]:
    """How a sweep claims its folder (``savlt.outputs.check_claim``): an earlier sweep's is continued."""
    return {
        "continues": lambda folder: True,
        "roots": {"the data root": sorted({str(p.config.data.root or "") for p in sweep.points})},
    }


def check_point_folder(point: SweepPoint, layout: SweepLayout) -> None:
    """Refuse to wipe the unfinished run folder of `point` unless SAVLT wrote everything in it."""
    folder = layout.run(point.name)
    what = f"the unfinished run folder of point {point.name},"
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder}, is a file SAVLT did not write, so it is not wiped: move it out")
    if not folder.is_dir() or not folder_entries(folder) or is_complete(folder):
        return
    if folder_kind(folder) != "run":
        raise OutputError(
            f"{what} {folder}, holds {describe(folder)}, not a SAVLT run, so it is not wiped: move it "
            "out, or choose another --out"
        )
    check_foreign(folder, "run", "wiped")


def check_sweep_folder(sweep: Sweep, layout: SweepLayout) -> None:
    """Refuse a sweep folder that is not missing, empty or a sweep's holding nothing SAVLT did not
    write, one inside, around or over a point's data root, and an unfinished point folder holding
    anything SAVLT did not write (it would be wiped). Nothing is written."""
    check_claim(layout.root, "sweep", **_sweep_rules(sweep))
    for point in sweep.points:
        check_point_folder(point, layout)


def prepare_point_folders(sweep: Sweep, layout: SweepLayout) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """Check the finished points, then write sweep.yaml and every point's config; (finished, to do)."""
    done, todo = classify_points(sweep, layout)  # before anything in the folder is overwritten
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text(layout.sweep, yaml.safe_dump(sweep.to_json(), sort_keys=False))
    for point in sweep.points:
        path = layout.point_config(point.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        point.config.save(path)
    return done, todo


def warm_data_cache(points: list[SweepPoint]) -> None:
    """Check every point's data and write the shared split / few-shot caches once, up front.

    Parallel points would otherwise race to create the same cache files, and a missing center
    or class folder should fail now, not halfway through the sweep.
    """
    seen: set[str] = set()
    quiet = logging.getLogger("savlt.engine.inputs")  # what each run logs about its inputs, once per point
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        _warm(points, seen)
    finally:
        quiet.setLevel(level)


def _warm(points: list[SweepPoint], seen: set[str]) -> None:
    from savlt.engine.inputs import prepare_inputs

    for point in points:
        cfg = point.config
        key = json.dumps(
            [cfg.to_dict()["data"], cfg.train.shots, cfg.train.seed, cfg.protocol],
            sort_keys=True,
            default=str,
        )
        if key in seen:
            continue
        seen.add(key)
        try:
            prepare_inputs(cfg)
        except SavltError as exc:
            raise SweepError(f"point {point.name}: {exc}") from None


def _start(
    points: list[SweepPoint], layout: SweepLayout, plan: DevicePlan, slot: int, python: str
) -> _Running:
    for point in points:
        folder = layout.run(point.name)
        if folder.exists():  # an interrupted or failed attempt: start clean, if SAVLT wrote all of it
            check_point_folder(point, layout)
            shutil.rmtree(folder)
        layout.point_log(point.name).parent.mkdir(parents=True, exist_ok=True)
        layout.point_log(point.name).write_text("")
    log = layout.point_log(points[0].name).open("a")
    if len(points) == 1:
        command = [python, "-m", "savlt.cli", "train", "--config", str(layout.point_config(points[0].name))]
        command += ["--out", str(layout.run(points[0].name)), "-q"]
    else:
        command = [python, "-m", "savlt.cli", "train-points"]
        for point in points:
            command += ["--point", str(layout.point_config(point.name))]
            command += [str(layout.run(point.name)), str(layout.point_log(point.name))]
    log.write(" ".join(command) + "\n")
    log.flush()
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **plan.env(slot)},
        start_new_session=True,  # its own process group: stopping the point stops all it started
        preexec_fn=die_with_parent(),  # and a sweep that is killed outright stops its points
    )
    return _Running(points, process, slot, time.time(), log)


def _stop(running: list[_Running], status: _Status) -> None:
    """Stop the points in flight with every process they started (``stop_groups``)."""
    left = stop_groups([job.process for job in running])
    if left:
        status.event(f"processes {left} of stopped points did not end, even killed")
    for job in running:
        job.log.close()


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    jobs: int = 1,
    progress: bool = True,
    python: str | None = None,
    on_failure: Callable[[PointFailure], None] | None = None,
) -> SweepResult:
    """Train every unfinished point of `sweep` into ``out/runs/<name>``, `jobs` at a time.

    Returns what happened; the summary is written by ``savlt.sweep.aggregate`` (the CLI and
    ``run_sweep_file`` call it at the end of every invocation, also after an interruption).
    """
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    layout = SweepLayout(out)
    result = SweepResult(layout.root)
    started = time.time()
    check_sweep_folder(sweep, layout)  # before anything is written
    with claim_folder(
        layout.root, "sweep", committed=lambda: (layout.root / "logs").is_dir(), **_sweep_rules(sweep)
    ):
        done, todo = prepare_point_folders(sweep, layout)
        status = _Status(layout, sweep, jobs)
        for point in done:
            status.data["points"][point.name]["state"] = "skipped"
        result.skipped = [p.name for p in done]
        status.write()
        if todo:
            warm_data_cache(todo)
        plan = DevicePlan.detect(min(jobs, max(1, len(todo))))  # threads for the jobs that will run
        status.event(
            f"sweep {sweep.source}: {len(sweep.points)} points, {len(done)} already complete, "
            f"{len(todo)} to train, {plan.summary()}"
        )
        queue = plan_jobs(todo, jobs)
        running: list[_Running] = []
        free = list(range(jobs))
        bar = tqdm(total=len(sweep.points), initial=len(done), desc="sweep", unit="run", disable=not progress)

        def finish(job: _Running, point: SweepPoint, failed: bool) -> None:
            """Record `point` of `job`: its time since the previous point of its group ended, and
            for a failure the tail of its log (of the group's, when the group ended before it ran)."""
            job.reported.add(point.name)
            now = time.time()
            seconds, job.mark = round(now - job.mark, 1), now
            code = job.process.returncode
            name = point.name
            if not failed:
                result.trained.append(name)
                status.set(name, "complete", seconds=seconds, returncode=0)
                status.event(f"finished {name} in {seconds} s")
                return _advance()
            own = layout.point_log(name)
            ran = len(job.points) == 1 or GROUP_DONE in own.read_text(errors="replace")
            where = own if ran else layout.point_log(job.points[0].name)
            failure = PointFailure(name, code, where, _tail(where))
            result.failed.append(failure)
            status.set(name, "failed" if ran else "not run", seconds=seconds, returncode=code)
            status.event(
                f"FAILED {name} (exit status {code}); log: {where}"
                if ran
                else f"NOT RUN {name}: its group's process ended (exit status {code}) first; log: {where}"
            )
            if on_failure is not None:
                on_failure(failure)
            _advance()

        def _advance() -> None:
            bar.update(1)
            bar.set_postfix(failed=len(result.failed))

        try:
            while queue or running:
                while queue and free:
                    points = queue.pop(0)
                    for point in points:
                        if layout.run(point.name).exists():
                            status.event(
                                f"wiping the unfinished run folder of {point.name} (interrupted or failed earlier)"
                            )
                    job = _start(points, layout, plan, free.pop(0), python or sys.executable)
                    running.append(job)
                    for point in points:
                        status.set(
                            point.name,
                            "running",
                            device=plan.describe(job.slot),
                            started=_now(),
                            log=str(layout.point_log(point.name).relative_to(layout.root)),
                        )
                        status.event(f"started {point.name} ({plan.describe(job.slot)})")
                time.sleep(0.2)
                for job in running:  # a group's points are recorded as they finish
                    for point in job.points[:-1]:
                        if point.name not in job.reported and is_complete(layout.run(point.name)):
                            finish(job, point, failed=False)
                for job in [j for j in running if j.process.poll() is not None]:
                    running.remove(job)
                    free.append(job.slot)
                    job.log.close()
                    single = len(job.points) == 1
                    for point in job.points:
                        if point.name not in job.reported:
                            done = is_complete(layout.run(point.name))
                            finish(job, point, failed=not done or (single and job.process.returncode != 0))
        except KeyboardInterrupt:
            result.interrupted = True
            for job in running:
                for point in job.points:
                    if point.name not in job.reported:
                        status.set(point.name, "interrupted")
            status.event(f"interrupted; stopping {len(running)} point(s) in flight")
        finally:
            finished = not (result.interrupted or queue or running)
            _stop(running, status)  # also on an unexpected error: no point outlives the sweep
            bar.close()
            result.seconds = time.time() - started
            status.data["seconds"] = round(result.seconds, 1)
            status.write(finished=finished)
            status.event(
                f"{'interrupted' if result.interrupted else 'done'} after {result.seconds:.0f} s: "
                f"{len(result.trained)} trained, {len(result.skipped)} skipped, {len(result.failed)} failed"
            )
    return result
