"""Test helpers: child processes, waiting on conditions, leak checks, memory probes.

Import what a test module needs (``from tests.helpers import ...``); pytest picks
up the fixtures imported into a module.  Rules kept here, for every test:

* Every process started through these helpers is reaped: ``run_python`` kills
  and waits on timeout, ``Worker.close`` joins then kills, and the ``reaper``
  fixture closes whatever a test left open.
* Nothing sleeps to synchronise: ``wait_for`` polls a condition with a timeout
  and says what it was waiting for.
* The ``no_shm_leftovers`` fixture fails a test that leaves a name of ours (this
  process or a child it spawned) in /dev/shm, or an fd open in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Children of a loaded 2-vCPU CI box start slowly (numpy import, spawn); no test
# here should come anywhere near this unless something hangs.
DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")

# Pids of every child started by these helpers in this process: the leak check
# looks for their /dev/shm names too.
_spawned_pids: set[int] = set()
_live: list[Any] = []  # open Workers / Popens, closed by the reaper fixture


# ---- waiting -------------------------------------------------------------

def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.002) -> T:
    """Poll ``cond()`` until it returns something truthy; return that value.

    Raises AssertionError naming ``what`` after ``timeout`` seconds.  The poll
    interval grows to at most 50 ms, so short waits stay short.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


# ---- one-shot child processes ---------------------------------------------

@dataclass
class ChildResult:
    returncode: int | None  # None only if it timed out (then it was killed and reaped)
    stdout: str
    stderr: str
    timed_out: bool
    pid: int

    def check(self) -> ChildResult:
        """Assert a clean exit (status 0, no timeout), showing stderr otherwise."""
        assert not self.timed_out, f"child {self.pid} timed out\nstderr:\n{self.stderr}"
        assert self.returncode == 0, f"child {self.pid} exited {self.returncode}\nstderr:\n{self.stderr}"
        return self


def child_env(extra: dict[str, str] | None = None, *, faulthandler: bool = False) -> dict[str, str]:
    """The environment for a child: the repo importable, faulthandler off unless asked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONFAULTHANDLER", None)
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # no idle BLAS threads in children
    env.update(extra or {})
    return env


def run_python(code: str, *, timeout: float = DEFAULT_TIMEOUT, flags: tuple[str, ...] = (),
               env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
               args: tuple[str, ...] = ()) -> ChildResult:
    """Run a dedented snippet in a fresh ``python`` and collect its exit status and output.

    A negative returncode is the signal that ended it (-SIGSEGV: a crash).  On
    timeout the child (its whole session) is killed and reaped, and the result
    says ``timed_out``.
    """
    cmd = [sys.executable, *flags, "-c", textwrap.dedent(code), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env if env is not None else child_env(), pass_fds=pass_fds,
                            cwd=str(REPO_ROOT), start_new_session=True)
    _spawned_pids.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
        return ChildResult(proc.returncode, out, err, False, proc.pid)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return ChildResult(None, out, err, True, proc.pid)
    finally:
        if proc.poll() is None:  # an exception (KeyboardInterrupt) in communicate
            proc.kill()
            proc.wait()


# ---- long-lived worker processes ------------------------------------------

class WorkerError(AssertionError):
    """A snippet raised in the worker; the message holds its traceback."""


def _worker_main(conn: Any) -> None:
    """The worker's loop: receive (code, values, nfds), run it, reply.

    Snippets share one namespace across calls.  Inside a snippet: ``fds`` holds
    the descriptors sent with the call (the snippet owns them), ``send_fd(fd)``
    queues one to send back (and close here: pass a dup to keep one), and
    assigning ``result`` sets the reply.
    """
    ns: dict[str, Any] = {"__name__": "__worker__"}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        code, values, nfds = msg
        outgoing: list[int] = []
        ns.update(values)
        ns["fds"] = [recv_handle(conn) for _ in range(nfds)]
        ns["send_fd"] = outgoing.append
        ns["result"] = None
        try:
            exec(compile(code, "<worker snippet>", "exec"), ns)  # noqa: S102 - running snippets is the point
            reply = ("ok", ns["result"], len(outgoing))
        except BaseException:  # noqa: BLE001 - anything a snippet raises goes back to the harness
            outgoing.clear()
            reply = ("err", traceback.format_exc(), 0)
        conn.send(reply)
        for fd in outgoing:
            send_handle(conn, fd, os.getppid())
            os.close(fd)  # sent: the harness owns its copy now


class SnippetPeer:
    """The harness side of a process running ``_worker_main``: ``run`` and
    ``call`` over ``self.conn``.  ``Worker`` (spawned) and ``cluster.Forked``
    (forked by a zygote) differ only in how the process is started and reaped."""

    pid: int
    conn: Any

    def _gone(self) -> str:
        """How the process ended, for the error when it stops answering."""
        raise NotImplementedError

    def run(self, code: str, *, send_fds: tuple[int, ...] = (), timeout: float = DEFAULT_TIMEOUT,
            **values: Any) -> tuple[Any, list[int]]:
        """Execute ``code`` in the process's persistent namespace; ``(result, fds)``.
        fds passed either way travel with SCM_RIGHTS and belong to the receiver."""
        try:
            self.conn.send((textwrap.dedent(code), values, len(send_fds)))
            for fd in send_fds:
                send_handle(self.conn, fd, self.pid)
            if not self.conn.poll(timeout):
                raise AssertionError(f"worker {self.pid} did not answer within {timeout}s")
            status, value, nfds = self.conn.recv()
            if status != "ok":
                raise WorkerError(f"in worker {self.pid}:\n{value}")
            # The fds follow the reply: a victim armed to die may die between them.
            return value, [recv_handle(self.conn) for _ in range(nfds)]
        except (EOFError, OSError):
            raise AssertionError(f"worker {self.pid} died ({self._gone()})") from None

    def call(self, code: str, **kw: Any) -> Any:
        """``run`` for snippets that neither send nor receive fds: just the result."""
        return self.run(code, **kw)[0]


class Worker(SnippetPeer):
    """A Python process (multiprocessing, 'spawn' by default) running snippets on request."""

    def __init__(self, context: str = "spawn", setup: str = "") -> None:
        ctx = multiprocessing.get_context(context)
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True)
        self.proc.start()
        child_conn.close()
        self.pid: int = self.proc.pid
        self.exitcode: int | None = None
        _spawned_pids.add(self.pid)
        _live.append(self)
        if setup:
            self.run(setup)

    def _gone(self) -> str:
        self.proc.join(DEFAULT_TIMEOUT)
        return f"exitcode {self.proc.exitcode}"

    def close(self, timeout: float = 20.0) -> int | None:
        """Ask the worker to exit, then reap it (killing it after timeout); exit code.
        Idempotent."""
        if self in _live:
            _live.remove(self)
        if self.exitcode is not None or self.conn.closed:
            return self.exitcode
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()
        self.exitcode = self.proc.exitcode
        if self.exitcode is not None:
            self.proc.close()  # releases the sentinel fd now, not at garbage collection
        return self.exitcode


@pytest.fixture
def reaper() -> Iterator[None]:
    """Close (join, then kill) every Worker a test left running."""
    yield
    while _live:
        _live[-1].close()


# ---- leak checks ---------------------------------------------------------

def shm_names(pids: set[int]) -> set[str]:
    """Our names (``shmdedup-<tag>-<pid>-...``) in /dev/shm created by any of pids."""
    markers = tuple(f"-{pid}-" for pid in pids)
    return {n for n in os.listdir("/dev/shm") if n.startswith("shmdedup") and any(m in n for m in markers)}


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_shm_leftovers(reaper: None) -> Iterator[None]:
    """Fail the test if it leaves a /dev/shm name (of this process or its
    children) or an open fd behind.  Runs after the reaper."""
    fds_before = open_fds()
    names_before = shm_names({os.getpid()} | _spawned_pids)
    yield
    while _live:  # reap first: a live worker still holds its fds
        _live[-1].close()
    assert shm_names({os.getpid()} | _spawned_pids) - names_before == set()

    def leaked() -> dict[int, str]:
        # listdir opens an fd of its own (any free number), gone before readlink;
        # the first spawn starts multiprocessing's resource tracker, whose pipe
        # lives on: neither is a leak.
        new = open_fds() - fds_before - {getattr(resource_tracker._resource_tracker, "_fd", None)}
        return {fd: link for fd in sorted(new) if (link := _readlink(fd)) != "?"}

    try:
        wait_for(lambda: not leaked(), timeout=2.0, what="fds to be closed")
    except AssertionError:
        raise AssertionError(f"fds left open: {leaked()}") from None


def _readlink(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# ---- memory, seen from outside ---------------------------------------------

def meminfo_kb(field: str = "Shmem") -> int:
    """A /proc/meminfo field in KiB (system-wide: other processes add noise)."""
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0])
    raise KeyError(field)


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """The KiB fields of /proc/<pid>/smaps_rollup ({} if the kernel has none)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return {}
    out = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            out[parts[0][:-1]] = int(parts[1])
    return out


def allocated_bytes(fd: int) -> int:
    """Memory an shm object really holds (st_blocks), from any fd of it."""
    return os.fstat(fd).st_blocks * 512


def vma_count(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


# A worker whose region holds `npages` pages cycling through `distinct`
# contents, advised mergeable; it sends back a dup of its backing fd and its pid
# (shared by the monitoring tests: top and /metrics).
REPEATING_WORKER_SETUP = """
import os
import numpy as np
import shmdedup
shmdedup.set_socket(path)
P = shmdedup.PAGE_SIZE
region = shmdedup.Region(npages * P)
pages = region.ndarray(np.uint8).reshape(npages, P)
for i in range(npages):
    pages[i] = i % distinct + 1
del pages
region.advise(shmdedup.MERGEABLE)
send_fd(os.dup(region.backing_fd))
result = os.getpid()
"""
