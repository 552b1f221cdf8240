"""The coordinator's connections: admission, hello deadlines, sends that never block.

``ConnectionsMixin`` is one part of ``CoordinatorServer`` (``server.py``),
which inherits it; it runs in the coordinator's single thread and shares its
state (``peers``, ``sel``, ``listener``, ``controls``, ``quotas``) and its
``_drop_peer``.  No peer can stop that thread:

* **Admission.**  At accept: ``SO_PEERCRED`` against the allow-lists, then the
  quotas per uid (``quotas.py``).  When ``max_connections`` or the descriptor
  budget is full, a newcomer takes the place of the oldest connection that has
  still not said hello after ``EVICT_AFTER`` seconds (one of its own uid's; any
  uid's for the coordinator's own); failing that, a connection of the
  coordinator's uid is admitted past the cap to be a client only
  (``quotas.CLIENT_RESERVE`` of them), so ``shmdedup stats`` always gets in.
* **Hello deadline.**  A connection that has not said hello ``hello_timeout``
  seconds after accept is closed: silent connections hold no slot for long.
* **Accept backs off.**  EMFILE, ENFILE, ENOBUFS or ENOMEM at accept takes the
  listener out of the selector for a while (doubling up to
  ``ACCEPT_BACKOFF_MAX``) instead of spinning on a socket that stays readable.
* **Sends never block.**  Peer sockets are non-blocking.  A message the socket
  cannot take now waits, encoded and with its fds, in the peer's ``SendQueue``
  and goes out in order when the socket turns writable; SEQPACKET sends a
  message whole or not at all, so framing and SCM_RIGHTS stay intact.  A peer
  whose queue would pass ``OUTBOX_MAX_MESSAGES`` or ``OUTBOX_MAX_BYTES`` has
  stopped reading: it is dropped, never waited for.  Every request still gets
  exactly one reply, in order, while its connection lives.
* **Log lines about peers are rate limited** per kind (``security.LogLimiter``).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import time
from collections import deque
from typing import Any, Callable

from shmdedup import protocol
from shmdedup._shm import close_fds
from shmdedup.errors import PeerRejectedError, ProtocolError
from shmdedup.coordinator.peers import Peer, peer_pidfd, process_key
from shmdedup.coordinator.quotas import CLIENT_RESERVE, Quotas
from shmdedup.coordinator.security import LogLimiter, TokenBucket

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

HELLO_TIMEOUT = 5.0             # s from accept to hello
EVICT_AFTER = 1.0               # s without hello before a newcomer may take the place
ACCEPT_BATCH = 64               # connections accepted per wakeup
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
OUTBOX_MAX_MESSAGES = 1024      # per peer: past either, the peer has stopped reading
OUTBOX_MAX_BYTES = 8 << 20
_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ConnectionsMixin:
    """Accepting, admitting, sending to and scheduling the drop of peers."""

    # Set by CoordinatorServer.__init__ (see _init_connections).
    controls: dict[str, int]
    peers: dict[int, Peer]
    sel: selectors.BaseSelector
    listener: socket.socket
    quotas: Quotas
    allow_uids: set[int] | None
    allow_gids: set[int] | None
    _drop: list[tuple[Peer, str]]
    _drop_peer: Callable[..., None]

    def _init_connections(self) -> None:
        self.hello_timeout = HELLO_TIMEOUT
        self._pending: deque[Peer] = deque()      # in accept order, until hello or drop
        self._accept_backoff = ACCEPT_BACKOFF_MIN
        self._accept_paused_until: float | None = None
        self._extra = 0                           # client_only peers (past max_connections)
        self.warn: LogLimiter = LogLimiter(log)

    # -- accepting -----------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _SHORTAGE:
                    self._pause_accept(e)
                else:
                    self.warn.warning("accept", "accept failed: %s", e)
                return
            self._admit(sock)
            if self._accept_paused_until is not None:
                return
            self._accept_backoff = ACCEPT_BACKOFF_MIN

    def _pause_accept(self, e: OSError) -> None:
        """Out of descriptors (or memory): the listener stays readable, so stop
        watching it for a while rather than spin."""
        delay = self._accept_backoff
        self._accept_backoff = min(delay * 2, ACCEPT_BACKOFF_MAX)
        self._accept_paused_until = time.monotonic() + delay
        self.sel.unregister(self.listener)
        self.warn.warning("accept", "cannot take connections: %s; not accepting for %.2f s", e, delay)

    def _resume_accept(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, None)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = protocol.Connection(sock)
        try:
            pid, uid, _ = protocol.check_peer(conn, self.allow_uids, self.allow_gids)
        except (PeerRejectedError, OSError) as e:
            self.warn.warning("rejected", "rejected a connection: %s", e)
            conn.close()
            return
        why = self.quotas.connection_refusal(uid)
        client_only = False
        if why is None and self._full():
            self._evict_silent(uid)
            if self._full():
                if uid == self.quotas.owner and self._extra < CLIENT_RESERVE:
                    client_only = True
                elif len(self.peers) - self._extra >= self.controls["max_connections"]:
                    why = f"{len(self.peers)} connections already (max_connections)"
                else:
                    why = (f"the coordinator holds {self.quotas.total.fds} descriptors for its "
                           f"peers (max_fds {self.quotas.max_fds()})")
        if why is not None:
            self.warn.warning("rejected", "rejected pid %d uid %d: %s", pid, uid, why)
            conn.close()
            return
        try:
            # From the connection (SO_PEERPIDFD): any pid namespace (pid 0 here).
            pidfd = peer_pidfd(conn, pid)
        except OSError as e:
            if e.errno in _SHORTAGE:    # no pidfd, no ghost: refuse rather than admit blind
                self.warn.warning("rejected", "rejected pid %d uid %d: no descriptor left "
                                              "for its pidfd", pid, uid)
                conn.close()
                if self._accept_paused_until is None:
                    self._pause_accept(e)
                return
            pidfd = None    # gone already (ESRCH), or no pidfd here
        peer = Peer(conn, pid, uid, bucket=TokenBucket(self.controls["max_msgs_burst"]),
                    pidfd=pidfd, key=process_key(pid, pidfd), accepted_at=time.monotonic(),
                    client_only=client_only)
        self.peers[conn.fileno()] = peer
        self._extra += client_only
        self.quotas.charge(uid, connections=1, fds=1 + (pidfd is not None))
        self._pending.append(peer)
        self.sel.register(conn.fileno(), selectors.EVENT_READ, peer)

    def _full(self) -> bool:
        return (len(self.peers) - self._extra >= self.controls["max_connections"]
                or self.quotas.fds_full(2))

    def _evict_silent(self, uid: int) -> bool:
        """Drop the oldest connection still without hello after EVICT_AFTER
        (of *uid*, or of anyone's if *uid* is the coordinator's)."""
        now = time.monotonic()
        for peer in self._pending:
            if now - peer.accepted_at < EVICT_AFTER:
                break
            if peer.role is None and not peer.conn.closed and (
                    uid == self.quotas.owner or peer.uid == uid):
                self._drop_peer(peer, f"no hello after {now - peer.accepted_at:.1f} s, "
                                      f"and a new connection needs the place")
                return True
        return False

    # -- hello deadlines -----------------------------------------------------

    def _expire_hello(self, now: float) -> float | None:
        """Drop connections past their hello deadline; the next deadline."""
        q = self._pending
        while q:
            peer = q[0]
            if peer.role is not None or peer.conn.closed:
                q.popleft()
            elif now - peer.accepted_at >= self.hello_timeout:
                q.popleft()
                self._schedule_drop(peer, f"no hello within {self.hello_timeout:g} s")
            else:
                return peer.accepted_at + self.hello_timeout
        return None

    # -- sending -------------------------------------------------------------

    def _send(self, peer: Peer, msg: dict[str, Any], fds: list[int] | None = None) -> bool:
        """Send now, or queue behind what is already waiting; never block.
        The caller keeps its *fds* (a queued message carries duplicates)."""
        if peer.conn.closed:
            return False
        fds = fds or []
        box = peer.unsent
        try:
            data = protocol.encode(msg, len(fds))
            if not box and peer.conn.try_send(data, fds):
                return True
        except (BrokenPipeError, ConnectionResetError):
            self._schedule_drop(peer, "")   # it went away (a worker exiting): nothing to warn of
            return False
        except (OSError, ProtocolError) as e:
            self._schedule_drop(peer, f"send failed: {e}")
            return False
        if len(box) >= OUTBOX_MAX_MESSAGES or box.bytes + len(data) > OUTBOX_MAX_BYTES:
            self._schedule_drop(peer, f"stopped reading: {len(box)} messages ({box.bytes} bytes) "
                                      f"wait for it")
            return False
        own: list[int] = []
        try:
            for fd in fds:
                own.append(os.dup(fd))
        except OSError as e:
            close_fds(own)
            self._schedule_drop(peer, f"cannot queue a message: {e}")
            return False
        if not box:
            self.sel.modify(peer.conn.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
        box.push(data, own)
        self.quotas.charge(peer.uid, fds=len(own))
        return True

    def _writable(self, peer: Peer) -> None:
        """The peer's socket takes messages again: send what waits, in order."""
        box = peer.unsent
        if peer.conn.closed:
            return
        try:
            while box:
                data, fds = box.queue[0]
                if not peer.conn.try_send(data, fds):
                    return
                box.pop()
                self.quotas.charge(peer.uid, fds=-len(fds))
        except (BrokenPipeError, ConnectionResetError):
            self._schedule_drop(peer, "")
            return
        except OSError as e:
            self._schedule_drop(peer, f"send failed: {e}")
            return
        self.sel.modify(peer.conn.fileno(), selectors.EVENT_READ, peer)

    def _reply(self, peer: Peer, ok: bool, data: Any = None, error: str = "") -> None:
        self._send(peer, {"t": "reply", "ok": ok, "data": data, "error": error[:1000]})

    # -- dropping ------------------------------------------------------------

    def _schedule_drop(self, peer: Peer, why: str) -> None:
        if all(p is not peer for p, _ in self._drop):
            self._drop.append((peer, why))

    def _flush_drops(self) -> None:
        while self._drop:
            peer, why = self._drop.pop()
            self._drop_peer(peer, why)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
