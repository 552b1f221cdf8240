"""run=2: unmerge everything, keep the advice (seed semantics).

``UnmergeAll`` is the part of the server (``server.py``) that carries out a
``set run 2``; it runs in the coordinator's single thread.  One is in
progress at most (``run`` cannot change meanwhile, ``surface.py``), going
through these phases:

* ``IDLE``: none in progress.
* ``UNMERGING``: an unmerge request for every merged page of every worker
  is out; their replies are awaited.
* ``DRAINING``: they are answered, but merges sent before run=2 are still in
  flight; each is unmerged when it lands (``merge_landed``), which makes it
  ``UNMERGING`` again until that unmerge is answered.

It ends when no unmerge of it and no merge is outstanding: the scanner
forgets its indexes, and the client that set run=2 is answered (it was held
meanwhile, ``Outbox.hold``).  A failed unmerge leaves run at 0 and reports
why in ``last_error`` (seed patch 7).  A worker that goes away takes its
requests with it (``forget_requests``); a client that goes away is answered
by nobody (``client_gone``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from shmdedup.coordinator.inflight import RequestTracker
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import _coalesce


class Phase(enum.Enum):
    IDLE = "idle"               # no run=2 in progress
    UNMERGING = "unmerging"     # its unmerge requests are out
    DRAINING = "draining"       # they are answered; merges in flight are unmerged as they land


class UnmergeAll:
    """The run=2 in progress, if any."""

    def __init__(self, peers: dict[int, Peer], controls: dict[str, int], scanner: Scanner,
                 requests: RequestTracker, outbox: Outbox) -> None:
        self.peers = peers
        self.controls = controls
        self.scanner = scanner
        self.requests = requests
        self.outbox = outbox
        self.phase: Phase = Phase.IDLE
        self.reqs: set[int] = set()     # its unmerge requests not answered yet
        self.error: str | None = None   # why one of them failed
        self.client: Peer | None = None  # who set run=2, answered at the end
        self.last_error: str = ""       # why the last run=2 failed ("" if none did)

    @property
    def active(self) -> bool:
        return self.phase is not Phase.IDLE

    def start(self, client: Peer | None) -> None:
        """Unmerge every merged page, keep the advice.  It may end (and
        answer *client*) before this returns, when nothing was merged."""
        self.phase, self.reqs, self.error, self.client = Phase.UNMERGING, set(), None, client
        for peer in list(self.peers.values()):
            self._unmerge(peer)
        self.check()

    def _unmerge(self, peer: Peer) -> None:
        items = [t for reg in peer.regions.values() for t in self.scanner.merged_items(reg)]
        if items:
            self.reqs.update(self.requests.send(peer, "unmerge", _coalesce(items)))

    # -- what happens meanwhile --------------------------------------------

    def merge_landed(self, peer: Peer) -> None:
        """A merge reply of this worker was settled: unmerge what it merged."""
        if self.active and self.controls["run"] == 2:
            self._unmerge(peer)
        self.check()

    def unmerge_answered(self, req: int, error: str | None) -> None:
        """An unmerge reply (of run=2's, or the scanner's) was settled."""
        if not self.active:
            return
        if error is not None and req in self.reqs:
            self.error = error
        self.reqs.discard(req)
        self.check()

    def forget_requests(self, reqs: Iterable[int]) -> None:
        """A worker is gone with these requests unanswered."""
        if self.active:
            self.reqs.difference_update(reqs)

    def client_gone(self, peer: Peer) -> None:
        """A connection is gone (after its requests were forgotten)."""
        if not self.active:
            return
        if self.client is peer:
            self.client = None
        self.check()

    def check(self) -> None:
        """End the run=2 once nothing of it is outstanding."""
        if not self.active:
            return
        if self.reqs:
            self.phase = Phase.UNMERGING   # (again, when merges that landed were unmerged)
            return
        if self.requests.merges_in_flight():
            self.phase = Phase.DRAINING    # merges still in flight are unmerged when they land
            return
        client, error = self.client, self.error
        self.phase, self.client, self.error = Phase.IDLE, None, None
        ok = error is None
        self.scanner.reset_after_unmerge(ok)
        if error is not None:
            # Seed patch 7: a failed unmerge leaves run at 0 and reports why.
            self.controls["run"] = 0
            self.last_error = error
        if client is not None:
            if error is None:
                self.outbox.reply(client, True, {"run": self.controls["run"]})
            else:
                self.outbox.reply(client, False, None, error)
            self.outbox.unhold(client)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
