"""The coordinator's requests to workers, waits for full_scans, and run=2.

``RequestsMixin`` is one part of ``CoordinatorServer`` (``server.py``),
which inherits it; it runs in the coordinator's single thread and shares its
state (``peers``, ``scanner``, ``controls``, ``_req``, ``_waiters``,
``_run2``, all set up by ``CoordinatorServer.__init__``) and its
``_send``/``_reply``/``_schedule_drop``/``_flush_drops``.

* Merge and unmerge requests: the scanner's runs are cut into requests of at
  most ``protocol.MAX_ITEMS`` runs and ``MAX_PAGES_PER_REQUEST`` pages, each
  remembered in ``peer.requests`` (kind, runs, deadline) until the worker's
  ``merged``/``unmerged`` reply settles it.  A reply must name a request of
  its kind outstanding for that worker (every message is untrusted), and a
  worker that leaves one unanswered for ``REQUEST_TIMEOUT`` is dropped.
* A ``merged`` reply that does not match its request frees what the request
  held and marks its pages volatile, so they are visited again; slots are
  freed only through the scanner, at zero sharers (DESIGN invariant 6).
* Waits: a client's ``wait`` for ``full_scans`` is answered once that many
  full scans have ended *and* every merge and unmerge request sent up to the
  end of the last of them has been answered (or its worker is gone), so the
  statistics read after a wait count the merges those scans asked for.  It is
  answered with an error at its deadline.
* A client gets exactly one reply per request, in order: while a wait or a
  run=2 of it is outstanding, the coordinator holds its later requests
  (``CoordinatorServer._hold``, at most ``MAX_QUEUED_REQUESTS``) until that
  reply is sent.
* merge_now (``inline.py``): a worker's request to merge a range now becomes
  merge requests like the scan's, sent at once; the worker is answered
  (``merged_now``) when they, and any scan merge already in flight for pages
  of the range, are settled.  Nothing is merged while ``run`` is not 1: the
  answer then comes at once.  ``pages_merged_inline`` counts the pages the
  worker confirms, globally and per worker; ``merge_now_cpu_usecs`` the
  coordinator's CPU time spent on these requests (the scan's is apart).
* run=2 (seed semantics): unmerge every merged page and keep the advice;
  merges still in flight are unmerged when they land.  It ends when no
  unmerge or merge is outstanding; a failed unmerge leaves run at 0 and
  reports why in ``last_error`` (seed patch 7).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from shmdedup import protocol
from shmdedup.errors import ProtocolError
from shmdedup.coordinator.peers import InlineCall, Peer
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import VOLATILE, Run, _coalesce

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

MAX_PAGES_PER_REQUEST = 65536
MAX_INLINE_PER_WORKER = 64      # merge_now calls in progress per worker
REQUEST_TIMEOUT = 60.0          # a worker that does not answer is dropped


class RequestsMixin:
    """Requests in flight, waits and run=2 of ``CoordinatorServer``."""

    # Set by CoordinatorServer.__init__.
    controls: dict[str, int]
    scanner: Scanner
    peers: dict[int, Peer]
    last_error: str
    _waiters: list[list[Any]]       # [peer, target full_scans, deadline, barrier or None]
    _run2: dict[str, Any] | None
    _req: itertools.count[int]      # request ids
    _last_req: int                  # the id of the last request sent to a worker
    pages_merged_inline: int
    merge_now_cpu_ns: int

    if TYPE_CHECKING:   # CoordinatorServer's (server.py, which delegates to outbox.py)
        def _send(self, peer: Peer, msg: dict[str, Any], fds: list[int] | None = None) -> bool: ...
        def _reply(self, peer: Peer, ok: bool, data: Any = None, error: str = "") -> None: ...
        def _schedule_drop(self, peer: Peer, why: str) -> None: ...
        def _flush_drops(self) -> None: ...
        def _hold(self, peer: Peer) -> None: ...
        def _unhold(self, peer: Peer) -> None: ...

    # -- replies from workers --------------------------------------------

    def _take_request(self, peer: Peer, req: int, kind: str) -> list[Run]:
        r = peer.requests.get(req)
        if r is None or r[0] != kind:
            raise ProtocolError(f"no {kind} request {req} is outstanding for this worker")
        del peer.requests[req]
        return r[1]

    def _on_merged(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        items = self._take_request(peer, msg["req"], "merge")
        result = msg["result"]
        if len(result) != sum(n for _, _, n, _ in items) or result.strip(b"\0\1"):
            self.scanner.forget_request(items)
            for reg, first, n, _ in items:
                reg.status[first:first + n] = VOLATILE  # visit again
            raise ProtocolError("merged: result does not match the request")
        t0 = time.thread_time_ns() if peer.inline else 0
        self.scanner.merge_done(items, result)
        if peer.inline:
            self._settle_inline(peer, msg["req"], result)
            self.merge_now_cpu_ns += time.thread_time_ns() - t0
        if self.controls["run"] == 2 and self._run2 is not None:
            again = [t for reg in peer.regions.values() for t in self.scanner.merged_items(reg)]
            if again:
                self._send_unmerge(peer, _coalesce(again), run2=True)
        self._check_run2()

    def _on_unmerged(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        items = self._take_request(peer, msg["req"], "unmerge")
        self.scanner.unmerge_done(items)
        if msg["err"]:
            text = f"unmerge in pid {peer.pid} failed: {os.strerror(msg['err'])} ({msg['msg']})"
            log.warning("%s", text)
            if self._run2 is not None and msg["req"] in self._run2["reqs"]:
                self._run2["error"] = text
        if self._run2 is not None:
            self._run2["reqs"].discard(msg["req"])
            self._check_run2()

    # -- merge at write time (merge_now) ------------------------------------

    def _on_merge_now(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        t0 = time.thread_time_ns()
        try:
            self._merge_now(peer, msg)
        finally:
            self.merge_now_cpu_ns += time.thread_time_ns() - t0

    def _merge_now(self, peer: Peer, msg: dict[str, Any]) -> None:
        token = msg["req"]
        reg = peer.regions.get(msg["rid"])
        start, n = msg["start"], msg["npages"]
        if reg is not None and start + n > reg.npages:
            raise ProtocolError(f"merge_now [{start}, +{n}) is outside region {reg.rid} of {reg.npages} pages")
        if reg is not None:
            # merge_now advises the range (without waking the scan, as an
            # advise message does: these pages are merged right here).
            self.scanner.advise(reg, start, n, True)
        if token in peer.inline:
            raise ProtocolError(f"merge_now {token} is already in progress")
        if len(peer.inline) >= MAX_INLINE_PER_WORKER:
            raise ProtocolError(f"more than {MAX_INLINE_PER_WORKER} merge_now calls in progress")
        if msg["rid"] in peer.refused or self.controls["run"] != 1 or self._run2 is not None:
            # A region refused by a cap, or merging stopped: nothing merges now.
            self._send(peer, {"t": "merged_now", "req": token, "err": 0, "msg": ""})
            return
        if reg is None:
            raise ProtocolError(f"region {msg['rid']} is not registered by this worker")
        hints = np.frombuffer(msg["hashes"], "<u8") if msg["hashes"] else None
        res = self.scanner.merge_inline(reg, start, n, hints)
        self.scanner.budget.end_batch({peer: len(res.runs)} if res.runs else {})
        own = set(self._send_request(peer, "merge", res.runs)) if res.runs else set()
        waits = set(own)
        if res.waiting:
            # Scan merges in flight for pages of the range: answer after them.
            for req, (kind, runs, _) in peer.requests.items():
                if kind == "merge" and any(r[0] is reg and r[1] < start + n and r[1] + r[2] > start
                                           for r in runs):
                    waits.add(req)
        call = InlineCall(waits, own)
        if res.enospc:
            call.err, call.msg = errno.ENOSPC, (
                f"merge_now: no new stable page could be created ({res.enospc}); "
                f"the pages that needed one stay private")
        if waits:
            peer.inline[token] = call
        else:
            self._answer_inline(peer, token, call)

    def _settle_inline(self, peer: Peer, req: int, result: bytes) -> None:
        """A merge reply: count it if a merge_now sent it, and answer each
        call that waited for nothing else."""
        for token, call in list(peer.inline.items()):
            if req not in call.waits:
                continue
            call.waits.discard(req)
            if req in call.own:
                n = result.count(1)
                peer.merged_inline += n
                self.pages_merged_inline += n
            if not call.waits:
                del peer.inline[token]
                self._answer_inline(peer, token, call)

    def _answer_inline(self, peer: Peer, token: int, call: InlineCall) -> None:
        self._send(peer, {"t": "merged_now", "req": token, "err": call.err, "msg": call.msg[:1000]})

    # -- waits for full_scans ---------------------------------------------

    def _on_wait(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        self._waiters.append([peer, msg["full_scans"], time.monotonic() + msg["timeout"], None])
        self._hold(peer)
        self._settle_waiters()

    def _oldest_request(self) -> float:
        """The id of the oldest request still unanswered (inf: none)."""
        return min((req for p in self.peers.values() for req in p.requests), default=float("inf"))

    def _settle_waiters(self) -> None:
        """Answer the waits that are done: their full scans ended, and every
        request sent up to the end of the last one (the *barrier*) is answered."""
        if not self._waiters:
            return
        oldest = self._oldest_request()
        keep = []
        for w in self._waiters:
            peer, target, _, barrier = w
            if barrier is None and self.scanner.full_scans >= target:
                # The scan's merges were sent at the end of its batch: all of
                # them have ids up to here.
                w[3] = barrier = self._last_req
            if barrier is not None and oldest > barrier:
                self._reply(peer, True, self.scanner.full_scans)
                self._unhold(peer)
            else:
                keep.append(w)
        self._waiters = keep

    def _expire(self, now: float) -> None:
        keep = []
        for w in self._waiters:
            peer, target, deadline, barrier = w
            if now >= deadline:
                why = (f"full_scans {target} reached, but requests sent in those scans are "
                       f"still unanswered" if barrier is not None else
                       f"timed out waiting for full_scans {target} (now {self.scanner.full_scans})")
                self._reply(peer, False, self.scanner.full_scans, why)
                self._unhold(peer)
            else:
                keep.append(w)
        self._waiters = keep
        for peer in list(self.peers.values()):
            if any(now >= d for _, _, d in peer.requests.values()):
                self._schedule_drop(peer, f"no reply within {REQUEST_TIMEOUT:.0f} s")
        self._flush_drops()

    # -- merge and unmerge requests ---------------------------------------

    def _send_request(self, peer: Peer, kind: str, runs: list[Run]) -> list[int]:
        reqs = []
        i = 0
        while i < len(runs) and not peer.conn.closed:
            chunk: list[Run] = []
            pages = 0
            while i < len(runs) and len(chunk) < protocol.MAX_ITEMS and pages + runs[i][2] <= MAX_PAGES_PER_REQUEST:
                chunk.append(runs[i])
                pages += runs[i][2]
                i += 1
            if not chunk:  # one run longer than a request: split it
                reg, first, n, slot = runs[i]
                m = MAX_PAGES_PER_REQUEST
                runs[i:i + 1] = [(reg, first, m, slot), (reg, first + m, n - m, slot + m if slot >= 0 else slot)]
                continue
            req = self._last_req = next(self._req)
            items = protocol.items_to_bytes([(reg.rid, first, n, slot if kind == "merge" else 0)
                                             for reg, first, n, slot in chunk])
            peer.requests[req] = (kind, chunk, time.monotonic() + REQUEST_TIMEOUT)
            if not self._send(peer, {"t": kind, "req": req, "items": items}):
                break
            reqs.append(req)
        return reqs

    def _send_merge(self, peer: Peer, runs: list[Run]) -> None:
        self._send_request(peer, "merge", runs)

    def _send_unmerge(self, peer: Peer, runs: list[Run], run2: bool = False) -> None:
        reqs = self._send_request(peer, "unmerge", runs)
        if run2 and self._run2 is not None:
            self._run2["reqs"].update(reqs)

    # -- run=2 (unmerge everything) ---------------------------------------

    def _start_run2(self, client: Peer | None) -> None:
        """run=2: unmerge every merged page, keep the advice (seed semantics)."""
        self._run2 = {"reqs": set(), "error": None, "client": client}
        for peer in list(self.peers.values()):
            items = [t for reg in peer.regions.values() for t in self.scanner.merged_items(reg)]
            if items:
                self._send_unmerge(peer, _coalesce(items), run2=True)
        self._check_run2()

    def _check_run2(self) -> None:
        r = self._run2
        if r is None or r["reqs"]:
            return
        if any(k == "merge" for p in self.peers.values() for k, _, _ in p.requests.values()):
            return  # merges still in flight will be unmerged when they land
        self._run2 = None
        ok = r["error"] is None
        self.scanner.reset_after_unmerge(ok)
        if not ok:
            # Seed patch 7: a failed unmerge leaves run at 0 and reports why.
            self.controls["run"] = 0
            self.last_error = r["error"]
        if r["client"] is not None:
            if ok:
                self._reply(r["client"], True, {"run": self.controls["run"]})
            else:
                self._reply(r["client"], False, None, r["error"])
            self._unhold(r["client"])


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
