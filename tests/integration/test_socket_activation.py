"""Socket activation (shmdedup/coordinator/activation.py, docs/deploy.md): the
coordinator serves on a listening socket a service manager passed it
(sd_listen_fds(3): fd 3, ``LISTEN_PID``, ``LISTEN_FDS``), keeps the socket file
when it stops, and a coordinator started later on the same socket serves the
connections that waited in its backlog meanwhile (what systemd does across a
restart).  A socket that is not its own is left alone.

The manager is played by this test (a launcher puts the socket at fd 3 and
sets ``LISTEN_PID`` to its own pid before exec), and by ``systemd-socket-activate``
where it is installed (it binds the socket and starts the coordinator on the
first connection).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from shmdedup import _native
from shmdedup.tools.client import Client
from tests import helpers
from tests.cluster import digest, start_worker
from tests.helpers import child_env, no_shm_leftovers, reaper, wait_for  # noqa: F401

P = _native.PAGE_SIZE
N = 32
FAST = ["--set", "sleep_millisecs=0", "--set", "pages_to_scan=1000"]

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


@pytest.fixture
def socket_path() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="shmdedup-act-")
    yield os.path.join(tmp, "c.sock")
    shutil.rmtree(tmp, ignore_errors=True)


def listening(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(64)
    return s


# What a service manager does between fork and exec.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


def passing(listener: socket.socket, *argv: str) -> list[str]:
    """A command line that runs argv with *listener* passed as a service
    manager passes it: at fd 3, LISTEN_FDS=1, LISTEN_PID=its pid."""
    return [sys.executable, "-c", LAUNCHER, str(listener.fileno()), *argv]


def activate(listener: socket.socket, path: str, *extra: str) -> subprocess.Popen:
    """``shmdedup coordinator --socket path``, passed *listener*."""
    proc = subprocess.Popen(passing(listener, sys.executable, "-m", "shmdedup", "coordinator",
                                    "--socket", path, "-v", *FAST, *extra),
                            pass_fds=(listener.fileno(),), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(helpers.REPO_ROOT))
    helpers._spawned_pids.add(proc.pid)
    return proc


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, reap; its stderr.  It must exit 0."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the coordinator ignored SIGTERM for 30 s") from None
    assert proc.returncode == 0, err
    return err


def same_socket(pid: int, fd: int, listener: socket.socket) -> bool:
    """fd of process pid is our listening socket (the same sockfs inode)."""
    return os.stat(f"/proc/{pid}/fd/{fd}").st_ino == os.fstat(listener.fileno()).st_ino


def data(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(P) for _ in range(N))


def merge_pair(path: str, content: bytes, timeout: float = 60) -> list:
    """Two workers holding the same N pages; returns them once all are merged."""
    workers = [start_worker(path) for _ in range(2)]
    for w in workers:
        w.call("new('a', data)", data=content)
    with Client(path, timeout=60) as c:
        wait_for(lambda: c.stats()["pages_sharing"] == N, timeout, "both workers' pages to merge")
    return workers


def test_coordinator_serves_on_the_socket_it_is_passed(socket_path: str) -> None:
    listener = listening(socket_path)
    inode = os.stat(socket_path).st_ino
    proc = activate(listener, socket_path)
    try:
        workers = merge_pair(socket_path, data(1))
        # The coordinator serves on our socket (fd 3), and bound no other.
        assert same_socket(proc.pid, 3, listener)
        assert os.stat(socket_path).st_ino == inode
        with Client(socket_path, timeout=60) as c:
            assert c.stats()["pages_shared"] == N
        for w in workers:
            assert w.call("result = digests()")["a"] == digest(data(1))
            w.close()
    finally:
        err = stop(proc)
        listener.close()
    assert "passed by the service manager (fd 3)" in err, err


def test_restart_keeps_the_socket_and_its_backlog(socket_path: str) -> None:
    """Stopped, the coordinator leaves the socket file and the listening socket
    alone; a worker that connects meanwhile waits in the backlog, and the next
    coordinator on the same socket serves it."""
    listener = listening(socket_path)
    first = activate(listener, socket_path)
    try:
        with Client(socket_path, timeout=60) as c:
            c.stats()
    finally:
        stop(first)
    assert os.path.exists(socket_path), "the coordinator unlinked a socket it did not bind"
    # No coordinator now: connects still succeed (the backlog holds them).
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    waiting.settimeout(5)
    waiting.connect(socket_path)
    waiting.close()
    a, b = start_worker(socket_path), start_worker(socket_path)
    for w in (a, b):
        w.call("new('a', data)", data=data(2))
    second = activate(listener, socket_path)
    try:
        with Client(socket_path, timeout=60) as c:
            wait_for(lambda: c.stats()["pages_sharing"] == N, 60, "the waiting workers' pages to merge")
        for w in (a, b):
            assert w.call("result = digests()")["a"] == digest(data(2))
            w.close()
    finally:
        stop(second)
        listener.close()


CHECK_INHERITED = """
import os, socket, sys
from shmdedup.coordinator.activation import inherited_listener
path, other = sys.argv[1], sys.argv[2]
out = {"other": inherited_listener(other)}
out["fd3_open"] = os.path.exists("/proc/self/fd/3")
pid = os.environ.pop("LISTEN_PID")
os.environ["LISTEN_PID"] = str(int(pid) + 1)          # meant for another process
out["not_ours"] = inherited_listener(path)
os.environ["LISTEN_PID"] = pid
s = inherited_listener(path)
out["taken"] = s is not None and s.fileno() == 3
out["cloexec"] = s is not None and not s.get_inheritable()
out["env_left"] = [k for k in ("LISTEN_PID", "LISTEN_FDS") if k in os.environ]
print(out)
"""


def test_only_our_own_listening_socket_is_taken(socket_path: str) -> None:
    listener = listening(socket_path)
    other = os.path.join(os.path.dirname(socket_path), "other.sock")
    r = subprocess.run(passing(listener, sys.executable, "-c", CHECK_INHERITED, socket_path, other),
                       pass_fds=(listener.fileno(),), env=child_env(), capture_output=True, text=True, timeout=60,
                       cwd=str(helpers.REPO_ROOT))
    listener.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str({"other": None, "fd3_open": True, "not_ours": None,
                                    "taken": True, "cloexec": True, "env_left": []})


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_systemd_socket_activate_starts_it_on_first_connection(socket_path: str) -> None:
    proc = subprocess.Popen(["systemd-socket-activate", "--seqpacket", "-l", socket_path,
                             sys.executable, "-m", "shmdedup", "coordinator", "--socket", socket_path,
                             "-v", *FAST],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(helpers.REPO_ROOT))
    helpers._spawned_pids.add(proc.pid)
    try:
        wait_for(lambda: os.path.exists(socket_path) or proc.poll() is not None, 30,
                 "systemd-socket-activate to bind the socket")
        assert proc.poll() is None, proc.communicate()[1]
        workers = merge_pair(socket_path, data(3))   # the first connection starts it
        for w in workers:
            assert w.call("result = digests()")["a"] == digest(data(3))
            w.close()
    finally:
        err = stop(proc)
    assert "passed by the service manager (fd 3)" in err, err
