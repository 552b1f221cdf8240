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
alive keeps them, held by a ``Ghost``, until it exits, and takes them back if
it registers the same region again.  Stopping the coordinator frees nothing:
the stable object outlives it through the workers' mappings, as it does when
the coordinator is killed.

Every message is untrusted: ``protocol.decode`` validates types and ranges,
and this module checks the rest (message order, role, ownership of region ids
and request ids, sizes against registered regions).  A bad message closes
that connection with a logged reason; everyone else keeps being served.
The objects a worker registers are as untrusted as its messages: if scanning
one of its regions fails (the scanner treats every object as one the worker
may truncate, grow or punch at any moment; OSError, MemoryError, or a bug of
ours), that worker is dropped with the reason logged, never the coordinator.

Pacing: a batch ends after ``MAX_BATCH_CPU`` seconds of CPU whatever
``pages_to_scan`` says, so the loop answers everyone within about that; and
with the scan-time advisor on, the next batch waits until the scan's CPU is
within ``advisor_max_cpu``, whatever peers register or advise.

No peer can stop the loop or lock others out (``admission.py``,
``outbox.py``, ``quotas.py``): sends never block (a peer that stops reading is dropped when
its queue is full), connections must say hello within a deadline, accept
backs off when descriptors run out, and what each uid may hold (connections,
regions, pages, descriptors) is capped, with room always kept for the
coordinator's own uid.

Layout: this module holds the event loop, ghosts and the worker's region
messages.  ``CoordinatorServer`` owns ``Admission`` (``admission.py``:
accept, admission, hello deadlines) and the ``Outbox`` every part sends
through (``outbox.py``: sends, replies in order, drops), and inherits two
parts kept in their own modules: ``inflight.py`` (merge/unmerge requests in flight and their replies,
waits for full_scans, run=2) and ``surface.py`` (``set_control``, ``stats``
and the client messages that reach them).

The listening socket is bound here, or inherited from a service manager
(``activation.py``: systemd socket activation).
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shmdedup import _native, protocol
from shmdedup._shm import close_fds
from shmdedup.coordinator import activation
from shmdedup.coordinator.scan import advisor
from shmdedup.controls import CONTROLS, check_control  # noqa: F401  (re-exported)
from shmdedup.errors import DescriptorShortageError, ProtocolError
from shmdedup.pages import PAGE_SIZE
from shmdedup.coordinator.activity import Activity
from shmdedup.coordinator.admission import Admission
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import (
    Ghost, Peer, _exited, _open_pidfd, _same_file, peer_pidfd, process_key)
from shmdedup.coordinator.inflight import RequestsMixin
from shmdedup.coordinator.quotas import CLIENT_RESERVE, FD_RESERVE, Quotas, Usage, descriptor_budget
from shmdedup.coordinator.security import LogLimiter
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import RegionState
from shmdedup.coordinator.surface import ControlsMixin

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

MAX_QUEUED_REQUESTS = 64        # requests a client may send behind one still unanswered
MAX_BATCH_CPU = 0.05            # s of this thread's CPU one batch may use
TRIM_AFTER_SCAN = 0.1           # s: a full scan this long gives the heap back at its end
TRIM_INTERVAL = 1.0             # s: shorter ones, at most this often


class CoordinatorServer(RequestsMixin, ControlsMixin):
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
        self.scanner: Scanner = Scanner(self._send_merge, self._send_unmerge)
        self._apply_scanner_controls()
        self.peers: dict[int, Peer] = {}
        self._req = itertools.count(1)
        self._last_req = 0                   # id of the last request sent to a worker
        self._waiters: list[list[Any]] = []  # see inflight.py
        self._run2: dict[str, Any] | None = None
        self.ghosts: dict[int, Ghost] = {}   # by pidfd
        self._stopping = False
        self._next_batch = 0.0
        # advisor_max_cpu: no batch before this (see _pace), and when the
        # previous batch ended.
        self._cpu_gate = 0.0
        self._batch_end = time.monotonic()
        self.last_error = ""
        self.pages_merged_inline = 0     # pages merged by merge_now, ever
        self.merge_now_cpu_ns = 0        # CPU time spent on merge_now requests
        self.batches: int = 0
        self._scan_mark = (time.monotonic(), time.thread_time(), 0)
        self._last_trim = 0.0
        self.warn: LogLimiter = LogLimiter(log)
        self.activity: Activity = Activity()   # what -v logs (activity.py)
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
        # Descriptors for peers: what RLIMIT_NOFILE leaves now (the metrics
        # server is up, an embedding application's own fds are open) minus a
        # reserve for the loop, the clients admitted past max_connections and
        # the metrics server's connections.
        reserve = FD_RESERVE + 3 * CLIENT_RESERVE + (self.metrics.max_connections
                                                     if self.metrics is not None else 0)
        self.quotas: Quotas = Quotas(self.controls, os.getuid(), descriptor_budget(reserve))
        self.outbox: Outbox = Outbox(self.sel, self.quotas, self._drop_peer)
        self.admission: Admission = Admission(
            self.listener, self.sel, self.peers, self.controls, self.quotas, allow_uids, allow_gids,
            self.outbox, self.warn, self.activity, self.scanner, self._drop_peer)

    # -- life cycle --------------------------------------------------------

    def stop(self) -> None:
        """Ask serve() to return (thread-safe)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - a bug of ours must not take the domain down
                    self.warn.warning("internal", "internal error in the coordinator's loop:\n%s",
                                      traceback.format_exc())
                    self._next_batch = time.monotonic() + 0.1
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        # Workers outlive us with their merged pages: free no slot on the way
        # out (the stable object lives on through their mappings).
        if self.metrics is not None:
            self.metrics.close()
        for peer in list(self.peers.values()):
            self._drop_peer(peer, "", release=False)
        for ghost in self.ghosts.values():
            os.close(ghost.pidfd)
        self.ghosts.clear()
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
            timeout = max(0.0, max(self._next_batch, self._cpu_gate) - now)
        deadlines = [w[2] for w in self._waiters]
        deadlines += [r[2] for p in self.peers.values() for r in p.requests.values()]
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
                self._bury(key.data)
            else:
                if mask & selectors.EVENT_WRITE:
                    self.outbox.writable(key.data)
                if mask & selectors.EVENT_READ:
                    self._readable(key.data)
            self.outbox.flush()
        now = time.monotonic()
        self.admission.resume(now)
        if self._scanning() and now >= max(self._next_batch, self._cpu_gate):
            before = self.scanner.full_scans
            cpu0 = time.thread_time()
            try:
                self.scanner.batch(self.controls["pages_to_scan"], MAX_BATCH_CPU)
            finally:
                # Workers whose regions could not be scanned go, with the reason.
                for worker, why in self.scanner.failed:
                    self.outbox.drop(worker, why)
                self.scanner.failed = []
            self.batches += 1
            self.outbox.flush()
            self._next_batch = self._pace(time.thread_time() - cpu0)
            if self.scanner.full_scans != before:
                self._full_scan_done()
        self._settle_waiters()
        self._expire(now)
        self._resume_held()
        if self.metrics is not None:
            self.metrics.tick(self.stats)

    def _pace(self, cpu: float) -> float:
        """When the next batch may run: ``sleep_millisecs`` after this one,
        and with the advisor on, not before the ``cpu`` seconds this batch
        took are at most ``advisor_max_cpu`` percent of the time since the
        previous batch ended.  The cap is the scan's, as ksmd's is (messages
        are paced by their own limits): a peer's messages cannot starve the
        scan, nor its regions make the scan take more."""
        now = time.monotonic()
        t0, self._batch_end = self._batch_end, now
        if self.controls["advisor_mode"] == 1:
            cap = self.controls["advisor_max_cpu"] / 100
            self._cpu_gate = now + max(0.0, cpu / cap - (now - t0))
        else:
            self._cpu_gate = 0.0
        return now + self.controls["sleep_millisecs"] / 1000

    def _full_scan_done(self) -> None:
        """Feed the scan-time advisor what the last full scan cost; give the
        heap's free memory back."""
        t0, cpu0, pages0 = self._scan_mark
        now, cpu, pages = time.monotonic(), time.thread_time(), self.scanner.pages_scanned
        self._scan_mark = (now, cpu, pages)
        # A busy scan's numpy temporaries (MiBs per chunk) leave freed memory
        # in glibc's heap: give it back (~0.2 ms; ~5 us when there is none).
        # malloc_trim walks (and locks) every arena of the process, an
        # embedding application's too: after a long scan, else once a second.
        if now - t0 >= TRIM_AFTER_SCAN or now - self._last_trim >= TRIM_INTERVAL:
            _native.trim_heap()
            self._last_trim = now
        c = self.controls
        if c["advisor_mode"] == 1:
            c["pages_to_scan"] = advisor.advise(
                c["pages_to_scan"], advisor.ScanSample(now - t0, cpu - cpu0, pages - pages0),
                c["advisor_target_scan_time"], c["advisor_max_cpu"],
                c["advisor_min_pages_to_scan"], c["advisor_max_pages_to_scan"])
        self.activity.full_scan(self.scanner.full_scans, now - t0, self.scanner.stats,
                                c["pages_to_scan"], c["advisor_mode"] == 1)

    # -- connections -------------------------------------------------------

    def _readable(self, peer: Peer) -> None:
        """Take every message queued on this connection, in order.

        Draining the whole queue (not one message per wakeup) means that what
        a worker sent before a client's ``wait`` is settled before the next
        batch runs, so the scans that wait counts see that advice.  A client
        whose request awaits its reply is *held* (``_hold``): what it sends
        meanwhile is queued, and handled in order once that reply is sent."""
        while not peer.conn.closed and not self.outbox.dropping(peer):
            got = self._read_one(peer)
            if got is None:
                return
            msg, fds = got
            if peer.held:
                if len(peer.queued) >= MAX_QUEUED_REQUESTS:
                    close_fds(fds)
                    self.outbox.drop(peer, f"more than {MAX_QUEUED_REQUESTS} requests "
                                              f"outstanding (behind a wait or run=2)")
                    return
                peer.queued.append((msg, fds))
            else:
                self._handle(peer, msg, fds)

    def _read_one(self, peer: Peer) -> tuple[dict[str, Any], list[int]] | None:
        """One message off the connection, or None (nothing queued, or the
        connection is being dropped: the reason is scheduled)."""
        try:
            got = peer.conn.recv(timeout=0)
        except TimeoutError:
            return None
        except DescriptorShortageError as e:
            # Our shortage: a registration gets a clean refusal (_on_register
            # sees its fds missing); fds on any other message do not belong.
            if e.message is None or e.message["t"] != "register":
                self.outbox.drop(peer, f"bad message: fds attached to a "
                                          f"{e.message and e.message['t']} message")
                return None
            got = (e.message, [])
        except ProtocolError as e:
            self.outbox.drop(peer, f"bad message: {e}")
            return None
        except ConnectionResetError:
            self.outbox.drop(peer, "")  # a worker exiting with a message unread
            return None
        except OSError as e:
            self.outbox.drop(peer, f"receive failed: {e}")
            return None
        if got is None:
            self.outbox.drop(peer, "")
            return None
        msg, fds = got
        if peer.bucket and not peer.bucket.take(self.controls["max_msgs_per_sec"],
                                                self.controls["max_msgs_burst"]):
            close_fds(fds)
            self.outbox.drop(peer, f"more than {self.controls['max_msgs_per_sec']} messages/s "
                                      f"(burst {self.controls['max_msgs_burst']})")
            return None
        return msg, fds

    def _handle(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        try:
            self._dispatch(peer, msg, fds)
        except (ProtocolError, ValueError, OSError, MemoryError) as e:
            close_fds(fds)
            self.outbox.drop(peer, f"bad {msg.get('t')} message: {e}")
        except Exception as e:  # a bug of ours must not take the whole domain down
            log.error("internal error on a %s message of pid %d", msg.get("t"), peer.pid,
                      exc_info=True)
            close_fds(fds)
            self.outbox.drop(peer, f"internal error: {type(e).__name__}: {e}")

    # Until the other parts are composed too, they reach the outbox here.
    def _send(self, peer: Peer, msg: dict[str, Any], fds: list[int] | None = None) -> bool:
        return self.outbox.send(peer, msg, fds)

    def _reply(self, peer: Peer, ok: bool, data: Any = None, error: str = "") -> None:
        self.outbox.reply(peer, ok, data, error)

    def _schedule_drop(self, peer: Peer, why: str) -> None:
        self.outbox.drop(peer, why)

    def _flush_drops(self) -> None:
        self.outbox.flush()

    def _hold(self, peer: Peer) -> None:
        self.outbox.hold(peer)

    def _unhold(self, peer: Peer) -> None:
        self.outbox.unhold(peer)

    def _resume_held(self) -> None:
        while self.outbox.resumable:
            peer = self.outbox.resumable.pop(0)
            while peer.queued and not peer.held and not peer.conn.closed \
                    and not self.outbox.dropping(peer):
                msg, fds = peer.queued.pop(0)
                self._handle(peer, msg, fds)
            self.outbox.flush()

    def _drop_peer(self, peer: Peer, why: str, release: bool = True) -> None:
        """Forget a connection.  A worker's slots are released now only if it
        has exited; if it may still be alive (it closed the connection, or
        sent something bad) they are held by a Ghost until it exits.
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
        q = self.quotas
        q.charge(peer.uid, connections=-1, fds=-1 - peer.unsent.clear())
        held = _held(peer.regions.values())
        merges = [items for kind, items, _ in peer.requests.values() if kind == "merge"]
        if self._run2 is not None:
            self._run2["reqs"].difference_update(peer.requests)
        peer.requests.clear()
        if not release:
            for reg in peer.regions.values():
                reg.close()
            _uncharge(q, peer.uid, held)
        elif peer.pidfd is not None and (peer.regions or merges) and not _exited(peer.pidfd):
            # One ghost per process, however often it reconnects.  It keeps
            # its pidfd and regions' descriptors charged to its uid.
            ghost = self._ghost_of(peer)
            if ghost is None:
                ghost = Ghost(peer.pid, peer.pidfd, [], [], peer.uid, peer.key)
                peer.pidfd = None
                self.ghosts[ghost.pidfd] = ghost
                self.sel.register(ghost.pidfd, selectors.EVENT_READ, ghost)
            if ghost.uid != peer.uid:   # the process changed uid meanwhile
                _uncharge(q, peer.uid, held)
                q.charge(ghost.uid, regions=held.regions, pages=held.pages, fds=held.fds)
            ghost.regions += peer.regions.values()
            ghost.merges += merges
            for reg in peer.regions.values():
                self._settle(self.scanner.detach_region, reg, peer.pid)
        else:
            for items in merges:
                self._settle(self.scanner.forget_request, items, peer.pid)
            for reg in peer.regions.values():
                self._settle(self.scanner.remove_region, reg, peer.pid)
            _uncharge(q, peer.uid, held)
        if peer.pidfd is not None:
            os.close(peer.pidfd)
            peer.pidfd = None
            q.charge(peer.uid, fds=-1)
        peer.regions.clear()
        self._waiters = [w for w in self._waiters if w[0] is not peer]
        if self._run2 is not None:
            if self._run2.get("client") is peer:
                self._run2["client"] = None
            self._check_run2()

    def _ghost_of(self, peer: Peer) -> Ghost | None:
        """The ghost of the process behind this connection, if it has one."""
        if peer.key is None:
            return None
        return next((g for g in self.ghosts.values() if g.key == peer.key), None)

    def _bury(self, ghost: Ghost) -> None:
        """A ghost's process exited (its pidfd is readable): its mappings are
        gone, so its slots can be released."""
        self.sel.unregister(ghost.pidfd)
        del self.ghosts[ghost.pidfd]
        os.close(ghost.pidfd)
        self.quotas.charge(ghost.uid, fds=-1)
        _uncharge(self.quotas, ghost.uid, _held(ghost.regions))
        for items in ghost.merges:
            self._settle(self.scanner.forget_request, items, ghost.pid)
        for reg in ghost.regions:
            self._settle(self.scanner.release_detached, reg, ghost.pid)

    def _settle(self, fn: Any, arg: Any, pid: int) -> None:
        """Release what a departed worker held; should that fail (no memory),
        what it held stays held (a slot kept too long is safe, one freed too
        early is not) and everyone else goes on."""
        try:
            fn(arg)
        except Exception as e:  # noqa: BLE001
            log.error("pid %d: %s failed (%s: %s); what it held stays held", pid,
                      fn.__name__, type(e).__name__, e,
                      exc_info=not isinstance(e, (OSError, MemoryError)))
            if isinstance(arg, RegionState):
                self.scanner.abandon(arg)             # never scanned again
                if not arg.closed:
                    close_fds([arg.backing_fd, arg.meta_fd])
                    arg.closed = True

    # -- messages ----------------------------------------------------------

    def _dispatch(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        t = msg["t"]
        if peer.role is None:
            self.admission.on_hello(peer, msg)
            return
        handler = (_WORKER if peer.role == "worker" else _CLIENT).get(t)
        if handler is None:
            raise ProtocolError(f"a {peer.role} may not send {t}")
        handler(self, peer, msg, fds)

    def _on_register(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        rid, npages = msg["rid"], msg["npages"]
        if rid in peer.regions:
            raise ProtocolError(f"region {rid} is already registered")
        peer.refused.discard(rid)   # a refused region offered again (agent.py retries)
        if peer.pidfd is None:      # none at accept (descriptors short?): try again
            try:
                peer.pidfd = peer_pidfd(peer.conn, peer.pid)
            except OSError:
                peer.pidfd = None
            if peer.pidfd is not None:
                self.quotas.charge(peer.uid, fds=1)
                peer.key = process_key(peer.pid, peer.pidfd)
        # The same live process registering the same region again (it
        # reconnected) takes its slot references back from its ghost, and the
        # ghost's descriptors for it are given back at once.
        ghost = self._ghost_of(peer)
        again = None
        if ghost is not None and ghost.uid == peer.uid:
            again = next((g for g in ghost.regions if g.rid == rid and g.npages == npages), None)
        if self.quotas.fds_full(2):
            self.admission.evict_silent(peer.uid)   # a connection still without hello needs none
        cap = None
        if len(fds) < 2:
            cap = "the coordinator has no descriptors left for its objects"
        elif peer.pidfd is None:
            # Invariant 6: nothing would tell when its mappings are gone.
            cap = ("no pidfd for this process (cannot tell when it exits, so none of its "
                   "pages are merged)")
        elif len(peer.regions) >= self.controls["max_regions_per_worker"]:
            cap = f"{len(peer.regions)} regions already (max_regions_per_worker)"
        elif peer.pages + npages > self.controls["max_pages_per_worker"]:
            cap = (f"{peer.pages} + {npages} pages is over max_pages_per_worker "
                   f"{self.controls['max_pages_per_worker']}")
        else:
            cap = self.quotas.region_refusal(peer.uid, npages,
                                             _held([again]) if again is not None else None)
        if cap is not None:
            # A cap is not an offence: refuse this region, keep the worker.
            close_fds(fds)
            peer.refused.add(rid)
            self.warn.warning("refused", "refused region %d of pid %d: %s", rid, peer.pid, cap)
            self.outbox.reply(peer, False, rid, f"register {rid}: {cap}")
            return
        reg = RegionState.open(peer, rid, npages, fds[0], fds[1])
        peer.regions[rid] = reg
        peer.pages += npages
        self.quotas.charge(peer.uid, regions=1, pages=npages, fds=2)
        self.scanner.add_region(reg)
        if ghost is not None and not _exited(ghost.pidfd):
            for old in ghost.regions:
                if old.rid == rid and old.npages == npages and _same_file(old.backing_fd, reg.backing_fd):
                    ghost.regions.remove(old)
                    self.scanner.reattach_region(reg, old)   # closes old's descriptors
                    _uncharge(self.quotas, ghost.uid, _held([old]))
                    break
            if not ghost.regions and not ghost.merges:
                self._bury(ghost)

    def _region(self, peer: Peer, rid: int) -> RegionState:
        reg = peer.regions.get(rid)
        if reg is None:
            raise ProtocolError(f"region {rid} is not registered by this worker")
        return reg

    def _on_advise(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        if msg["rid"] in peer.refused:
            return  # sent before the worker heard of the refusal
        reg = self._region(peer, msg["rid"])
        start, n = msg["start"], msg["npages"]
        if start + n > reg.npages:
            raise ProtocolError(f"advise [{start}, +{n}) is outside region {reg.rid} of {reg.npages} pages")
        self.scanner.advise(reg, start, n, msg["mergeable"])
        if not msg["mergeable"]:
            # The worker breaks the range's merged pages (and says so again
            # when done): reconcile, even if nothing is advised any more.
            self.scanner.settle()
        self._next_batch = min(self._next_batch, time.monotonic())

    def _on_unregister(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        if msg["rid"] in peer.refused:
            peer.refused.discard(msg["rid"])
            return
        reg = self._region(peer, msg["rid"])
        del peer.regions[reg.rid]
        peer.pages -= reg.npages
        self.scanner.remove_region(reg)
        _uncharge(self.quotas, peer.uid, _held([reg]))


# Message handlers by message type, for each role.
_Handler = Callable[[CoordinatorServer, Peer, dict[str, Any], list[int]], None]
_WORKER: dict[str, _Handler] = {
    "register": CoordinatorServer._on_register,
    "advise": CoordinatorServer._on_advise,
    "unregister": CoordinatorServer._on_unregister,
    "merged": CoordinatorServer._on_merged,
    "merge_now": CoordinatorServer._on_merge_now,
    "unmerged": CoordinatorServer._on_unmerged,
}
_CLIENT: dict[str, _Handler] = {
    "stats": CoordinatorServer._on_stats,
    "set": CoordinatorServer._on_set,
    "wait": CoordinatorServer._on_wait,
}


def _held(regions: Iterable[RegionState]) -> Usage:
    """What *regions* hold against a quota: themselves, pages, 2 descriptors each."""
    regions = list(regions)
    return Usage(regions=len(regions), pages=sum(r.npages for r in regions), fds=2 * len(regions))


def _uncharge(quotas: Quotas, uid: int, held: Usage) -> None:
    quotas.charge(uid, regions=-held.regions, pages=-held.pages, fds=-held.fds)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
