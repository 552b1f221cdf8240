"""The coordinator: the ksmd of a domain.

One process (or one thread of an application, the embedded default) listens
on the domain's Unix socket.  Workers' agents connect, say hello, receive a
read-only descriptor of the stable segment, and register their regions (the
backing and state-byte objects travel as SCM_RIGHTS descriptors).  The
coordinator then runs the scanner (``scanner.py``) in batches of
``pages_to_scan`` pages every ``sleep_millisecs``, sends merge batches to the
agents and settles their replies.  Clients (the CLI, ``Client``) ask for
statistics, set controls, and wait for ``full_scans`` to advance.

Everything runs in one thread around a selector: no locks, and with nothing
to scan (``run`` != 1 or nothing advised) it blocks in select without a
timeout, using no CPU (seed patch 5, "keep quiet while list empty").

Failure semantics (DESIGN invariants 6 and 7): a slot is freed only when no
live process can map it.  A worker's slots are released when its process has
exited (a pidfd per connection tells); one that loses its connection while
alive keeps them, held by a ``Ghost`` (``workers.py``), until it exits, and
takes them back if it registers the same region again.  Stopping the
coordinator frees nothing:
the stable object outlives it through the workers' mappings, as it does when
the coordinator is killed.

Every message is untrusted: ``protocol.decode`` validates types and ranges,
and the part that handles it checks the rest (message order, role, ownership of region ids
and request ids, sizes against registered regions).  A bad message closes
that connection with a logged reason; everyone else keeps being served.
The objects a worker registers are as untrusted as its messages: if scanning
one of its regions fails (the scanner treats every object as one the worker
may truncate, grow or punch at any moment; OSError, MemoryError, or a bug of
ours), that worker is dropped with the reason logged, never the coordinator.

Pacing: a batch ends after ``MAX_BATCH_CPU`` seconds of CPU whatever
``pages_to_scan`` says, so the loop answers everyone within about that; and
with the scan-time advisor on, the next batch waits until the scan's CPU is
within ``advisor_max_cpu``, whatever peers register or advise (``pacing.py``).

No peer can stop the loop or lock others out (``admission.py``,
``outbox.py``, ``quotas.py``): sends never block (a peer that stops reading
is dropped when its queue is full), connections must say hello within a
deadline, accept backs off when descriptors run out, and what each uid may hold (connections,
regions, pages, descriptors) is capped, with room always kept for the
coordinator's own uid.

Layout: ``CoordinatorServer`` holds the event loop and owns its parts, each
a plain object told in its constructor what it works with:

* ``Outbox`` (``outbox.py``): sends that never block, one reply per client
  request in order, drops; every part talks to peers through it;
* ``Inbox`` (``inbox.py``): reading messages and handing them to the parts;
* ``Admission`` (``admission.py``): accept, admission, hello deadlines, hello;
* ``RequestTracker`` (``inflight.py``): merge and unmerge requests in flight;
* ``Pacing`` (``pacing.py``): when the next batch runs, full scans' costs;
* ``Workers`` (``workers.py``): regions, and the ghosts of workers gone;
* ``Replies`` (``replies.py``), ``MergeNow`` (``mergenow.py``),
  ``UnmergeAll`` (``unmergeall.py``: run=2), ``Waits`` (``waits.py``: waits
  for full_scans) and ``ControlSurface`` (``surface.py``: controls, stats);
* the ``Scanner`` (``scan/``), the algorithm.

Messages go to the parts through one table per role, built here
(``worker_messages``, ``client_messages``: message type -> a bound method of
the part that handles it), by the ``Inbox`` (``inbox.py``: reads, rate
limits, holds a client's requests while one of them waits); a peer's first
message, its hello, goes to ``Admission``.  This module keeps the loop and
what crosses parts: dropping a connection (every part forgets the peer).

The listening socket is bound here, or inherited from a service manager
(``activation.py``: systemd socket activation).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Mapping
from typing import Any

from shmdedup import protocol
from shmdedup._shm import close_fds
from shmdedup.coordinator import activation
from shmdedup.controls import CONTROLS, check_control  # noqa: F401  (re-exported)
from shmdedup.coordinator.activity import Activity
from shmdedup.coordinator.admission import Admission
from shmdedup.coordinator.inbox import Handler, Inbox
from shmdedup.coordinator.inflight import RequestTracker
from shmdedup.coordinator.mergenow import MergeNow
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.pacing import Pacing
from shmdedup.coordinator.peers import Ghost, Peer, _open_pidfd
from shmdedup.coordinator.quotas import CLIENT_RESERVE, FD_RESERVE, Quotas, descriptor_budget
from shmdedup.coordinator.replies import Replies
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.security import LogLimiter
from shmdedup.coordinator.surface import ControlSurface
from shmdedup.coordinator.unmergeall import UnmergeAll
from shmdedup.coordinator.waits import Waits
from shmdedup.coordinator.workers import Workers

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

MAX_BATCH_CPU = 0.05            # s of this thread's CPU one batch may use


class CoordinatorServer:
    """The coordinator's event loop.  ``serve()`` runs until ``stop()``."""

    def __init__(self, socket_path: str, controls: Mapping[str, object] | None = None,
                 allow_uids: set[int] | None = None, allow_gids: set[int] | None = None,
                 socket_mode: int = 0o600, metrics_port: int | None = None,
                 parent_pid: int | None = None) -> None:
        self.controls: dict[str, int] = {k: v[0] for k, v in CONTROLS.items()}
        for k, v in (controls or {}).items():
            self.controls[k] = check_control(k, v)
        if "pages_to_scan" in (controls or {}) and "advisor_mode" not in (controls or {}):
            self.controls["advisor_mode"] = 0   # explicit pacing wins
        self.socket_path = socket_path
        # Socket activation (activation.py): the service manager's socket, kept
        # on our way out; else our own, bound here and unlinked at shutdown.
        inherited = activation.inherited_listener(socket_path)
        self.socket_activated: bool = inherited is not None
        self.listener: socket.socket = inherited or protocol.listen(socket_path, socket_mode)
        self.listener.setblocking(False)
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        # A coordinator process started by an application (Coordinator(process=
        # True)) ends with it, even if it is killed: its pidfd turns readable.
        self._parent: tuple[int, int] | None = None
        if parent_pid is not None:
            pidfd = _open_pidfd(parent_pid)
            if pidfd is None:
                raise OSError(f"parent process {parent_pid} is gone")
            self._parent = (parent_pid, pidfd)
            self.sel.register(pidfd, selectors.EVENT_READ, "parent")
        self.peers: dict[int, Peer] = {}     # by the connection's fd
        self.warn: LogLimiter = LogLimiter(log)
        self.activity: Activity = Activity()   # what -v logs (activity.py)
        # Descriptors for peers: the budget is measured below, once ours are open.
        self.quotas: Quotas = Quotas(self.controls, os.getuid(), 0)

        # The parts, each given what it works with.
        self.outbox: Outbox = Outbox(self.sel, self.quotas, self._drop_peer)
        self.requests: RequestTracker = RequestTracker(self.peers, self.outbox)
        self.scanner: Scanner = Scanner(self.requests.send_merge, self.requests.send_unmerge)
        self.pacing: Pacing = Pacing(self.controls, self.scanner, self.activity)
        self.admission: Admission = Admission(
            self.listener, self.sel, self.peers, self.controls, self.quotas, allow_uids, allow_gids,
            self.outbox, self.warn, self.activity, self.scanner, self._drop_peer)
        self.waits: Waits = Waits(self.scanner, self.requests, self.outbox, self.pacing.unquiet)
        self.unmerge_all: UnmergeAll = UnmergeAll(self.peers, self.controls, self.scanner,
                                                  self.requests, self.outbox)
        self.merge_now: MergeNow = MergeNow(self.controls, self.scanner, self.requests,
                                            self.unmerge_all, self.outbox)
        self.replies: Replies = Replies(self.scanner, self.requests, self.merge_now,
                                        self.unmerge_all)
        self.workers: Workers = Workers(self.sel, self.controls, self.quotas, self.scanner,
                                        self.outbox, self.warn, self.admission.evict_silent,
                                        self.pacing.wake)

        self._stopping = False
        self.batches: int = 0
        # Optional Prometheus endpoint (metrics.py): it only reads snapshots
        # this loop publishes, never the scanner's arrays.
        self.metrics: Any = None
        self.metrics_port: int | None = None
        if metrics_port is not None:
            from shmdedup.coordinator.metrics import MetricsServer
            try:
                self.metrics = MetricsServer(metrics_port, self._wake_w)
            except BaseException:
                self._shutdown()
                raise
            self.metrics_port = self.metrics.port
        self.surface: ControlSurface = ControlSurface(
            self.controls, self.peers, self.scanner, self.quotas, self.merge_now, self.unmerge_all,
            self.outbox, self.activity, self.pacing.wake, socket_path, self.metrics_port)
        self.surface.apply_scan_controls()
        # Descriptors for peers: what RLIMIT_NOFILE leaves now (the metrics
        # server is up, an embedding application's own fds are open) minus a
        # reserve for the loop, the clients admitted past max_connections and
        # the metrics server's connections.
        reserve = FD_RESERVE + 3 * CLIENT_RESERVE + (self.metrics.max_connections
                                                     if self.metrics is not None else 0)
        self.quotas.auto_fds = descriptor_budget(reserve)

        # Message handlers by message type, for each role: each a method of
        # the part that owns what the message is about.
        worker_messages: dict[str, Handler] = {
            "register": self.workers.on_register,
            "advise": self.workers.on_advise,
            "unregister": self.workers.on_unregister,
            "merged": self.replies.on_merged,
            "unmerged": self.replies.on_unmerged,
            "merge_now": self.merge_now.on_merge_now,
        }
        client_messages: dict[str, Handler] = {
            "stats": self._on_stats,
            "set": self.surface.on_set,
            "wait": self.waits.on_wait,
        }
        self.inbox: Inbox = Inbox(self.controls, self.outbox, self.admission,
                                  worker_messages, client_messages)

    def _on_stats(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        """A stats request counts what workers did before it: the replies to
        merge_now calls already answered (a worker that asks for its
        statistics after merge_now returned has sent them) are read first."""
        for worker in self.merge_now.unsettled(list(self.peers.values())):
            self.inbox.readable(worker)
        self.surface.on_stats(peer, msg, fds)

    # -- life cycle --------------------------------------------------------

    def stop(self) -> None:
        """Ask serve() to return (thread-safe)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve(self, wake_on_signals: bool = False) -> None:
        """Run the loop until stop().  ``wake_on_signals`` (a process of its
        own, main thread): every signal with a Python handler also writes to
        the loop's wakeup pipe from CPython's C-level handler
        (``signal.set_wakeup_fd``).  A Python handler runs only when the main
        thread next runs bytecode, which a loop asleep in its selector with
        no timeout does not do if the signal landed just before the selector
        call or on another thread: without the pipe, a SIGTERM could go
        unanswered for ever."""
        old_wakeup: int | None = None
        if wake_on_signals:
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            while not self._stopping:
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - a bug of ours must not take the domain down
                    self.warn.warning("internal", "internal error in the coordinator's loop:\n%s",
                                      traceback.format_exc())
                    self.pacing.pause(0.1)
        finally:
            if old_wakeup is not None:      # before the pipe closes
                signal.set_wakeup_fd(old_wakeup)
            self._shutdown()

    def _shutdown(self) -> None:
        # Workers outlive us with their merged pages: free no slot on the way
        # out (the stable object lives on through their mappings).
        if self.metrics is not None:
            self.metrics.close()
        for peer in list(self.peers.values()):
            self._drop_peer(peer, "", release=False)
        for ghost in self.workers.ghosts.values():
            os.close(ghost.pidfd)
        self.workers.ghosts.clear()
        self.sel.close()
        self.listener.close()
        if not self.socket_activated:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._parent is not None:
            os.close(self._parent[1])
        self.scanner.close()

    def _scanning(self) -> bool:
        return self.controls["run"] == 1 and not self.scanner.idle()

    def _step(self) -> None:
        now = time.monotonic()
        timeout: float | None = None
        if self._scanning():
            timeout = max(0.0, self.pacing.due() - now)
        deadlines = [*self.waits.deadlines(), *self.requests.deadlines()]
        hello = self.admission.expire_hello(now)
        deadlines += [d for d in (hello, self.admission.paused_until) if d is not None]
        if self.outbox.drops:
            deadlines.append(now)
        if deadlines:
            t = max(0.0, min(deadlines) - now)
            timeout = t if timeout is None else min(timeout, t)
        for key, mask in self.sel.select(timeout):
            if key.data == "parent":
                log.warning("parent process %s exited: stopping",
                            self._parent[0] if self._parent is not None else "?")
                self._stopping = True
            elif key.data == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            elif key.data is None:
                self.admission.accept()
            elif isinstance(key.data, Ghost):
                self.workers.bury(key.data)
            else:
                if mask & selectors.EVENT_WRITE:
                    self.outbox.writable(key.data)
                if mask & selectors.EVENT_READ:
                    self.inbox.readable(key.data)
            self.outbox.flush()
        now = time.monotonic()
        self.admission.resume(now)
        if not self._scanning():
            self.pacing.idle(now)
        elif now >= self.pacing.due():
            before = self.scanner.full_scans
            cpu0 = time.thread_time()
            try:
                visited = self.scanner.batch(self.pacing.batch_pages(now), MAX_BATCH_CPU)
            finally:
                # Workers whose regions could not be scanned go, with the reason.
                for worker, why in self.scanner.failed:
                    self.outbox.drop(worker, why)
                self.scanner.failed = []
            self.batches += 1
            self.outbox.flush()
            ended = self.scanner.full_scans != before
            self.pacing.batch_done(time.thread_time() - cpu0 + self.replies.take_scan_cpu(), visited, ended)
            if ended:
                self.pacing.full_scan_done()
        self.waits.settle()
        self.waits.expire(now)
        self.requests.expire(now)
        self.outbox.flush()
        self.inbox.resume_held()
        if self.metrics is not None:
            self.metrics.tick(self.surface.stats)

    def _drop_peer(self, peer: Peer, why: str, release: bool = True) -> None:
        """Forget a connection, and what every part holds for it.  A
        worker's slots are released now only if it has exited; if it may
        still be alive (it closed the connection, or sent something bad) they
        are held by a Ghost until it exits (``Workers.depart``).
        ``release=False`` (shutdown) releases nothing at all."""
        fd = peer.conn.fileno() if not peer.conn.closed else None
        if fd is None or self.peers.get(fd) is not peer:
            return
        if why:
            self.warn.warning("closing", "closing connection of pid %d uid %d (%s): %s", peer.pid,
                              peer.uid, peer.role or "no hello", why)
        else:
            self.activity.disconnected(peer, "", stopping=not release)
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        del self.peers[fd]
        self.admission.left(peer)
        peer.conn.close()
        for _, fds in peer.queued:
            close_fds(fds)
        peer.queued.clear()
        self.quotas.charge(peer.uid, connections=-1, fds=-1 - self.outbox.discard(peer))
        merges = [items for kind, items, _ in peer.requests.values() if kind == "merge"]
        self.unmerge_all.forget_requests(peer.requests)
        peer.requests.clear()
        self.workers.depart(peer, merges, release)
        self.waits.forget(peer)
        self.unmerge_all.client_gone(peer)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
