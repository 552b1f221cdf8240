"""Workers' replies to merge and unmerge requests.

``Replies`` is the part of the server (``server.py``) that settles a
worker's ``merged`` and ``unmerged`` messages; it runs in the coordinator's
single thread.  Each names a request outstanding for that worker
(``inflight.py``); the scanner then counts what was merged or unmerged, and
the parts waiting on it hear of it: merge_now (``mergenow.py``) and run=2
(``unmergeall.py``).  What the waits for full_scans need (no request older
than their barrier) follows from the request being taken.

A ``merged`` reply that does not match its request frees what the request
held and marks its pages volatile, so they are visited again; slots are
freed only through the scanner, at zero sharers (DESIGN invariant 6).  A
failed unmerge is logged (and fails a run=2 it belongs to).

Settling the replies to the scan's own requests is the scan's work: its CPU
(``scan_cpu_ns``) is added to the next batch's for ``advisor_max_cpu``
(``pacing.py``), so the cap holds for the scan and what it sends.  Replies to
merge_now's requests count in ``merge_now_cpu_usecs`` instead.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from shmdedup.errors import ProtocolError
from shmdedup.coordinator.inflight import RequestTracker
from shmdedup.coordinator.mergenow import MergeNow
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import VOLATILE
from shmdedup.coordinator.unmergeall import UnmergeAll

log: logging.Logger = logging.getLogger("shmdedup.coordinator")


class Replies:
    """``merged`` and ``unmerged`` messages, settled."""

    def __init__(self, scanner: Scanner, requests: RequestTracker, merge_now: MergeNow,
                 unmerge_all: UnmergeAll) -> None:
        self.scanner = scanner
        self.requests = requests
        self.merge_now = merge_now
        self.unmerge_all = unmerge_all
        self.scan_cpu_ns: int = 0       # settling the scan's requests, since take_scan_cpu()

    def on_merged(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        items = self.requests.take(peer, msg["req"], "merge")
        result = msg["result"]
        if len(result) != sum(r.n for r in items) or result.strip(b"\0\1"):
            self.scanner.forget_request(items)
            for reg, first, n, _ in items:
                reg.status[first:first + n] = VOLATILE  # visit again
            raise ProtocolError("merged: result does not match the request")
        own = any(msg["req"] in call.own for call in peer.inline.values())
        t0 = time.thread_time_ns()
        self.scanner.merge_done(items, result)
        if peer.inline:
            self.merge_now.settle(peer, msg["req"], result)
        if own:
            self.merge_now.cpu_ns += time.thread_time_ns() - t0
        else:
            self.scan_cpu_ns += time.thread_time_ns() - t0
        self.unmerge_all.merge_landed(peer)

    def on_unmerged(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        items = self.requests.take(peer, msg["req"], "unmerge")
        t0 = time.thread_time_ns()
        self.scanner.unmerge_done(items)
        self.scan_cpu_ns += time.thread_time_ns() - t0
        error = None
        if msg["err"]:
            error = f"unmerge in pid {peer.pid} failed: {os.strerror(msg['err'])} ({msg['msg']})"
            log.warning("%s", error)
        self.unmerge_all.unmerge_answered(msg["req"], error)

    def take_scan_cpu(self) -> float:
        """Seconds of CPU spent settling the scan's requests since the last call."""
        ns, self.scan_cpu_ns = self.scan_cpu_ns, 0
        return ns / 1e9


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
