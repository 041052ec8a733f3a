"""Processes that never outlive SAVLT: worker pools, signals, and stopping a process group.

Worker processes (the decode check's, the data loaders') come from a fork server: one clean
process, started the first time workers are needed, that imports the modules the workers run and
forks each worker from itself. Forking SAVLT's own process instead could deadlock a worker, since
it already runs threads (torch, OpenCV, progress bars) that may hold a lock at that moment. Each
worker ends as soon as its owner (the process that started it) has ended, however that ended, and
leaves Ctrl-C to its owner, which stops it; the fork server exits when its owner and its workers
have.

``stop_signals`` turns SIGTERM and SIGHUP into the KeyboardInterrupt that Ctrl-C raises, so every
command stops the same way whatever stopped it. ``stop_groups`` ends process groups (a sweep's
points and everything they started): SIGTERM to each leader, a grace period, then SIGKILL to the
whole group.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CLI imports this module and starts fast
    import subprocess
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

# Seconds a stopped process gets to end by itself before it is killed.
GRACE = 10.0
# What stops a command: Ctrl-C, `kill`, a closed terminal (there is no SIGHUP on Windows).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_PR_SET_PDEATHSIG = 1
_preload: set[str] = set()


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook (``subprocess.Popen(preexec_fn=...)``) that has the kernel send SIGTERM to
    the child when the process that started it dies (Linux only; None elsewhere)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def worker_started(owner: int, _worker: int | None = None) -> None:
    """Set up a worker process of `owner` (the process that started the pool; a data loader also
    passes the worker's number): it ends as soon as its owner has ended, and ignores Ctrl-C (its
    owner stops it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(owner,), name="savlt-owner-watch", daemon=True).start()


def _end_with(owner: int) -> None:
    """End this process once process `owner` has ended. (Its parent is the fork server, which
    does not end before its workers do: each of them holds the pipe it waits on.)"""
    try:
        select.select([os.pidfd_open(owner)], [], [])  # Linux 5.3+: readable once it has ended
    except ProcessLookupError:  # it has already ended
        pass
    except (AttributeError, OSError):  # no pidfd here: look every second
        with contextlib.suppress(OSError):
            while True:
                os.kill(owner, 0)
                time.sleep(1.0)
    os._exit(1)


def worker_context(*preload: str) -> BaseContext:
    """The start method of every worker process: the fork server (spawn on Windows, which has
    none). `preload` names the modules the workers run; the server imports them (and those named
    by earlier calls) once, when it starts, so a worker starts in milliseconds. A module named
    after it started is imported by each worker itself."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    _preload.update(preload)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(_preload))
    return context


def start_worker_server(*preload: str) -> None:
    """Start the fork server now (see ``worker_context``), so it imports `preload` while this
    process does other work; it is started only once."""
    from multiprocessing import forkserver

    if worker_context(*preload).get_start_method() == "forkserver":
        forkserver.ensure_running()


# What a worker says when it finds itself importing a script that runs SAVLT at its top level.
UNGUARDED = (
    "savlt: error: a worker process is importing the script that started it, which calls SAVLT at "
    'the top level: call SAVLT under `if __name__ == "__main__":` in that script (worker processes '
    "import it)"
)


def refuse_in_a_starting_worker() -> None:
    """End a worker process that is still importing the script that started it, with one line on
    stderr: that script calls SAVLT without ``if __name__ == "__main__":``, and going on would run
    the whole command again in each worker (under ``accelerate launch``, waiting forever for the
    other ranks). The pool that started the worker then finds it gone (``check_scans`` says so in
    one line too)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):  # multiprocessing's own test
        print(UNGUARDED, file=sys.stderr, flush=True)
        os._exit(2)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM and SIGHUP raise KeyboardInterrupt, as
    Ctrl-C does, so the same clean-up runs whatever stopped the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS if sig != signal.SIGINT}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore further stop signals while the block (a bounded clean-up) runs in the main thread:
    a second Ctrl-C must not cut short the stopping of worker processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_processes(processes: Sequence[BaseProcess], grace: float = GRACE) -> None:
    """End `processes` (multiprocessing's): SIGTERM, then SIGKILL to those still alive after
    `grace` seconds; returns when all have ended."""
    with shielded():
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def stop_pool(pool: ProcessPoolExecutor, grace: float = GRACE) -> None:
    """Stop a pool now, without waiting for its work: drop the tasks not started, end the workers
    (``stop_processes``), and release the pool."""
    # the pool offers no public handle on its workers (before Python 3.14's terminate_workers)
    workers = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    stop_processes(workers, grace)


def group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid` that have not ended (zombies are ended); off Linux,
    [pgid] while the group has any process."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        state, _parent, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def stop_groups(leaders: Sequence[subprocess.Popen], grace: float = GRACE) -> list[int]:
    """Stop the process groups led by `leaders` (this process's children, each started with
    ``start_new_session``) and wait for them: SIGTERM to each leader, which stops what it started;
    after `grace` seconds SIGKILL to every process left in the groups. Returns the processes still
    there when it gave up, 5 s after the SIGKILL (normally none)."""

    def left() -> list[int]:
        for leader in leaders:
            leader.poll()  # reap an ended leader
        return [pid for leader in leaders for pid in group_members(leader.pid)]

    def wait(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)

    with shielded():
        for leader in leaders:
            leader.send_signal(signal.SIGTERM)  # nothing once it has been reaped
        wait(grace)
        for leader in leaders:
            if group_members(leader.pid):  # a group's id is not given to a new process while it has members
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.killpg(leader.pid, signal.SIGKILL)
        wait(5.0)
        return left()
