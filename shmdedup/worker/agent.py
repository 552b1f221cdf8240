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
new coordinator resumes merging.  A region the coordinator refuses (a cap, a
quota, no descriptors left) works unmerged and is offered again later, with
backoff (``REFUSED_RETRY_MIN`` doubling to ``REFUSED_RETRY_MAX``): a refusal
for a shortage that passes is never a lockout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

import numpy as np

from shmdedup import _native, protocol
from shmdedup.worker import region as _region
from shmdedup.paths import resolve_socket_path
from shmdedup.errors import PeerRejectedError, ProtocolError

log = logging.getLogger("shmdedup.agent")

BACKOFF_MIN = 0.02
BACKOFF_MAX = 1.0
REFUSED_RETRY_MIN = 1.0      # s before a refused region is offered again
REFUSED_RETRY_MAX = 60.0
# Test-only fault point (native/sd_fault.h): a test arms it with
# _native._test_arm_fault("agent_merged", n) to die with a batch merged but
# not yet acknowledged; a no-op costing one C call per batch otherwise.
_FAULT_AGENT_MERGED = _native._FAULT_POINTS.index("agent_merged")


class Agent:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.regions: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.registered: set[int] = set()
        self.conn: protocol.Connection | None = None
        self.view: Any = None
        self.socket_path: str | None = None
        self.process_merging = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.connected = threading.Event()
        self.batches = 0
        self._rejected = False
        self._refused: dict[int, tuple[float, float]] = {}   # rid -> (retry at, backoff)

    # -- called by regions (any thread) -------------------------------------

    def region_event(self, region: Any, event: str, *args: Any) -> None:
        with self.lock:
            if event == "advise":
                self._advise(region, *args)
            elif event == "close":
                self.regions.pop(region.id, None)
                if self.conn is not None and region.id in self.registered:
                    self.registered.discard(region.id)
                    self._send({"t": "unregister", "rid": region.id})
        if event == "advise" and not args[2]:
            # advise(UNMERGEABLE) has dropped the advice and told the
            # coordinator; break the range now, under the op lock, so that a
            # merge in flight finishes first and every later one sees the new
            # advice (_merge_advised).  Region.advise's own sweep then finds
            # nothing left to break.
            with region._op_lock:
                region.break_range(args[0], args[1])

    def _advise(self, region: Any, first: int, n: int, mergeable: bool) -> None:
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

    def _send(self, msg: dict, fds: list[int] | None = None) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            conn.send(msg, fds or [])
        except (OSError, ProtocolError) as e:
            log.debug("send to coordinator failed: %s", e)
            conn.close()  # the agent thread notices and reconnects

    def _register(self, region: Any) -> None:
        self.registered.add(region.id)
        self._send({"t": "register", "rid": region.id, "npages": region.npages},
                   [region.backing_fd, region.meta_fd])
        for first, n in region.advice_runs():
            self._send({"t": "advise", "rid": region.id, "start": first, "npages": n,
                        "mergeable": True})

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shmdedup-agent", daemon=True)
            self._thread.start()

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
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
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            try:
                self._session(conn, path)
            except PeerRejectedError as e:
                # Refused at the door: say so once, keep retrying quietly.
                (log.debug if self._rejected else log.warning)("%s", e)
                self._rejected = True
            except (OSError, ProtocolError, TimeoutError, ValueError) as e:
                log.info("coordinator connection ended: %s", e)
            except Exception:
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
        conn.send({"t": "hello", "v": protocol.PROTOCOL_VERSION, "role": "worker", "pid": os.getpid()})
        got = conn.recv(timeout=10)
        if got is None:
            raise PeerRejectedError(
                f"coordinator at {path} closed the connection before welcome (our uid "
                f"{os.getuid()} not allowed, or max_connections reached: see its log); "
                f"regions stay unmerged until it accepts us")
        self._rejected = False
        msg, fds = got
        if msg["t"] != "welcome" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("expected a welcome with the stable segment's descriptor")
        try:
            self.view = _native.StableView(fds[0])
        finally:
            os.close(fds[0])
        with self.lock:
            self.conn = conn
            self.registered.clear()
            self._refused.clear()
            for region in list(self.regions.values()):
                if not region.closed:
                    self._register(region)
            self.connected.set()
        while True:
            try:
                got = conn.recv(timeout=self._retry_refused())
            except TimeoutError:
                continue
            if got is None:
                return
            msg, fds = got
            for fd in fds:
                os.close(fd)
            _native.trap_install()
            if msg["t"] == "merge":
                result = self._merge(msg["items"])
                _native._fault_point(_FAULT_AGENT_MERGED)
                conn.send({"t": "merged", "req": msg["req"], "result": result})
            elif msg["t"] == "unmerge":
                err, text = self._unmerge(msg["items"])
                conn.send({"t": "unmerged", "req": msg["req"], "err": err, "msg": text})
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

    def _groups(self, items: bytes) -> list[tuple[Any, np.ndarray]]:
        rows = np.frombuffer(items, "<i8").reshape(-1, 4)
        out = []
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j, 0] == rows[i, 0]:
                j += 1
            out.append((self.regions.get(int(rows[i, 0])), rows[i:j, 1:]))
            i = j
        return out

    def _merge(self, items: bytes) -> bytes:
        parts = []
        for region, rows in self._groups(items):
            npages = int(rows[:, 1].sum())
            if region is None:
                parts.append(bytes(npages))
                continue
            with region._op_lock:
                try:
                    parts.append(self._merge_advised(region, rows))
                except (ValueError, BufferError) as e:
                    log.debug("merge refused: %s", e)
                    parts.append(bytes(npages))
        return b"".join(parts)

    def _merge_advised(self, region: Any, rows: np.ndarray) -> bytes:
        """Merge the (first, n, slot) runs, refusing pages no longer advised.

        The coordinator may ask before it hears of an advise(UNMERGEABLE);
        merging such a page would leave it merged against the advice for good
        (the sweep of advise() may already be past it).  The caller holds the
        region's op lock, which advise(UNMERGEABLE) takes for its sweep after
        dropping the advice (see region_event), so the check cannot go stale.
        """
        if (rows[:, 0] < 0).any() or (rows[:, 1] < 1).any() or (rows[:, 0] + rows[:, 1] > region.npages).any():
            raise ValueError("merge request outside the region")
        pages = np.concatenate([np.arange(f, f + n) for f, n, _ in rows.tolist()])
        advised = region._advice[pages] & (region._pins[pages] == 0)   # pinned(): never
        if advised.all():
            return region.merge(self.view, np.ascontiguousarray(rows).tobytes())
        slots = np.concatenate([np.arange(s, s + n) if s >= 0 else np.full(n, -1)
                                for _, n, s in rows.tolist()])
        keep = np.flatnonzero(advised)
        res = np.zeros(len(pages), np.uint8)
        if len(keep):
            # Runs again, of the advised pages only: page and slot both advance by one.
            p, s = pages[keep], slots[keep]
            cut = np.flatnonzero((np.diff(p) != 1) | ((np.diff(s) != 1) & (s[1:] >= 0))
                                 | ((s[1:] < 0) != (s[:-1] < 0))) + 1
            sub = np.array([(q[0], len(q), t[0]) for q, t in zip(np.split(p, cut), np.split(s, cut))],
                           dtype="<i8")
            res[keep] = np.frombuffer(region.merge(self.view, sub.tobytes()), np.uint8)
        return res.tobytes()

    def _unmerge(self, items: bytes) -> tuple[int, str]:
        for region, rows in self._groups(items):
            if region is None:
                continue
            with region._op_lock:
                for first, n, _ in rows:
                    try:
                        region.break_range(int(first), int(n))
                    except ValueError:
                        break  # closed meanwhile: nothing left to unmerge
                    except OSError as e:
                        return e.errno or 5, str(e)
        return 0, ""


_agent: Agent | None = None
_agent_lock = threading.Lock()


def get_agent() -> Agent:
    global _agent
    with _agent_lock:
        if _agent is None or _agent.pid != os.getpid():
            _agent = Agent()
            _region._listener = _agent
        return _agent


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


def enable_process_merging(enabled: bool = True) -> None:
    """Like prctl(PR_SET_MEMORY_MERGE): every region this process allocates
    from now on is advised mergeable."""
    get_agent().process_merging = enabled


def _after_fork_in_child() -> None:
    # The parent's agent (its thread, its connection) does not exist here;
    # a fresh one serves the regions this child creates.
    global _agent
    _agent = Agent()
    _region._listener = _agent


os.register_at_fork(after_in_child=_after_fork_in_child)
get_agent()
