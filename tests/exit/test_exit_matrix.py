"""The exit matrix: a library must never hang its host's exit (issue 10).

Every case is a subprocess running ``exit_case.py``: it allocates a region,
gets it merged, puts something in flight and holds it there (the test fault
points' hold action), does what the script of issue 10 does, and ends in one
of the ways a program ends.  The test gives it DEADLINE seconds from the go
(or the signal) to exit, with the status that way of ending gives and
nothing unexpected on stderr, then checks the coordinator's books: the
worker is gone from its statistics, every counter is back to zero (no stable
slot left allocated), and nothing of the worker's is left in /dev/shm.

Dimensions (see exit_case.py): ways of ending x coordinator (running,
absent, killed after the worker got into position) x views (alive to the
end, released) x phase: idle; register (the agent held holding its lock, as
a daemon thread stopped by finalization holds it: every case of that phase
that finalizes hangs without the fix of issue 10); mid-merge; mid-break.
Views only matter to ways that finalize the interpreter (os._exit, SIGTERM
and a forked multiprocessing child end without it); the held phases need a
coordinator, and a held thread does not see it killed, so those cases run
with views alive only (and register, whose held agent holds the dead
connection as it holds a live one, not at all).  ``embedded`` (an in-process coordinator never stopped) is run
for every way, idle, views alive: the exit stops it and removes its socket's
directory (not when no Python runs at the end: SIGTERM, os._exit).

Cases with a running coordinator share one coordinator process per xdist
worker (cases run one at a time there, so its counters belong to the case);
a killed one gets its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.cluster import CoordinatorProcess
from tests.helpers import child_env, shm_names, wait_for

CASE = Path(__file__).with_name("exit_case.py")
DEADLINE = 10.0      # s from the go to the exit; a healthy case takes < 1.5 s
CONTROLS = {"sleep_millisecs": 0, "pages_to_scan": 64}
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
            "rmap_items", "stable_pages_allocated", "pages_inherited")

# Way of ending -> the exit status it gives.
WAYS = {
    "end": 0,
    "exit": 3,
    "thread_exit": 0,
    "raise": 1,
    "sigterm": -signal.SIGTERM,
    "sigint": -signal.SIGINT,
    "os_exit": 4,
    "mp_fork": 0,
    "mp_spawn": 0,
}
# Ways that end without finalizing the interpreter of the process holding the region.
NO_FINALIZATION = {"sigterm", "os_exit", "mp_fork"}
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
# The last line of the one traceback a way leaves on stderr; the others leave nothing.
STDERR = {"raise": "RuntimeError: the end of an exit case", "sigint": "KeyboardInterrupt"}


def matrix() -> Iterator[Any]:
    for phase, coordinators in (("idle", ("running", "absent", "killed")), ("register", ("running",)),
                                ("merge", ("running", "killed")), ("break", ("running", "killed"))):
        for coordinator in coordinators:
            for way in WAYS:
                for views in ("alive", "released"):
                    if views == "released" and (way in NO_FINALIZATION or
                                                coordinator == "killed" and phase != "idle"):
                        continue
                    yield pytest.param(way, coordinator, views, phase,
                                       id=f"{way}-{coordinator}-views_{views}-{phase}")
    for way in WAYS:
        yield pytest.param(way, "embedded", "alive", "idle", id=f"{way}-embedded-views_alive-idle")


@pytest.fixture(scope="module")
def shared_coordinator() -> Iterator[CoordinatorProcess]:
    tmp = tempfile.mkdtemp(prefix="shmdedup-exit-")
    coord = CoordinatorProcess(os.path.join(tmp, "c.sock"), **CONTROLS).go()
    try:
        yield coord
    finally:
        assert coord.stop() == 0
        os.rmdir(tmp)


def books_problem(coord: CoordinatorProcess, pids: set[int]) -> str | None:
    stats = coord.stats()
    left = [w for w in stats["workers"] if w["pid"] in pids]
    if left:
        return f"workers still registered: {left}"
    nonzero = {k: stats[k] for k in COUNTERS if stats[k]}
    return f"counters not back to zero: {nonzero}" if nonzero else None


class Case:
    """One exit_case.py process, driven through its stdin and stdout."""

    def __init__(self, way: str, views: str, phase: str, coordinator: str, socket: str) -> None:
        self.way = way
        self.proc = subprocess.Popen(
            [sys.executable, str(CASE), way, views, phase, coordinator],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=child_env({"SHMDEDUP_SOCKET": socket}), cwd=str(helpers.REPO_ROOT),
            start_new_session=True)
        helpers._spawned_pids.add(self.proc.pid)
        self.pids = {self.proc.pid}
        self.embedded_dir: str | None = None

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the case gives up on its own after exit_case.WAIT
        if not line.startswith("ready "):
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"case did not get into position (exit {self.proc.returncode}): "
                                 f"{line!r}\n{err}")
        holder, *where = line.split()[1:]
        self.embedded_dir = os.path.dirname(where[0]) if where else None
        self.pids.add(int(holder))
        helpers._spawned_pids.add(int(holder))

    def end(self) -> tuple[int, str, float]:
        """Go (or the signal); (exit status, stderr, seconds to exit)."""
        start = time.monotonic()
        if self.way in SIGNALS:
            os.kill(self.proc.pid, SIGNALS[self.way])
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        try:
            _, err = self.proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            stacks = _stacks(self.proc.pid)
            self.kill()
            raise AssertionError(f"{self.way}: the process did not exit within {DEADLINE} s "
                                 f"(a hung exit)\n{stacks}") from None
        return self.proc.returncode, err, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()
        for pid in self.pids - {self.proc.pid}:  # a multiprocessing child left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stacks(pid: int) -> str:
    """Thread stacks of a hung process (for the failure message), if gdb is here."""
    try:
        out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 8"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "(no stacks: gdb unavailable)"
    return "\n".join(line for line in out.splitlines() if line.startswith(("Thread", "#")))


@pytest.mark.parametrize("way, coordinator, views, phase", matrix())
def test_exit(way: str, coordinator: str, views: str, phase: str, request: Any) -> None:
    tmp = tempfile.mkdtemp(prefix="shmdedup-exit-")
    coord = None
    if coordinator == "running":
        coord = request.getfixturevalue("shared_coordinator")
        socket = coord.path
    elif coordinator == "killed":
        coord = CoordinatorProcess(os.path.join(tmp, "c.sock"), **CONTROLS).go()
        socket = coord.path
    else:
        socket = os.path.join(tmp, "nobody.sock")
    case = Case(way, views, phase, coordinator, socket)
    try:
        case.wait_ready()
        if coordinator == "killed":
            coord.kill()
        status, err, took = case.end()
    finally:
        case.kill()
        if coordinator == "killed":
            coord.kill()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    want_err = STDERR.get(way)
    lines = err.strip().splitlines()
    clean = not err if want_err is None else \
        lines[0].startswith("Traceback") and err.count("Traceback") == 1 and lines[-1] == want_err
    assert status == WAYS[way] and clean, \
        f"{way}: exit status {status} (want {WAYS[way]}), after {took:.2f} s; stderr:\n{err}"
    if coordinator == "running":
        assert coord is not None
        try:
            wait_for(lambda: books_problem(coord, case.pids) is None, 30, "the books")
        except AssertionError:
            raise AssertionError(f"{way}: 30 s after the exit, {books_problem(coord, case.pids)}") from None
    assert shm_names(case.pids) == set()
    if case.embedded_dir is not None:
        # Stopped at exit (atexit), unless the way of ending runs no Python.
        left = os.path.exists(case.embedded_dir)
        if left:
            shutil.rmtree(case.embedded_dir)
        assert left == (way in NO_FINALIZATION), f"{way}: the embedded coordinator's directory left: {left}"
