"""Clients waiting for full_scans.

``Waits`` is the part of the server (``server.py``) that answers a client's
``wait`` message; it runs in the coordinator's single thread.

A wait for ``full_scans`` is answered once that many full scans have ended
*and* every merge and unmerge request sent up to the end of the last of them
has been answered (or its worker is gone), so the statistics read after a
wait count the merges those scans asked for.  It is answered with an error
at its deadline.  While it waits, its client is held (``Outbox.hold``): the
client's later requests are answered after this one.

A wait ends a quiet domain's stretched pace (``wake``, the server's
``Pacing.unquiet``): a client that waits for full scans wants them at the
advisor's pace (``pacing.py``).  It does not hurry a scan that is not quiet.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

from shmdedup.coordinator.inflight import RequestTracker
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.scan.scanner import Scanner


@dataclass(eq=False)
class Wait:
    peer: Peer
    full_scans: int                 # answered once the scanner's full_scans reach this
    deadline: float                 # time.monotonic(): answered with an error then
    barrier: int | None = None      # set when full_scans is reached: the last request id sent


class Waits:
    """Waits for ``full_scans``, answered when their scans' requests are settled."""

    def __init__(self, scanner: Scanner, requests: RequestTracker, outbox: Outbox,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.scanner = scanner
        self.requests = requests
        self.outbox = outbox
        self.wake = wake
        self.waiting: list[Wait] = []

    def on_wait(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        self.waiting.append(Wait(peer, msg["full_scans"], time.monotonic() + msg["timeout"]))
        self.outbox.hold(peer)
        self.wake()
        self.settle()

    def settle(self) -> None:
        """Answer the waits that are done: their full scans ended, and every
        request sent up to the end of the last one (the *barrier*) is answered."""
        if not self.waiting:
            return
        oldest = self.requests.oldest()
        keep = []
        for w in self.waiting:
            if w.barrier is None and self.scanner.full_scans >= w.full_scans:
                # The scan's merges were sent at the end of its batch: all of
                # them have ids up to here.
                w.barrier = self.requests.last
            if w.barrier is not None and oldest > w.barrier:
                self.outbox.reply(w.peer, True, self.scanner.full_scans)
                self.outbox.unhold(w.peer)
            else:
                keep.append(w)
        self.waiting = keep

    def expire(self, now: float) -> None:
        """Answer the waits past their deadline, with an error."""
        keep = []
        for w in self.waiting:
            if now >= w.deadline:
                why = (f"full_scans {w.full_scans} reached, but requests sent in those scans are "
                       f"still unanswered" if w.barrier is not None else
                       f"timed out waiting for full_scans {w.full_scans} "
                       f"(now {self.scanner.full_scans})")
                self.outbox.reply(w.peer, False, self.scanner.full_scans, why)
                self.outbox.unhold(w.peer)
            else:
                keep.append(w)
        self.waiting = keep

    def deadlines(self) -> Iterator[float]:
        return (w.deadline for w in self.waiting)

    def forget(self, peer: Peer) -> None:
        """The client is gone: nobody to answer."""
        self.waiting = [w for w in self.waiting if w.peer is not peer]


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
