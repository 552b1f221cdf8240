"""The ``Coordinator`` an application starts itself: a thread of this process
(the default) or a child process, on a fresh private socket exported to child
processes through ``$SHMDEDUP_SOCKET``.  The server is imported only on start.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from shmdedup import protocol
from shmdedup.controls import ControlSettings
from shmdedup.errors import ControlError, CoordinatorUnavailableError
from shmdedup.pages import check_int
from shmdedup.paths import ENV_SOCKET
from shmdedup.stats import Stats
from shmdedup.tools.client import Client

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from shmdedup.coordinator.server import CoordinatorServer


class Coordinator:
    """A coordinator started by the application.

    ``with shmdedup.Coordinator() as c:`` runs the coordinator in a thread of
    this process (``process=True``: in a child process) on a fresh private
    socket, exported to child processes through ``$SHMDEDUP_SOCKET``, and
    points this process's own regions at it.  Controls are keyword arguments
    (``pages_to_scan=10000, sleep_millisecs=0``).

    Trust (docs/security.md): peers of this uid are served; ``allow_uids`` /
    ``allow_gids`` admit more (the socket then needs ``socket_mode``, e.g.
    0o666, and a directory they can reach).  A coordinator process is made
    non-dumpable unless ``dumpable=True``.  ``metrics_port=N`` serves
    Prometheus metrics on 127.0.0.1:N (0: a free port, see ``metrics_port``;
    needs the ``prometheus`` extra).  ``stderr`` (a file or fd) receives a
    coordinator process's log instead of this process's stderr.  One still
    running when the interpreter exits is stopped then (``atexit``), so that
    its socket and private directory go with it.
    """

    def __init__(self, socket_path: str | None = None, *, domain: str | None = None,
                 process: bool = False, export_env: bool = True,
                 allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = (),
                 socket_mode: int = 0o600, dumpable: bool = False,
                 metrics_port: int | None = None, stderr: int | IO[Any] | None = None,
                 **controls: Unpack[ControlSettings]) -> None:
        from shmdedup.controls import check_control
        for k, v in controls.items():
            check_control(k, v)
        # uid_t / gid_t values; (uid_t)-1 is no id
        self.allow_uids: set[int] = {check_int("allow_uids", u, 0, 2**32 - 2) for u in allow_uids}
        self.allow_gids: set[int] = {check_int("allow_gids", g, 0, 2**32 - 2) for g in allow_gids}
        self.socket_mode = check_int("socket_mode", socket_mode, 0, 0o777)
        self.dumpable = dumpable
        if metrics_port is not None:
            check_int("metrics_port", metrics_port, 0, 65535)
        self.controls = controls
        self._metrics_port = metrics_port
        self.process = process
        self.export_env = export_env
        self.stderr = stderr
        self._tmpdir: str | None = None
        if socket_path is None and domain is not None:
            socket_path = protocol.default_socket_path(domain)
        self._path = socket_path
        self._server: CoordinatorServer | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._old_env: str | None = None
        self._client: Client | None = None
        self._started_by: int | None = None   # pid

    @property
    def socket_path(self) -> str:
        if self._path is None:
            raise ControlError("coordinator not started")
        return self._path

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics on 127.0.0.1 (the one picked for 0), or None."""
        if self._server is not None:
            return self._server.metrics_port
        if self._proc is not None and self._metrics_port is not None:
            return self.stats().get("metrics_port")
        return None

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else os.getpid()

    def start(self) -> Coordinator:
        if self._path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="shmdedup-")
            self._path = os.path.join(self._tmpdir, "coordinator.sock")
        if self.process:
            cmd = [sys.executable, "-m", "shmdedup", "coordinator", "--socket", self._path,
                   "--parent-pid", str(os.getpid()),
                   "--socket-mode", f"{self.socket_mode:o}"]
            for k, v in self.controls.items():
                cmd += ["--set", f"{k}={v}"]
            cmd += [f"--allow-uid={u}" for u in sorted(self.allow_uids)]
            cmd += [f"--allow-gid={g}" for g in sorted(self.allow_gids)]
            if self.dumpable:
                cmd.append("--dumpable")
            if self._metrics_port is not None:
                cmd += ["--metrics-port", str(self._metrics_port)]
            self._proc = subprocess.Popen(cmd, stderr=self.stderr)
            deadline = time.monotonic() + 30
            while True:
                try:
                    Client(self._path, timeout=2).close()
                    break
                except CoordinatorUnavailableError:
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        path, code = self._path, self._proc.poll()
                        self.stop()
                        why = f"it exited with status {code}" if code is not None else "timed out"
                        raise CoordinatorUnavailableError(
                            f"coordinator process did not start at {path} ({why}; see its stderr)") from None
                    time.sleep(0.02)
        else:
            from shmdedup.coordinator.server import CoordinatorServer
            self._server = CoordinatorServer(self._path, self.controls, self.allow_uids,
                                             self.allow_gids, self.socket_mode,
                                             metrics_port=self._metrics_port)
            self._thread = threading.Thread(target=self._server.serve, name="shmdedup-coordinator",
                                            daemon=True)
            self._thread.start()
        if self.export_env:
            self._old_env = os.environ.get(ENV_SOCKET)
            os.environ[ENV_SOCKET] = self._path
        from shmdedup.worker import agent
        agent.reconnect_soon()
        self._started_by = os.getpid()
        atexit.register(self._stop_at_exit)
        return self

    def _stop_at_exit(self) -> None:
        # A forked child inherits this registration, not the coordinator:
        # stopping it there would remove the parent's socket.
        if self._started_by == os.getpid():
            self.stop()

    def client(self) -> Client:
        if self._client is None:    # one for good: it reconnects after a timeout itself
            self._client = Client(self.socket_path)
        return self._client

    def stats(self) -> Stats:
        """Every control and statistic (:class:`shmdedup.Stats` names each key)."""
        return self.client().stats()

    def set(self, name: str, value: int) -> None:
        self.client().set(name, value)

    def wait_full_scans(self, n: int = 1, timeout: float = 60.0) -> int:
        return self.client().wait_full_scans(n, timeout)

    def stop(self) -> None:
        atexit.unregister(self._stop_at_exit)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.stop()
            if self._thread is not None:
                self._thread.join(30)
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.export_env and os.environ.get(ENV_SOCKET) == self._path:
            if self._old_env is None:
                os.environ.pop(ENV_SOCKET, None)
            else:
                os.environ[ENV_SOCKET] = self._old_env
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._path = None

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Coordinator"]
