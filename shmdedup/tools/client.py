"""A control connection to a coordinator: statistics, controls, waiting for scans.

Used by the tools (``shmdedup stats/set/top``) and by applications; it imports
nothing of the coordinator's server.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from shmdedup import _shm, protocol
from shmdedup.errors import (ControlError, CoordinatorUnavailableError, PeerRejectedError,
                             ProtocolError)
from shmdedup.paths import resolve_socket_path
from shmdedup.stats import Stats


RETRY_SECONDS = 3.0     # how long a connection closed before its welcome is tried again


class _Refused(Exception):
    """The coordinator's ``refused`` message, in place of a welcome."""

    def __init__(self, why: str, retry: bool) -> None:
        super().__init__(why)
        self.retry = retry


class Client:
    """A control connection: statistics, controls, waiting for scans.

    One request at a time, whatever thread calls.  A request that gets no
    reply (it timed out, or was interrupted: Ctrl-C, an exception from a
    signal handler) ends its connection, since its late reply would answer
    the next request; the next request connects again.  So does the first
    request of a forked child, which must not share its parent's socket.
    """

    def __init__(self, socket_path: str | None = None, *, domain: str | None = None,
                 timeout: float = 10.0) -> None:
        self.socket_path: str = resolve_socket_path(socket_path, domain)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._closed = False            # by close(): no more requests
        self._pid = os.getpid()
        self._connect()

    def _connect(self) -> None:
        timeout = self.timeout
        # A coordinator at its connection cap closes a newcomer it has no place
        # for; places free up within a second (connections that never say
        # hello are evicted), so a connection closed before its welcome is
        # tried again, for up to RETRY_SECONDS.  No coordinator at all fails at once.
        deadline = time.monotonic() + min(timeout, RETRY_SECONDS)
        delay = 0.01
        while True:
            self._conn = protocol.connect(self.socket_path, timeout=timeout)
            try:
                try:
                    self._conn.send({"t": "hello", "v": protocol.PROTOCOL_VERSION,
                                     "role": "client", "pid": os.getpid()})
                except (ConnectionResetError, BrokenPipeError):
                    pass    # closed at once: its refusal, if it sent one, is read below
                self._expect("welcome", timeout)
                return
            except _Refused as e:
                # It said why: not allowed fails at once, no place now is tried again.
                self._conn.close()
                if not e.retry or time.monotonic() + delay >= deadline:
                    raise PeerRejectedError(
                        f"coordinator at {self.socket_path} refused the connection: {e}") from None
            except (CoordinatorUnavailableError, ConnectionResetError, BrokenPipeError) as e:
                self._conn.close()
                if time.monotonic() + delay >= deadline or "did not answer" in str(e):
                    raise
            except BaseException:
                self._conn.close()
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _expect(self, t: str, timeout: float | None) -> dict[str, Any]:
        try:
            got = self._conn.recv(timeout=timeout)
        except TimeoutError as e:
            raise CoordinatorUnavailableError(
                f"coordinator at {self.socket_path} did not answer within {timeout} s") from e
        if got is None:
            raise CoordinatorUnavailableError(f"coordinator at {self.socket_path} closed the connection")
        msg, fds = got
        _shm.close_fds(fds)
        if msg["t"] == "refused" and t == "welcome":
            raise _Refused(msg["msg"], msg["retry"])
        if msg["t"] != t:
            raise ProtocolError(f"expected {t}, got {msg['t']}")
        return msg

    def _call(self, msg: dict[str, Any], timeout: float | None = None) -> Any:
        if os.getpid() != self._pid:
            # A forked child shares the parent's socket: replies would go to
            # whichever process reads first.  It gets its own connection (and
            # a lock no parent thread held at the fork).
            self._pid, self._lock = os.getpid(), threading.Lock()
            if not self._closed:
                self._conn.close()      # our copy only: the parent's stays open
        with self._lock:
            if self._closed:
                raise CoordinatorUnavailableError(
                    f"this connection to the coordinator at {self.socket_path} was closed")
            if self._conn.closed:
                self._connect()     # the last request went unanswered (below)
            wait = self.timeout if timeout is None else timeout
            try:
                try:
                    try:
                        self._conn.send(msg, timeout=wait)
                    except (BrokenPipeError, ConnectionResetError):
                        # Not delivered: the coordinator this connection went
                        # to is gone (it restarted, say).  Once more, on a new one.
                        self._conn.close()
                        self._connect()
                        self._conn.send(msg, timeout=wait)
                except TimeoutError as e:
                    raise CoordinatorUnavailableError(
                        f"coordinator at {self.socket_path} took no request for {wait} s") from e
                r = self._expect("reply", wait)
            except BaseException:
                # No reply read (timed out, interrupted, the peer gone): one
                # may still come, and would be taken as the answer to the
                # next request.  This connection is done.
                self._conn.close()
                raise
        if not r["ok"]:
            raise ControlError(r["error"])
        return r["data"]

    def stats(self) -> Stats:
        """Every control and statistic, plus per-worker ``ksm_stat`` lines
        (:class:`shmdedup.Stats` names each key)."""
        stats: Stats = self._call({"t": "stats"})   # the coordinator's stats()
        return stats

    def set(self, name: str, value: int) -> None:
        """Set a control (run=2 returns once everything is unmerged)."""
        self._call({"t": "set", "name": name, "value": value}, timeout=max(self.timeout, 600))

    def wait_full_scans(self, n: int = 1, timeout: float = 60.0) -> int:
        """Wait until full_scans has advanced by n from now, and every merge
        and unmerge those scans asked workers for has been answered, so that
        ``stats()`` right after counts them; returns full_scans.

        Regions this process advised count: the wait starts once its agent
        has sent them to this coordinator (at most ``timeout`` for that too).
        A page merges at its first visit (at its second unchanged one if it
        changed since the visit before: the two-visit rule), and only a full
        scan that starts after advising is sure to visit every page, so 2
        full scans after advising merge what is there to merge.
        """
        from shmdedup.worker import agent
        agent.wait_advice_sent(self.socket_path, min(timeout, 10.0))
        target = self.stats()["full_scans"] + n
        full_scans: int = self._call({"t": "wait", "full_scans": target, "timeout": timeout},
                                     timeout=timeout + 5)
        return full_scans

    def close(self) -> None:
        self._closed = True
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client"]
