"""merge_now: a worker's request to merge a range now (merging at write time).

``MergeNow`` is the part of the server (``server.py``) that answers a
worker's ``merge_now`` message; it runs in the coordinator's single thread.
The scanner finds what the range holds (``scan/inline.py``: pages equal to
stable pages, and new stable pages for the rest); the merges it asks for
become merge requests like the scan's (``inflight.py``), sent at once.

* The worker is answered (``merged_now``) right behind its own merge
  requests, on the same connection: its agent reads them in order, so the
  call returns once they are applied, and the coordinator is spared a send
  per call (the reply to the merge is counted when it comes, ``settle``).
  A stats request is answered only after such replies have been read
  (``unsettled``), so the statistics a worker asks for after merge_now
  returned count what it merged.  When a scan merge is already in flight for
  pages of the range, the answer waits until that one and the call's own
  requests are settled (``settle``, called for every merge reply by
  ``replies.py``).
* Nothing is merged while ``run`` is not 1 or a run=2 is in progress, nor in
  a region refused by a cap: the answer then comes at once.
* At most ``MAX_INLINE_PER_WORKER`` calls are in progress per worker, each
  with its own token.
* ``pages_merged`` counts the pages the worker confirms (the statistic
  ``pages_merged_inline``, also per worker); ``cpu_ns`` the coordinator's CPU
  time spent on these calls (``merge_now_cpu_usecs``; the scan's is apart).
"""

from __future__ import annotations

import errno
import time
from typing import Any

import numpy as np

from shmdedup.errors import ProtocolError
from shmdedup.coordinator.inflight import RequestTracker
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import InlineCall, Peer
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.unmergeall import UnmergeAll

MAX_INLINE_PER_WORKER = 64      # merge_now calls in progress per worker


class MergeNow:
    """Workers' merge_now calls in progress, and what they merged."""

    def __init__(self, controls: dict[str, int], scanner: Scanner, requests: RequestTracker,
                 unmerge_all: UnmergeAll, outbox: Outbox) -> None:
        self.controls = controls
        self.scanner = scanner
        self.requests = requests
        self.unmerge_all = unmerge_all
        self.outbox = outbox
        self.pages_merged: int = 0      # pages merged by merge_now, ever
        self.cpu_ns: int = 0            # CPU time spent on merge_now calls

    def on_merge_now(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        t0 = time.thread_time_ns()
        try:
            self._merge_now(peer, msg)
        finally:
            self.cpu_ns += time.thread_time_ns() - t0

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
        if msg["rid"] in peer.refused or self.controls["run"] != 1 or self.unmerge_all.active:
            # A region refused by a cap, or merging stopped: nothing merges now.
            self.outbox.send(peer, {"t": "merged_now", "req": token, "err": 0, "msg": ""})
            return
        if reg is None:
            raise ProtocolError(f"region {msg['rid']} is not registered by this worker")
        hints = np.frombuffer(msg["hashes"], "<u8") if msg["hashes"] else None
        res = self.scanner.merge_inline(reg, start, n, hints)
        self.scanner.budget.end_batch({peer: len(res.runs)} if res.runs else {})
        own = set(self.requests.send(peer, "merge", res.runs)) if res.runs else set()
        waits = set(own)
        if res.waiting:
            # Scan merges in flight for pages of the range: answer after them.
            for req, (kind, runs, _) in peer.requests.items():
                if kind == "merge" and any(r.region is reg and r.first < start + n and r.first + r.n > start
                                           for r in runs):
                    waits.add(req)
        call = InlineCall(waits, own)
        if res.enospc:
            call.err, call.msg = errno.ENOSPC, (
                f"merge_now: no new stable page could be created ({res.enospc}); "
                f"the pages that needed one stay private")
        if waits == own:
            # Nothing to wait for but our own requests: answer behind them.
            self._answer(peer, token, call)
            call.answered = True
        if waits:
            peer.inline[token] = call

    def settle(self, peer: Peer, req: int, result: bytes) -> None:
        """A merge reply: count it if a merge_now sent it, and answer each
        call that waited for nothing else."""
        for token, call in list(peer.inline.items()):
            if req not in call.waits:
                continue
            call.waits.discard(req)
            if req in call.own:
                n = result.count(1)
                peer.merged_inline += n
                self.pages_merged += n
            if not call.waits:
                del peer.inline[token]
                if not call.answered:
                    self._answer(peer, token, call)

    def unsettled(self, peers: Any) -> list[Peer]:
        """The workers with a call answered whose merge replies are still to
        be counted (read them before answering a stats request)."""
        return [p for p in peers if any(c.answered for c in p.inline.values())]

    def _answer(self, peer: Peer, token: int, call: InlineCall) -> None:
        self.outbox.send(peer, {"t": "merged_now", "req": token, "err": call.err, "msg": call.msg[:1000]})


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
