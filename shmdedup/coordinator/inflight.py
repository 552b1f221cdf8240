"""The coordinator's requests to workers while they are in flight.

``RequestTracker`` is the part of the server (``server.py``) that sends merge
and unmerge requests to workers' agents and remembers them until the worker
answers; it runs in the coordinator's single thread.  The scanner sends
through it (``send_merge``/``send_unmerge``), and so do merge_now
(``mergenow.py``) and run=2 (``unmergeall.py``); the replies are settled by
``replies.py``.

* The runs to send are cut into requests of at most ``protocol.MAX_ITEMS``
  runs and ``MAX_PAGES_PER_REQUEST`` pages, each remembered in
  ``peer.requests`` (kind, runs, deadline) with an id that grows with every
  request, so "every request sent up to now" is an id (the barrier of a
  wait, ``waits.py``).
* A reply must name a request of its kind outstanding for that worker
  (``take``; every message is untrusted), and a worker that leaves one
  unanswered for ``REQUEST_TIMEOUT`` is dropped (``expire``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

from shmdedup import protocol
from shmdedup.errors import ProtocolError
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.scan.tracking import Run

MAX_PAGES_PER_REQUEST = 65536
REQUEST_TIMEOUT = 60.0          # a worker that does not answer is dropped


class RequestTracker:
    """Merge and unmerge requests sent to workers and not answered yet."""

    def __init__(self, peers: dict[int, Peer], outbox: Outbox) -> None:
        self.peers = peers
        self.outbox = outbox
        self._ids = itertools.count(1)
        self.last: int = 0              # id of the last request sent to a worker

    # -- sending -------------------------------------------------------------

    def send(self, peer: Peer, kind: str, runs: list[Run]) -> list[int]:
        """Send *runs* as ``kind`` ("merge" or "unmerge") requests; the ids
        of those sent (none once the connection fails)."""
        reqs = []
        i = 0
        while i < len(runs) and not peer.conn.closed:
            chunk: list[Run] = []
            pages = 0
            while i < len(runs) and len(chunk) < protocol.MAX_ITEMS and pages + runs[i].n <= MAX_PAGES_PER_REQUEST:
                chunk.append(runs[i])
                pages += runs[i].n
                i += 1
            if not chunk:  # one run longer than a request: split it
                reg, first, n, slot = runs[i]
                m = MAX_PAGES_PER_REQUEST
                runs[i:i + 1] = [Run(reg, first, m, slot), Run(reg, first + m, n - m, slot + m if slot >= 0 else slot)]
                continue
            req = self.last = next(self._ids)
            items = protocol.items_to_bytes([(reg.rid, first, n, slot if kind == "merge" else 0)
                                             for reg, first, n, slot in chunk])
            peer.requests[req] = (kind, chunk, time.monotonic() + REQUEST_TIMEOUT)
            if not self.outbox.send(peer, {"t": kind, "req": req, "items": items}, own_items=True):
                break
            reqs.append(req)
        return reqs

    def send_merge(self, peer: Peer, runs: list[Run]) -> None:
        """The scanner's merges for one worker."""
        self.send(peer, "merge", runs)

    def send_unmerge(self, peer: Peer, runs: list[Run]) -> None:
        """The scanner's unmerges for one worker."""
        self.send(peer, "unmerge", runs)

    # -- answered, outstanding, overdue ----------------------------------------

    def take(self, peer: Peer, req: int, kind: str) -> list[Run]:
        """The runs of the request a reply answers, no longer outstanding."""
        r = peer.requests.get(req)
        if r is None or r[0] != kind:
            raise ProtocolError(f"no {kind} request {req} is outstanding for this worker")
        del peer.requests[req]
        return r[1]

    def merges_in_flight(self) -> bool:
        return any(k == "merge" for p in self.peers.values() for k, _, _ in p.requests.values())

    def oldest(self) -> float:
        """The id of the oldest request still unanswered (inf: none)."""
        return min((req for p in self.peers.values() for req in p.requests), default=float("inf"))

    def deadlines(self) -> Iterator[float]:
        return (r[2] for p in self.peers.values() for r in p.requests.values())

    def expire(self, now: float) -> None:
        """Drop (at the outbox's next flush) the workers that left a request
        unanswered past its deadline."""
        for peer in list(self.peers.values()):
            if any(now >= d for _, _, d in peer.requests.values()):
                self.outbox.drop(peer, f"no reply within {REQUEST_TIMEOUT:.0f} s")


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
