"""The coordinator's admission: accept, vet, evict, and the hello deadline.

``Admission`` is the part of the server (``server.py``) that lets peers in,
up to their hello.  It runs in the coordinator's single thread; the server
gives it the listener, the selector, the connections (``peers``, by fd), the
quotas and controls, and the ``Outbox`` it drops peers through.  No peer can
stop that thread:

* **Admission.**  At accept: ``SO_PEERCRED`` against the allow-lists, then the
  quotas per uid (``quotas.py``).  When ``max_connections`` or the descriptor
  budget is full, a newcomer takes the place of the oldest connection that has
  still not said hello after ``EVICT_AFTER`` seconds (one of its own uid's; any
  uid's for the coordinator's own); failing that, a connection of the
  coordinator's uid is admitted past the cap to be a client only
  (``quotas.CLIENT_RESERVE`` of them), so ``shmdedup stats`` always gets in.
* **Hello deadline.**  A connection that has not said hello ``hello_timeout``
  seconds after accept is closed: silent connections hold no slot for long.
  Its hello makes it a worker (which gets a read-only descriptor of the
  stable segment in the welcome) or a client.
* **Accept backs off.**  EMFILE, ENFILE, ENOBUFS or ENOMEM at accept takes the
  listener out of the selector for a while (doubling up to
  ``ACCEPT_BACKOFF_MAX``) instead of spinning on a socket that stays readable.
* **Log lines about peers are rate limited** per kind (``security.LogLimiter``).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections import deque
from typing import Any, Callable

from shmdedup import _shm, protocol
from shmdedup.errors import PeerRejectedError, ProtocolError
from shmdedup.pages import PAGE_SIZE
from shmdedup.coordinator.activity import Activity
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Peer, peer_pidfd, process_key
from shmdedup.coordinator.quotas import CLIENT_RESERVE, Quotas
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.security import LogLimiter, TokenBucket

HELLO_TIMEOUT = 5.0             # s from accept to hello
EVICT_AFTER = 1.0               # s without hello before a newcomer may take the place
ACCEPT_BATCH = 64               # connections accepted per wakeup
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _refuse(conn: protocol.Connection, why: str, retry: bool) -> None:
    """Tell a connection that is not admitted why (one small message, never
    waited for: a peer that does not read loses it), and close it."""
    try:
        conn.try_send(protocol.encode({"t": "refused", "msg": why[:1000], "retry": retry}))
        # What it sent already (its hello) is read and dropped: closing a
        # socket with unread messages resets the peer's, which would then
        # report "connection reset" before it reads ours.
        for _ in range(4):
            got = conn.recv(timeout=0)
            if got is None:
                break
            _shm.close_fds(got[1])
    except (OSError, TimeoutError, ProtocolError):
        pass    # nothing more waiting, gone already, or junk: the close says the rest
    conn.close()


class Admission:
    """Accepting and admitting peers, up to their hello.

    ``drop_peer(peer, why)`` is the server's, called at once when a newcomer
    takes the place of a silent connection; the ``scanner``'s stable
    segment gives each worker's welcome its read-only descriptor."""

    def __init__(self, listener: socket.socket, sel: selectors.BaseSelector,
                 peers: dict[int, Peer], controls: dict[str, int], quotas: Quotas,
                 allow_uids: set[int] | None, allow_gids: set[int] | None,
                 outbox: Outbox, warn: LogLimiter, activity: Activity, scanner: Scanner,
                 drop_peer: Callable[[Peer, str], None]) -> None:
        self.listener = listener
        self.sel = sel
        self.peers = peers
        self.controls = controls
        self.quotas = quotas
        self.allow_uids = allow_uids
        self.allow_gids = allow_gids
        self.outbox = outbox
        self.warn = warn
        self.activity = activity
        self.scanner = scanner
        self._drop_peer = drop_peer
        self.hello_timeout = HELLO_TIMEOUT
        self._pending: deque[Peer] = deque()      # in accept order, until hello or drop
        self._accept_backoff = ACCEPT_BACKOFF_MIN
        self.paused_until: float | None = None    # accept is paused (out of descriptors)
        self._extra = 0                           # client_only peers (past max_connections)

    # -- accepting -----------------------------------------------------------

    def accept(self) -> None:
        """The listener is readable: take what connections wait."""
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
            if self.paused_until is not None:
                return
            self._accept_backoff = ACCEPT_BACKOFF_MIN

    def _pause_accept(self, e: OSError) -> None:
        """Out of descriptors (or memory): the listener stays readable, so stop
        watching it for a while rather than spin."""
        delay = self._accept_backoff
        self._accept_backoff = min(delay * 2, ACCEPT_BACKOFF_MAX)
        self.paused_until = time.monotonic() + delay
        self.sel.unregister(self.listener)
        self.warn.warning("accept", "cannot take connections: %s; not accepting for %.2f s", e, delay)

    def resume(self, now: float) -> None:
        """Watch the listener again once a pause is over."""
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, None)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = protocol.Connection(sock)
        try:
            pid, uid, _ = protocol.check_peer(conn, self.allow_uids, self.allow_gids)
        except PeerRejectedError as e:
            self.warn.warning("rejected", "rejected a connection: %s", e)
            _refuse(conn, f"uid {conn.peer[1]} is not allowed by this coordinator "
                          f"(see --allow-uid / --allow-gid)", retry=False)
            return
        except OSError as e:
            self.warn.warning("rejected", "rejected a connection: %s", e)
            conn.close()
            return
        why = self.quotas.connection_refusal(uid)
        client_only = False
        if why is None and self._full():
            self.evict_silent(uid)
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
            _refuse(conn, why, retry=True)
            return
        try:
            # From the connection (SO_PEERPIDFD): any pid namespace (pid 0 here).
            pidfd = peer_pidfd(conn, pid)
        except OSError as e:
            if e.errno in _SHORTAGE:    # no pidfd, no ghost: refuse rather than admit blind
                self.warn.warning("rejected", "rejected pid %d uid %d: no descriptor left "
                                              "for its pidfd", pid, uid)
                _refuse(conn, "the coordinator is out of descriptors", retry=True)
                if self.paused_until is None:
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

    def evict_silent(self, uid: int) -> bool:
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

    # -- hello deadline -----------------------------------------------------

    def expire_hello(self, now: float) -> float | None:
        """Drop connections past their hello deadline; the next deadline."""
        q = self._pending
        while q:
            peer = q[0]
            if peer.role is not None or peer.conn.closed:
                q.popleft()
            elif now - peer.accepted_at >= self.hello_timeout:
                q.popleft()
                self.outbox.drop(peer, f"no hello within {self.hello_timeout:g} s")
            else:
                return peer.accepted_at + self.hello_timeout
        return None

    # -- hello ----------------------------------------------------------------

    def on_hello(self, peer: Peer, msg: dict[str, Any]) -> None:
        """The first message of every connection: it says what the peer is."""
        if msg["t"] != "hello":
            raise ProtocolError(f"expected hello, got {msg['t']}")
        if peer.client_only and msg["role"] != "client":
            self.outbox.drop(peer, f"max_connections ({self.controls['max_connections']}) "
                             f"reached: only a client may connect past it")
            return
        peer.role = msg["role"]
        self.activity.connected(peer)
        if peer.role == "worker":
            ro = self.scanner.stable.readonly_fd()
            try:
                self.outbox.send(peer, {"t": "welcome", "v": protocol.PROTOCOL_VERSION,
                                        "page_size": PAGE_SIZE}, [ro])
            finally:
                os.close(ro)
        else:
            self.outbox.send(peer, {"t": "welcome", "v": protocol.PROTOCOL_VERSION,
                                    "page_size": PAGE_SIZE})

    def left(self, peer: Peer) -> None:
        """The server forgot this connection."""
        self._extra -= peer.client_only


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
