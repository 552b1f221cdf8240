"""A domain of real processes for the restart and kill tests: coordinator
processes that can be killed and restarted on one socket, worker processes
that hold regions of known content, and the checks that every survivor reads
its exact bytes and that the coordinator's counters equal a recount from the
workers' state bytes.

* ``CoordinatorProcess`` runs ``shmdedup coordinator`` in its own process.  It
  is launched ahead of time (the interpreter and imports ready, waiting on
  stdin) so that a restart costs milliseconds, not an interpreter start.
* ``Zygote`` forks workers from a process that has everything imported: a
  worker that is about to be killed costs a fork, not a spawn.
* Worker code (``WORKER_SETUP``) keeps named regions; the test keeps the
  expected bytes of each and compares digests.

Every wait has a timeout and says what it waited for.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

from shmdedup import _native
from shmdedup.tools.client import Client
from shmdedup.errors import CoordinatorUnavailableError
from tests import helpers
from tests.helpers import DEFAULT_TIMEOUT, Worker, child_env, wait_for

P = _native.PAGE_SIZE

# ---- coordinator processes ----------------------------------------------------

_LAUNCHER = """
import sys
from shmdedup.tools import cli  # noqa: F401  (imported before the go)
from shmdedup.coordinator import server  # noqa: F401
if sys.stdin.readline().strip() == "go":
    sys.exit(cli.main(sys.argv[1:]))
"""


class CoordinatorProcess:
    """``shmdedup coordinator --socket PATH`` in a process of its own.

    Created, it is an interpreter with shmdedup imported, waiting; ``go()``
    starts the coordinator and waits until it answers.  ``kill()`` is kill -9.
    """

    def __init__(self, path: str, **controls: int) -> None:
        self.path = path
        args = ["coordinator", "--socket", path]
        for k, v in controls.items():
            args += ["--set", f"{k}={v}"]
        self._log = tempfile.TemporaryFile(prefix="shmdedup-coord-")  # noqa: SIM115 (closed in _finish)
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *args], stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=self._log, env=child_env(),
                                     cwd=str(helpers.REPO_ROOT))
        helpers._spawned_pids.add(self.proc.pid)
        self._client: Client | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self, timeout: float = DEFAULT_TIMEOUT) -> CoordinatorProcess:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}: {self.log()}")
            try:
                Client(self.path, timeout=2).close()
                return True
            except CoordinatorUnavailableError:
                return False
        wait_for(answers, timeout, f"the coordinator at {self.path} to answer")
        return self

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.path, timeout=DEFAULT_TIMEOUT)
        return self._client

    def stats(self) -> dict[str, Any]:
        return self.client().stats()

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def kill(self, timeout: float = 20.0) -> None:
        """kill -9 and reap."""
        self._close_client()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"coordinator {self.pid} survived SIGKILL for {timeout} s") from None
        self._finish()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (an orderly shutdown) and reap; returns the exit status."""
        self._close_client()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # a launcher that never got "go" exits on EOF
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"coordinator {self.pid} ignored SIGTERM for {timeout} s: {self.log()}") from None
        self._finish()
        return self.proc.returncode

    def _finish(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self._log.close()


# ---- workers --------------------------------------------------------------------

# Runs in every worker.  Regions by name; the harness keeps the expected bytes.
WORKER_SETUP = """
import hashlib, os, signal
import numpy as np
import shmdedup
from shmdedup import _native
from shmdedup.worker.region import Region, MERGEABLE, UNMERGEABLE, PAGE_SIZE as P

shmdedup.set_socket(SOCKET)
regions = {}

def new(name, data, advise=True, send=False):
    r = Region(len(data))
    with memoryview(r) as m:
        m[:] = data
    regions[name] = r
    if send:   # the harness looks at the backing and the state bytes from outside
        send_fd(os.dup(r.backing_fd))
        send_fd(os.dup(r.meta_fd))
    if advise:
        r.advise(MERGEABLE)

def write(name, edits):
    with memoryview(regions[name]) as m:
        for off, data in edits:
            m[off:off + len(data)] = data

def close(name):
    regions.pop(name).close()

def digests():
    out = {}
    for name, r in regions.items():
        with memoryview(r) as m:
            out[name] = hashlib.sha256(m).hexdigest()
    return out

def states():
    return {name: r.states() for name, r in regions.items()}
"""


def start_worker(socket_path: str) -> Worker:
    """A spawned worker running WORKER_SETUP, its agent pointed at socket_path."""
    w = Worker()
    w.call(WORKER_SETUP, SOCKET=socket_path)
    return w


class Zygote:
    """A worker process with shmdedup imported that forks workers on request
    (fork from a single-threaded process with no region: nothing to inherit)."""

    SETUP = """
import os, socket, time
os.environ["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS threads to lose at fork
from multiprocessing.connection import Connection
import numpy, shmdedup  # noqa: F401  (imported once, shared by every fork)
from tests.helpers import _worker_main

def fork_worker():
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            _worker_main(Connection(b.detach()))
        finally:
            os._exit(0)
    b.close()
    send_fd(a.detach())
    return pid

def reap(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)
"""

    def __init__(self) -> None:
        self.worker = Worker(setup=self.SETUP)

    def fork(self, setup: str = "", **values: Any) -> Forked:
        pid, fds = self.worker.run("result = fork_worker()")
        w = Forked(self, pid, Connection(fds[0]))
        if setup:
            w.call(setup, **values)
        return w

    def close(self) -> None:
        self.worker.close()


class Forked(helpers.SnippetPeer):
    """A worker forked by a Zygote; the same ``run``/``call`` as helpers.Worker."""

    def __init__(self, zygote: Zygote, pid: int, conn: Connection) -> None:
        self.zygote = zygote
        self.pid = pid
        self.conn = conn
        self.exitcode: int | None = None
        helpers._spawned_pids.add(pid)

    def _gone(self) -> str:
        return f"exit {self.wait()}"

    def wait(self, timeout: float = 20.0) -> int:
        """Reap it (through the zygote, its parent); the exit status."""
        if self.exitcode is None:
            code = self.zygote.worker.call(f"result = reap({self.pid}, {timeout})", timeout=timeout + 10)
            if code is None:
                raise AssertionError(f"worker {self.pid} did not exit within {timeout} s")
            self.exitcode = code
            self.conn.close()
        return self.exitcode

    def poll(self) -> int | None:
        """The exit status if it has exited (then reaped), else None."""
        if self.exitcode is None:
            code = self.zygote.worker.call(f"result = reap({self.pid}, 0)")
            if code is not None:
                self.exitcode = code
                self.conn.close()
        return self.exitcode

    def kill(self) -> int:
        if self.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # a zombie waiting for the zygote: reaped below
        return self.wait()

    def close(self) -> int:
        if self.exitcode is None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            try:
                return self.wait(10)
            except AssertionError:
                return self.kill()
        return self.exitcode


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def merged_counts(states: dict[str, bytes]) -> tuple[int, int]:
    """(pages MERGED, pages ZERO) over a worker's regions."""
    m = sum(s.count(bytes([_native.MERGED])) for s in states.values())
    z = sum(s.count(bytes([_native.ZERO])) for s in states.values())
    return m, z


def wait_registered(client: Client, regions: dict[int, int], timeout: float = 30.0) -> None:
    """Until exactly the workers pid -> number of regions are registered."""
    def ok() -> bool:
        got = {w["pid"]: w["regions"] for w in client.stats()["workers"]}
        return got == regions
    try:
        wait_for(ok, timeout, f"workers {regions} to be registered")
    except AssertionError:
        got = {w["pid"]: w["regions"] for w in client.stats()["workers"]}
        raise AssertionError(f"registered workers {got}, expected {regions}") from None


def settle(client: Client, check: Any, timeout: float = 30.0, what: str = "quiescence") -> Any:
    """Let full scans pass until ``check()`` returns None (settled); each
    failed check returns a description.  Raises with the last one."""
    deadline = time.monotonic() + timeout
    while True:
        problem = check()
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {problem}")
        client.wait_full_scans(1, timeout=max(1.0, deadline - time.monotonic()))


def recount_problem(stats: dict[str, Any], merged: int, zero: int) -> str | None:
    """The recount invariants, or what breaks them.  merged/zero: pages the
    workers' state bytes show MERGED/ZERO."""
    ours = stats["pages_shared"] + stats["pages_sharing"]
    if ours + stats["ksm_zero_pages"] + stats["pages_inherited"] != merged + zero:
        return (f"pages_shared {stats['pages_shared']} + pages_sharing {stats['pages_sharing']} + "
                f"ksm_zero_pages {stats['ksm_zero_pages']} + pages_inherited {stats['pages_inherited']} "
                f"!= {merged} MERGED + {zero} ZERO pages in the workers")
    if stats["stable_pages_allocated"] != stats["pages_shared"]:
        return (f"stable_pages_allocated {stats['stable_pages_allocated']} != "
                f"pages_shared {stats['pages_shared']} (slots nobody maps)")
    return None
