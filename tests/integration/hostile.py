"""Harness for the hostile-input tests: a live coordinator, raw peers, real workers.

* :class:`Domain` runs a real ``CoordinatorServer`` in a thread of the test
  process on a private socket and captures its log records (only its own
  thread's), so a test can assert the reason a connection was closed.  The
  coordinator being in this process also lets the leak fixture check that a
  hostile message leaves no fd behind in it.
* :class:`RawPeer` speaks raw bytes on the socket: any msgpack (or none), any
  fds, any order, bypassing ``protocol.encode``'s checks.
* :func:`spawn_worker` starts a real worker process (the library's own agent)
  whose region holds pages that merge; tests check that it keeps merging and
  that its bytes never change while hostile peers come and go.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import msgpack

from shmdedup import protocol
from shmdedup.tools.client import Client
from shmdedup.coordinator.server import CoordinatorServer
from tests.helpers import Worker, wait_for

PAGE = os.sysconf("SC_PAGE_SIZE")
LOGGER = "shmdedup.coordinator"


class _Capture(logging.Handler):
    def __init__(self, thread_name: str) -> None:
        super().__init__(logging.DEBUG)
        self.thread_name = thread_name
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName == self.thread_name:
            self.records.append(record)


class Domain:
    """A live coordinator in a thread, its socket, its log and a client."""

    _n = 0

    def __init__(self, *, socket_mode: int = 0o600, allow_uids: set[int] | None = None,
                 allow_gids: set[int] | None = None, dir_mode: int = 0o700,
                 **controls: int) -> None:
        Domain._n += 1
        self.dir = tempfile.mkdtemp(prefix="shmdedup-hostile-")
        os.chmod(self.dir, dir_mode)
        self.path = os.path.join(self.dir, "c.sock")
        controls.setdefault("sleep_millisecs", 2)
        self.server = CoordinatorServer(self.path, controls, allow_uids, allow_gids, socket_mode)
        name = f"coordinator-{os.getpid()}-{Domain._n}"
        self.log = _Capture(name)
        logger = logging.getLogger(LOGGER)
        logger.addHandler(self.log)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        self.thread = threading.Thread(target=self.server.serve, name=name, daemon=True)
        self.thread.start()
        self._client: Client | None = None

    # -- observing ---------------------------------------------------------

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.log.records]

    def wait_logged(self, text: str, timeout: float = 10.0) -> str:
        """The first captured record containing *text* (waits for it)."""
        return wait_for(lambda: next((m for m in self.messages() if text in m), None),
                        timeout, what=f"the coordinator to log {text!r}; it logged "
                                      f"{self.messages()[-5:]}")

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.path)
        return self._client

    def stats(self) -> dict[str, Any]:
        return self.client().stats()

    def worker_stats(self, pid: int) -> dict[str, Any] | None:
        return next((w for w in self.stats()["workers"] if w["pid"] == pid), None)

    def wait_merging(self, pid: int, pages: int, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until worker *pid* has exactly *pages* pages merged."""
        def ok() -> dict[str, Any] | None:
            w = self.worker_stats(pid)
            return w if w is not None and w["ksm_merging_pages"] + w["ksm_zero_pages"] == pages \
                else None
        return wait_for(ok, timeout, what=f"worker {pid} to have {pages} pages merged "
                                          f"(now {self.worker_stats(pid)})")

    def wait_full_scans(self, n: int = 2) -> int:
        return self.client().wait_full_scans(n, timeout=30)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.server.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the coordinator thread did not stop"
        logging.getLogger(LOGGER).removeHandler(self.log)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


class RawPeer:
    """A connection that sends whatever bytes and fds it is told to."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 * protocol.MAX_MESSAGE)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.fds_received: list[int] = []

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send one message; False if the coordinator has already closed on us."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> bool:
        return self.send_raw(msgpack.packb(msg, use_bin_type=True), fds)

    def recv(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next message (any fds with it are closed), None at EOF."""
        self.sock.settimeout(timeout)
        try:
            data, anc, _, _ = self.sock.recvmsg(protocol.MAX_MESSAGE + 1,
                                                socket.CMSG_SPACE(4 * protocol.MAX_FDS))
        except ConnectionResetError:
            return None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[:len(payload) - len(payload) % 4])
                for fd in a:
                    os.close(fd)
        if not data:
            return None
        return msgpack.unpackb(data, raw=False)

    def hello(self, role: str = "worker") -> dict[str, Any]:
        self.send({"t": "hello", "v": protocol.PROTOCOL_VERSION, "role": role, "pid": os.getpid()})
        msg = self.recv()
        assert msg is not None and msg["t"] == "welcome", msg
        return msg

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Read (and drop) messages until the coordinator closes; True at EOF."""
        while True:
            try:
                if self.recv(timeout) is None:
                    return True
            except TimeoutError:
                return False

    def close(self) -> None:
        self.sock.close()


def memfd(size: int = 0, data: bytes = b"") -> int:
    fd = os.memfd_create("shmdedup-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    return fd


def register_raw(peer: RawPeer, rid: int, pages: bytes, *, advise: bool = True) -> tuple[int, int]:
    """Register a memfd region holding *pages*; returns (backing, meta) fds (ours to close)."""
    n = len(pages) // PAGE
    backing, meta = memfd(n * PAGE, pages), memfd(PAGE)
    peer.send({"t": "register", "rid": rid, "npages": n}, [backing, meta])
    if advise:
        peer.send({"t": "advise", "rid": rid, "start": 0, "npages": n, "mergeable": True})
    return backing, meta


# A real worker: the library's agent, a region of NPAGES pages where each of
# NPAGES // 2 random pages appears twice (so it merges with itself), and the
# sha256 of its bytes to prove they never change.
WORKER_SETUP = """
import hashlib, os
import numpy as np
import shmdedup
from shmdedup.worker import agent
agent.set_socket(SOCKET)
P = shmdedup.worker.region.PAGE_SIZE

def content(npages, seed):
    half = np.random.default_rng(seed).integers(0, 256, (npages // 2, P), dtype=np.uint8)
    return np.concatenate([half, half]).reshape(-1)

def digest():
    return hashlib.sha256(memoryview(region)).hexdigest()

region = shmdedup.Region(NPAGES * P)
arr = region.ndarray(np.uint8)
arr[:] = content(NPAGES, SEED)
region.advise(shmdedup.MERGEABLE)
"""


def spawn_worker(path: str, npages: int = 32, seed: int = 1) -> tuple[Worker, str]:
    """A real worker process on *path*; returns it and the sha256 of its region."""
    w = Worker()
    w.run(WORKER_SETUP, SOCKET=path, NPAGES=npages, SEED=seed)
    return w, w.call("result = digest()")


def rewrite(w: Worker, seed: int) -> str:
    """Give a worker's region new content (copy-on-write breaks); its new sha256."""
    sha, merged = w.call("before = region.breaks; arr[:] = content(NPAGES, SEED2); "
                         "result = digest(), region.breaks - before", SEED2=seed)
    assert merged > 0, "nothing was merged to break"
    return sha
