"""The agent: a worker's background thread that executes coordinator commands.

It owns no memory of its own.  It connects to the domain's coordinator (an
explicit path, ``$SHMDEDUP_SOCKET`` or the per-user default; retried with
backoff while none runs, so advice given before a coordinator exists is
registered when one appears, like MADV_MERGEABLE while ksmd is stopped),
registers every region that was advised mergeable, and then runs merge and
unmerge batches with the C primitives (GIL released) and replies with what
merged.  Each batch first re-checks that the COW trap is still the installed
SIGSEGV handler (faulthandler or another library may have replaced it).

If the coordinator dies, merged pages stay mapped and copy-on-write keeps
working (the trap is local); the agent reconnects and registers again, and the
new coordinator resumes merging.

Exit: a library must never hang its host's exit.  The thread is a daemon,
and once the interpreter finalizes, CPython ends (up to 3.13) or blocks
(3.14+) every daemon thread that wants the GIL back, without releasing the
locks it holds; a finalizer that then waits on one (a ``Region`` freed at module teardown
closes itself through ``on_close``) waits forever.  So an ``atexit`` hook
(run after the non-daemon threads are joined, before finalization) stops the
agent: it shuts its connection down, which wakes a blocked ``recv``/``send``,
and joins the thread, which is out of every lock once it returns; it waits at
most ``EXIT_JOIN_TIMEOUT`` for a batch in flight (milliseconds), and leaves a
thread stuck longer to the exit (a process may die at any instant, invariant
7).  During finalization itself nothing here waits for a lock another thread
holds (``region.acquire_unless_finalizing``).  The coordinator learns of the
exit from the closed connection and the process's pidfd, and releases what the
worker held.

A region the coordinator refuses (a cap, a quota, no descriptors left) works
unmerged and is offered again later, with backoff (``REFUSED_RETRY_MIN``
doubling to ``REFUSED_RETRY_MAX``): a refusal for a shortage that passes is
never a lockout.

``merge_now`` (``Region.merge_now``) runs in the caller's thread: it makes
sure a connection is up (one prompt attempt, bounded), sends the request and
waits for the answer; the merges themselves arrive as ordinary merge batches
and run here, in the agent thread, which counts the pages of each waiting
call's range that merge.  A lost connection, or no answer within
``MERGE_NOW_TIMEOUT``, ends the wait with what merged so far; after no
answer, calls return 0 at once for ``STALL_WINDOW``.  The call's advice
travels with its requests: registering the region meanwhile (its first
request, a reconnect) leaves out the part not requested yet, whose advice
would wake the scan before the call, and whatever the call never requested
is advised when it ends.

No send to the coordinator waits for room longer than ``SEND_TIMEOUT``: a
coordinator that stopped reading loses the connection, and never holds up
the program's thread.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import warnings
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmdedup import _native, _shm, protocol
from shmdedup.worker import batches, region as _region
from shmdedup.worker.region import Region
from shmdedup.paths import resolve_socket_path
from shmdedup.errors import ArgumentError, PeerRejectedError, ProtocolError, ShmError

log: logging.Logger = logging.getLogger("shmdedup.agent")

BACKOFF_MIN = 0.02
BACKOFF_MAX = 1.0
# How long interpreter exit waits for the agent to finish what it is doing
# (a merge or unmerge batch takes milliseconds) before leaving it behind.
EXIT_JOIN_TIMEOUT = 1.0
REFUSED_RETRY_MIN = 1.0      # s before a refused region is offered again
REFUSED_RETRY_MAX = 60.0
# Test-only fault point (native/sd_fault.h): a test arms it with
# _native._test_arm_fault("agent_merged", n) to die with a batch merged but
# not yet acknowledged; a no-op costing one C call per batch otherwise.
_FAULT_AGENT_MERGED = _native._FAULT_POINTS.index("agent_merged")
# The same for a connection's regions registered, the agent's lock still held.
_FAULT_AGENT_REGISTERED = _native._FAULT_POINTS.index("agent_registered")
# merge_now: the longest wait for a connection attempt (none at the socket
# fails it at once; a live but busy coordinator may take seconds to welcome
# us, one that does not answer fails it after the welcome's 10 s), and for
# the answer (a coordinator that is alive answers within milliseconds per MiB).
MERGE_NOW_CONNECT_TIMEOUT = 30.0
MERGE_NOW_TIMEOUT = 60.0
# The longest a send to the coordinator waits for room (a coordinator that
# stopped reading: stopped, hung); then the connection is dropped, and the
# program's call (an advise, a close, merge_now) goes on.
SEND_TIMEOUT = 5.0
# After a coordinator stalled (no answer to merge_now, a send or a welcome in
# time), merge_now does not wait for it for this long: it returns 0 at once,
# as with no coordinator, until a connection is welcomed again.
STALL_WINDOW = 30.0
# Pages per merge_now message (its checksums must fit one message).
MERGE_NOW_PAGES = 16384


@dataclass(eq=False)
class _InlineWait:
    """One merge_now message in flight, as the agent sees it."""
    region: Region
    first: int
    n: int
    done: threading.Event = field(default_factory=threading.Event)
    merged: int = 0          # pages of [first, first + n) merged meanwhile
    err: int = 0
    msg: str = ""


class Agent:
    def __init__(self) -> None:
        self.pid: int = os.getpid()
        self.lock: threading.RLock = threading.RLock()
        self.regions: weakref.WeakValueDictionary[int, Region] = weakref.WeakValueDictionary()
        self.registered: set[int] = set()
        self.conn: protocol.Connection | None = None
        self.view: _native.StableView | None = None
        self.socket_path: str | None = None
        self.process_merging: bool = _process_merging_from_env()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.connected: threading.Event = threading.Event()
        self.batches: int = 0
        self._rejected = False
        # Set once by stop() (interpreter exit): the thread ends and no new
        # one starts.  _current is the connection the thread is using,
        # welcomed or not, so that stop() can shut it down.
        self._stopping = False
        self._current: protocol.Connection | None = None
        self._refused: dict[int, tuple[float, float]] = {}   # rid -> (retry at, backoff)
        # merge_now: calls waiting for their answer, by token; and connection
        # attempts that failed, so a caller can wait for the next one.
        self._inline: dict[int, _InlineWait] = {}
        # merge_now: the part of each call's range whose request is not sent
        # yet, [start, end) by region: a registration leaves it out of the
        # advice it sends, which would wake the scan before the request.
        self._unsent: dict[int, list[list[int]]] = {}
        self._tokens = itertools.count(1)
        self._attempts = 0
        self._attempt_cv = threading.Condition()
        self._stalled_at: float | None = None    # when the coordinator last stalled

    # -- called by regions (any thread) -------------------------------------

    def on_advise(self, region: Region, first: int, n: int, mergeable: bool) -> None:
        """Region.advise: register the region, or send the advice."""
        # During finalization (a Region freed at module teardown) the lock
        # may be held by a daemon thread that will never run again: then the
        # coordinator is not told (the process is exiting: it learns that
        # from the connection and the pidfd).
        if not _region.acquire_unless_finalizing(self.lock):
            return
        try:
            self._advise(region, first, n, mergeable)
        finally:
            self.lock.release()
        if mergeable:
            return
        # advise(UNMERGEABLE) has dropped the advice and told the
        # coordinator; break the range now, under the op lock, so that a
        # merge in flight finishes first and every later one sees the new
        # advice (batches.merge_advised).  Region.advise's own sweep then finds
        # nothing left to break.
        if not _region.acquire_unless_finalizing(region.op_lock):
            return
        try:
            region.break_range(first, n)
        finally:
            region.op_lock.release()
            # Tell it again, now that the pages are broken (as far as it
            # went): it reconciles their slots and counters at once, even
            # with nothing advised any more.
            if _region.acquire_unless_finalizing(self.lock):
                try:
                    if self.conn is not None and region.id in self.registered:
                        self._send({"t": "advise", "rid": region.id, "start": first,
                                    "npages": n, "mergeable": False})
                finally:
                    self.lock.release()

    def on_close(self, region: Any) -> None:
        """Region.close: forget the region and unregister it (not during
        finalization: see on_advise)."""
        if not _region.acquire_unless_finalizing(self.lock):
            return
        try:
            self.regions.pop(region.id, None)
            if self.conn is not None and region.id in self.registered:
                self.registered.discard(region.id)
                self._send({"t": "unregister", "rid": region.id})
        finally:
            self.lock.release()

    def _advise(self, region: Region, first: int, n: int, mergeable: bool) -> None:
        if not mergeable and region.id not in self.registered:
            return
        new = region.id not in self.regions
        self.regions[region.id] = region
        self._ensure_thread()
        if self.conn is None:
            if new:
                self._wake.set()    # the thread may be idle, with nothing to register
            return
        if region.id not in self.registered:
            self._register(region)
        else:
            self._send({"t": "advise", "rid": region.id, "start": first, "npages": n,
                        "mergeable": mergeable})

    def _attempt_failed(self) -> None:
        with self._attempt_cv:
            self._attempts += 1
            self._attempt_cv.notify_all()

    def _stalled(self) -> None:
        self._stalled_at = time.monotonic()

    def _wait_connected(self, timeout: float) -> bool:
        """Connected, or connected after one prompt attempt (the thread is
        woken from its backoff); False when that attempt fails, and at once
        within STALL_WINDOW of the coordinator stalling."""
        if self.connected.is_set():
            return True
        stalled = self._stalled_at
        if stalled is not None and time.monotonic() - stalled < STALL_WINDOW:
            return False
        self._ensure_thread()
        deadline = time.monotonic() + timeout
        with self._attempt_cv:
            seen = self._attempts
            self._wake.set()
            while not self.connected.is_set() and self._attempts == seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._attempt_cv.wait(min(left, 0.05))   # connected is an Event: poll it
        return self.connected.is_set()

    def merge_now(self, region: Region, first: int, n: int) -> int:
        """Merge pages [first, first + n) of an advised region now (see
        Region.merge_now); returns the pages of the range merged during the
        call.  Raises ShmError (ENOSPC) when stable pages could not be created,
        after merging what could be."""
        unsent = [first, first + n]
        with self.lock:
            self._unsent.setdefault(region.id, []).append(unsent)
            region.set_mergeable(first, n)
            new = region.id not in self.regions
            self.regions[region.id] = region    # registered with its advice when we connect
            self._ensure_thread()
        try:
            return self._merge_now(region, first, n, unsent, new)
        finally:
            # However the call ends, the advice of what it did not send
            # reaches the coordinator (it outlives the call).
            with self.lock:
                calls = [c for c in self._unsent[region.id] if c is not unsent]
                if calls:
                    self._unsent[region.id] = calls
                else:
                    del self._unsent[region.id]
                if (unsent[0] < unsent[1] and self.conn is not None
                        and region.id in self.registered):
                    for a, m in region.advice_runs(unsent[0], unsent[1] - unsent[0],
                                                   self._unsent.get(region.id, ())):
                        self._send({"t": "advise", "rid": region.id, "start": a,
                                    "npages": m, "mergeable": True})

    def _merge_now(self, region: Region, first: int, n: int, unsent: list[int],
                   new: bool) -> int:
        if new and self.conn is None:
            self._wake.set()
        if not self._wait_connected(MERGE_NOW_CONNECT_TIMEOUT):
            return 0
        # One message per MERGE_NOW_PAGES, one at a time: the coordinator
        # caps the calls in progress per worker, and a huge range must not
        # reach that cap by itself.
        deadline = time.monotonic() + MERGE_NOW_TIMEOUT
        merged = 0
        err: _InlineWait | None = None
        for a in range(first, first + n, MERGE_NOW_PAGES):
            m = min(MERGE_NOW_PAGES, first + n - a)
            w = _InlineWait(region, a, m)
            # Our own checksums, so that the coordinator need not read the
            # pages that equal a stable page (it reads and hashes the others).
            h = region.merge_hints(a, m)
            token: int | None = None
            try:
                with self.lock:
                    if self.conn is None:
                        break
                    if region.id not in self.registered:
                        self._register(region)
                    token = next(self._tokens)
                    self._inline[token] = w
                    unsent[0] = a + m
                    self._send({"t": "merge_now", "req": token, "rid": region.id, "start": a,
                                "npages": m, "hashes": h})
                answered = w.done.wait(max(0.0, deadline - time.monotonic()))
            finally:                # also when Ctrl-C (or any exception) interrupts the call
                if token is not None:
                    with self.lock:
                        self._inline.pop(token, None)
            merged += w.merged
            if w.err and err is None:
                err = w
            if not answered:
                log.warning("merge_now: no answer from the coordinator within %.0f s; "
                            "returning what merged, and not waiting for it for %.0f s",
                            MERGE_NOW_TIMEOUT, STALL_WINDOW)
                with self.lock:
                    self._stalled()
                    if self.conn is not None:
                        self.conn.close()   # the agent thread reconnects
                break
        if err is not None:
            e = ShmError(err.err, f"{err.msg} ({merged} of {n} pages merged)")
            e.merged = merged
            raise e
        return merged

    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            conn.send(msg, fds or [], timeout=SEND_TIMEOUT)
        except TimeoutError:
            log.warning("the coordinator took nothing for %.0f s; dropping the connection "
                        "(regions work unmerged until it answers again)", SEND_TIMEOUT)
            self._stalled()
            conn.close()  # the agent thread notices and reconnects
        except (OSError, ProtocolError) as e:
            log.debug("send to coordinator failed: %s", e)
            conn.close()  # the agent thread notices and reconnects
        except BaseException:
            # Interrupted (Ctrl-C) in the middle: whether it went is unknown,
            # so the coordinator's view of our regions is rebuilt anew.
            conn.close()
            raise

    def _register(self, region: Region) -> None:
        self.registered.add(region.id)
        self._send({"t": "register", "rid": region.id, "npages": region.npages},
                   [region.backing_fd, region.meta_fd])
        for first, n in region.advice_runs(without=self._unsent.get(region.id, ())):
            self._send({"t": "advise", "rid": region.id, "start": first, "npages": n,
                        "mergeable": True})

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="shmdedup-agent", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = EXIT_JOIN_TIMEOUT) -> bool:
        """End the thread for good (interpreter exit); True if it has ended.

        Takes no lock: a daemon thread may hold ``self.lock`` while blocked
        in a send to a stalled coordinator, and shutting the connection down
        is what wakes it.  Regions keep working without the agent (advice is
        recorded, copy-on-write is local); nothing merges any more.
        """
        self._stopping = True
        self._wake.set()
        conn = self._current   # read after _stopping is set: see _run
        if conn is not None:
            conn.shutdown()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.debug("agent still busy after %.1f s at exit; leaving it to the exit", timeout)
            return False
        return True

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping:
            if not self._has_regions():
                # Nothing advised (any more): do not connect, so a process
                # that is done with its regions neither takes a connection
                # slot of a new coordinator nor shows up as its worker; the
                # next advised region wakes us.
                self._wake.wait()
                self._wake.clear()
                continue
            path = resolve_socket_path(self.socket_path)
            try:
                conn = protocol.connect(path, timeout=2.0)
            except (OSError, ValueError) as e:
                log.debug("no coordinator at %s (%s); retrying in %.2f s", path, e, backoff)
                self._attempt_failed()
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            # Published before _stopping is read: stop() either sees this
            # connection (and shuts it down) or is seen here.
            self._current = conn
            try:
                if self._stopping:
                    return
                self._session(conn, path)
            except Exception as e:
                if self._stopping:
                    pass  # stop() shut the connection down: nothing to report
                elif isinstance(e, PeerRejectedError):
                    # Refused at the door: say so once, keep retrying quietly.
                    (log.debug if self._rejected else log.warning)("%s", e)
                    self._rejected = True
                elif isinstance(e, (OSError, ProtocolError, TimeoutError, ValueError)):
                    if isinstance(e, TimeoutError):
                        self._stalled()      # no welcome, or it took nothing, in time
                    log.info("coordinator connection ended: %s", e)
                else:
                    # Never let the thread die: a worker without its agent would
                    # silently stop merging for good.  Reconnect instead.
                    log.exception("agent session failed; reconnecting")
            finally:
                with self.lock:
                    # A coordinator that welcomed us and then went away is
                    # retried quickly (a restart takes a fraction of a
                    # second); one that never welcomes us is backed off.
                    backoff = BACKOFF_MIN if self.connected.is_set() else min(backoff * 2, BACKOFF_MAX)
                    self.conn = None
                    self.registered.clear()
                    self.connected.clear()
                    lost, self._inline = self._inline, {}
                self._current = None
                for w in lost.values():      # merge_now calls: return what merged
                    w.done.set()
                self._attempt_failed()
                conn.close()
                if self.view is not None:
                    self.view.close()
                    self.view = None
            self._wake.wait(backoff)
            self._wake.clear()

    def _has_regions(self) -> bool:
        with self.lock:
            return any(not r.closed for r in list(self.regions.values()))

    def _session(self, conn: protocol.Connection, path: str) -> None:
        lost: OSError | None = None
        try:
            conn.send({"t": "hello", "v": protocol.PROTOCOL_VERSION, "role": "worker", "pid": os.getpid()})
        except (ConnectionResetError, BrokenPipeError) as e:
            lost = e    # closed at once: its refusal, if it sent one, is read below
        got = conn.recv(timeout=10)
        if got is not None and got[0]["t"] == "refused":
            _shm.close_fds(got[1])
            raise PeerRejectedError(
                f"coordinator at {path} refused us: {got[0]['msg']}; regions stay unmerged "
                f"until it accepts us")
        if got is None:
            # Gone without a word (killed, say): a refusal says why (above).
            raise lost or ConnectionError(f"coordinator at {path} closed the connection "
                                          f"before welcome")
        self._rejected = False
        msg, fds = got
        if msg["t"] != "welcome" or len(fds) != 1:
            _shm.close_fds(fds)
            raise ProtocolError("expected a welcome with the stable segment's descriptor")
        try:
            self.view = _native.StableView(fds[0])
        finally:
            os.close(fds[0])
        with self.lock:
            self.conn = conn
            self._stalled_at = None
            self.registered.clear()
            self._refused.clear()
            for region in list(self.regions.values()):
                if not region.closed:
                    self._register(region)
            _native._fault_point(_FAULT_AGENT_REGISTERED)
            self.connected.set()
        with self._attempt_cv:
            self._attempt_cv.notify_all()    # a merge_now waiting for the connection
        while True:
            try:
                got = conn.recv(timeout=self._retry_refused())
            except TimeoutError:
                continue
            if got is None:
                return
            msg, fds = got
            _shm.close_fds(fds)
            _native.trap_install()
            if msg["t"] == "merge":
                result = self._merge(msg["items"])
                _native._fault_point(_FAULT_AGENT_MERGED)
                conn.send({"t": "merged", "req": msg["req"], "result": result}, timeout=SEND_TIMEOUT)
            elif msg["t"] == "unmerge":
                err, text = batches.unmerge_items(self.regions, msg["items"])
                conn.send({"t": "unmerged", "req": msg["req"], "err": err, "msg": text},
                          timeout=SEND_TIMEOUT)
            elif msg["t"] == "merged_now":
                with self.lock:
                    w = self._inline.pop(msg["req"], None)
                if w is not None:            # else: its caller gave up waiting
                    w.err, w.msg = msg["err"], msg["msg"]
                    w.done.set()
                continue
            elif msg["t"] == "reply" and not msg["ok"]:
                # A cap, a quota or a shortage refused a region: offered again later.
                self._on_refused(msg["data"], msg["error"])
                continue
            else:
                raise ProtocolError(f"unexpected {msg['t']} from the coordinator")
            self.batches += 1

    def _on_refused(self, rid: Any, error: str) -> None:
        with self.lock:
            if not isinstance(rid, int) or rid not in self.registered:
                return
            self.registered.discard(rid)
            _, backoff = self._refused.get(rid, (0.0, 0.0))
            (log.debug if backoff else log.warning)(
                "coordinator refused a region: %s; it keeps working, unmerged (offered "
                "again in %.0f s)", error, backoff or REFUSED_RETRY_MIN)
            backoff = min(backoff * 2, REFUSED_RETRY_MAX) if backoff else REFUSED_RETRY_MIN
            self._refused[rid] = (time.monotonic() + backoff, backoff)

    def _retry_refused(self) -> float | None:
        """Register again the refused regions that are due; seconds until the
        next one is (None: none waits)."""
        with self.lock:
            now = time.monotonic()
            for rid, (at, _) in list(self._refused.items()):
                region = self.regions.get(rid)
                if region is None or region.closed:
                    del self._refused[rid]
                elif at <= now and rid not in self.registered:
                    self._register(region)
            waits = [at - now for rid, (at, _) in self._refused.items()
                     if rid not in self.registered and at > now]
            return min(waits) if waits else None

    def _merge(self, items: bytes) -> bytes:
        return batches.merge_items(self.regions, self.view, items,
                                   self._count_inline if self._inline else None)

    def _count_inline(self, region: Region, rows: np.ndarray, result: bytes) -> None:
        """Credit each waiting merge_now call of this region with the pages
        of its range that this batch merged."""
        with self.lock:
            waits = [w for w in self._inline.values() if w.region is region]
        if not waits:
            return
        ok = np.frombuffer(result, np.uint8).astype(bool)
        pages = np.concatenate([np.arange(f, f + n) for f, n, _ in rows.tolist()])[ok]
        for w in waits:
            w.merged += int(np.count_nonzero((pages >= w.first) & (pages < w.first + w.n)))


_agent: Agent | None = None
_agent_lock = threading.Lock()


def get_agent() -> Agent:
    global _agent
    with _agent_lock:
        if _agent is None or _agent.pid != os.getpid():
            _agent = Agent()
            _region._listener = _agent
        return _agent


def wait_advice_sent(socket_path: str, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until this process's agent has sent the
    coordinator at ``socket_path`` every region it advised, so that a wait
    for full scans started next counts scans that see them (the coordinator
    reads everything a connection has queued before its next batch).  Returns
    at once if the agent uses another coordinator or has nothing to send."""
    a = _agent
    if a is None or a.pid != os.getpid() or not a._has_regions():
        return
    try:
        if not os.path.samefile(resolve_socket_path(a.socket_path), socket_path):
            return
    except (OSError, ValueError):
        return
    # Registration and advice are sent under the agent's lock as soon as it
    # is connected (_session, _advise): connected means sent.
    a._wake.set()
    a.connected.wait(timeout)


def reconnect_soon() -> None:
    """Make the agent try its coordinator now (after one was started)."""
    get_agent()._wake.set()


def set_socket(path: str | None) -> None:
    """Use this coordinator socket for the regions of this process."""
    a = get_agent()
    a.socket_path = path
    if a.conn is not None:
        a.conn.close()
    a._wake.set()


# Process-wide merging (PR_SET_MEMORY_MERGE) survives exec through the
# environment: a Python child reads it when it imports shmdedup.
ENV_PROCESS_MERGING = "SHMDEDUP_PROCESS_MERGING"
_merge_any_lock = threading.Lock()


def _process_merging_from_env() -> bool:
    value = os.environ.get(ENV_PROCESS_MERGING, "")
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    warnings.warn(f"${ENV_PROCESS_MERGING}={value!r} ignored: it must be 0 or 1",
                  RuntimeWarning, stacklevel=2)
    return False


def enable_process_merging(enabled: bool = True) -> None:
    """Process-wide merging, like ``prctl(PR_SET_MEMORY_MERGE, enabled)``.

    On: every region of this process is advised mergeable, the existing ones
    now and each new one when it is allocated (``Region(mergeable=False)``
    opts one out).  Off: every region of this process is unadvised and its
    merged pages are broken back to private copies, as advise(UNMERGEABLE)
    does; if that fails (OSError: no memory for the copies), the regions are
    advised again, merging stays on, and the error propagates.  Switching it
    to what it already is does nothing.

    The setting survives ``fork()`` (the child's new regions follow it; the
    parent's regions are not inherited) and ``exec`` of a Python program that
    imports shmdedup (it travels in ``$SHMDEDUP_PROCESS_MERGING``).
    """
    if not isinstance(enabled, (bool, int)) or enabled not in (0, 1):
        raise ArgumentError(f"enabled must be True or False, got {enabled!r}")
    enabled = bool(enabled)
    a = get_agent()
    with _merge_any_lock:
        if a.process_merging == enabled:
            return
        # The flag first: a region allocated meanwhile in another thread
        # either sees it or is in the list below.
        a.process_merging = enabled
        regions = [r for r in list(_region._all.values()) if not r.closed]
        if enabled:
            os.environ[ENV_PROCESS_MERGING] = "1"
            for r in regions:
                r.advise(_region.MERGEABLE)
            return
        try:
            for r in regions:
                if not r.closed:
                    r.advise(_region.UNMERGEABLE)
        except BaseException:
            a.process_merging = True
            for r in regions:
                if not r.closed:
                    r.advise(_region.MERGEABLE)
            raise
        os.environ.pop(ENV_PROCESS_MERGING, None)


def process_merging() -> bool:
    """Whether process-wide merging is on, like ``prctl(PR_GET_MEMORY_MERGE)``."""
    return get_agent().process_merging


def _stop_at_exit() -> None:
    # Registered with atexit: runs after the non-daemon threads are joined
    # (they may still be using the agent) and before finalization (see the
    # module docstring).  A forked child inherits the registration and stops
    # its own agent.
    agent = _agent
    if agent is not None and agent.pid == os.getpid():
        agent.stop()


def _after_fork_in_child() -> None:
    # The parent's agent (its thread, its connection) does not exist here;
    # a fresh one serves the regions this child creates.  _agent_lock may
    # have been held by a parent thread at the fork: it would never be
    # released here.
    global _agent, _agent_lock
    _agent_lock = threading.Lock()
    merging = _agent.process_merging if _agent is not None else False
    _agent = Agent()
    _agent.process_merging = merging     # PR_SET_MEMORY_MERGE survives fork
    _region._listener = _agent


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_stop_at_exit)
get_agent()


__all__ = ["MERGE_NOW_TIMEOUT", "SEND_TIMEOUT", "STALL_WINDOW", "enable_process_merging",
           "process_merging", "set_socket"]
