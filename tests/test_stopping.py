"""Stopping a command leaves no process behind: each command sent SIGTERM (what `kill` sends),
SIGHUP (a closed terminal) or SIGKILL in the middle of a phase, with the phase's worker processes
running; running it again continues. (The killed sweep is in test_sweep.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, fast_config, marked_processes, processes_left, short_caption_pairs

# `savlt ...` that stops for good in the middle of the phase whose progress bar SAVLT_TEST_BLOCK
# names, with that phase's worker processes running, and says so on stdout.
BLOCKING_CLI = """
import os, sys, time
import tqdm
phase = os.environ["SAVLT_TEST_BLOCK"]
class Blocking(tqdm.tqdm):
    def block(self):
        if getattr(self, "desc", "").startswith(phase):  # a disabled bar has no desc
            print("blocked in", self.desc, flush=True)
            time.sleep(3600)
    def update(self, n=1):
        self.block()
        return super().update(n)
    def __iter__(self):
        for item in super().__iter__():
            self.block()
            yield item
tqdm.tqdm = Blocking  # before SAVLT imports it
from savlt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def forked_workers(processes: dict[int, tuple[int, str]]) -> list[int]:
    """The processes forked from another one without a program of their own (pool workers)."""
    return [
        pid for pid, (parent, command) in processes.items() if processes.get(parent, (0, ""))[1] == command
    ]


def stop_in(args: list[str], phase: str, workers: int, log: Path, sig: int = signal.SIGTERM) -> None:
    """Run `savlt args` until it is in `phase` (a progress bar's name, or the first line `serve`
    prints) with at least `workers` worker processes, send it `sig`; checks that it ends as
    interrupted (or killed, for SIGKILL) and that no process it started is left a few seconds
    later."""
    mark = f"{os.getpid()}-{log.stem}"
    command = (
        [sys.executable, "-m", "savlt.cli"] if args[0] == "serve" else [sys.executable, "-c", BLOCKING_CLI]
    )
    env = {**os.environ, "SAVLT_TEST_MARK": mark, "SAVLT_TEST_BLOCK": phase}
    with log.open("w") as err:
        process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        line = process.stdout.readline()  # once the phase is reached (or the command ended)
        assert line.startswith(("blocked in " + phase, phase)), line + log.read_text()[-3000:]
        running = marked_processes(mark)
        assert len(forked_workers(running)) >= workers, running
        process.send_signal(sig)
        process.wait(60)
        process.stdout.close()
    assert processes_left(mark) == {}, f"{args[0]} stopped in {phase}"
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130 and "savlt: interrupted" in log.read_text(), log.read_text()[-3000:]


# A process that ignores SIGTERM, as does what it starts (to the depth given): a worker of a worker.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if int(sys.argv[1]):
    subprocess.Popen([sys.executable, __file__, str(int(sys.argv[1]) - 1)])
print("ready", flush=True)
time.sleep(600)
"""


def test_a_stopped_process_group_ends_even_what_ignores_sigterm(tmp_path: Path) -> None:
    from savlt.processes import group_members, stop_groups

    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    mark = f"{os.getpid()}-stubborn"
    leader = subprocess.Popen(
        [sys.executable, str(script), "2"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "SAVLT_TEST_MARK": mark},
    )
    assert [leader.stdout.readline() for _ in range(3)] == ["ready\n"] * 3  # itself, child, grandchild
    assert len(marked_processes(mark)) == 3
    assert stop_groups([leader], grace=0.5) == []
    leader.stdout.close()
    assert leader.returncode == -signal.SIGKILL and group_members(leader.pid) == []
    assert processes_left(mark, 0) == {}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed outright"])
def test_the_decode_checks_workers_end_with_their_command(synth_root: Path, tmp_path: Path, sig: int) -> None:
    stop_in(["data", "check", str(synth_root)], "checking images", 2, tmp_path / "check.log", sig)


@pytest.mark.slow
def test_train_stopped_in_any_phase_leaves_no_process_and_runs_again(
    synth_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # 80 scans to decode (from 64 the check has workers), one validation, two centers to score
    sets = [*FAST, "data.num_workers=2", "data.test_centers=[huaxi]", "train.val_every=4"]
    sets.append(f"data.cache_dir={tmp_path / 'cache'}")
    args = ["train", "--data", str(synth_root), "--out", str(out), *(f"--set={s}" for s in sets)]
    # the decode check's workers, the tissue masks (no workers), the data loaders' workers
    phases = [("checking images", 2), ("tissue masks", 0), ("training", 2), ("evaluating", 2)]
    for phase, workers in phases:  # each attempt also runs again the one stopped before it
        stop_in(args, phase, workers, tmp_path / f"{phase}.log")
    done = subprocess.run([sys.executable, "-m", "savlt.cli", *args, "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["complete"] is True


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from savlt.engine.training import train

    run = tmp_path_factory.mktemp("stopping") / "run"
    train(fast_config(synth_root), run, progress=False)
    return run


@pytest.mark.slow
def test_evaluate_predict_pretrain_and_serve_stopped_leave_no_process(
    trained: Path, synth_root: Path, tmp_path: Path
) -> None:
    evaluate = ["evaluate", str(trained), "--out", str(tmp_path / "evaluation")]
    stop_in(evaluate, "checking images", 2, tmp_path / "evaluate.log")
    scans = sorted(p for p in (synth_root / "huaxi" / "images").rglob("*") if p.is_file())[:3]
    stop_in(["predict", str(trained), *map(str, scans)], "predicting", 0, tmp_path / "predict.log")
    pairs = short_caption_pairs(synth_root, tmp_path / "pairs")
    pretrain = ["pretrain", str(pairs), "--model", "tiny", "--out", str(tmp_path / "pt"), "--max-steps", "3"]
    stop_in([*pretrain, "--set", "data.num_workers=2"], "pretraining", 2, tmp_path / "pretrain.log")
    serve = ["serve", str(trained), "--port", "0", "--device", "cpu"]
    stop_in(serve, "serving", 0, tmp_path / "serve.log", signal.SIGHUP)


def test_a_script_calling_savlt_without_a_main_guard_fails_at_once(synth_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"  # the decode check's workers import it, and would train again
    script.write_text("import sys\nfrom savlt.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    sets = [*FAST, f"data.cache_dir={tmp_path / 'cache'}"]
    args = [
        "train",
        "--data",
        str(synth_root),
        "--out",
        str(tmp_path / "run"),
        "-q",
        *(f"--set={s}" for s in sets),
    ]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert 'call SAVLT under `if __name__ == "__main__":` in that script' in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith("savlt: error: the decode check's worker processes")
    )
