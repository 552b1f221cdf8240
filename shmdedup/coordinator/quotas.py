"""Quotas per uid: what the peers of each user may hold in the coordinator.

Caps per connection (``max_regions_per_worker``...) alone let one user stop the
domain for everyone: the same pair of objects registered again and again over a
few connections held two descriptors each until ``RLIMIT_NOFILE``, and idle
connections took every slot.  So usage is also counted per uid:

* **What is counted.**  Connections (with or without a hello), regions, tracked
  pages (the regions' sizes) and descriptors held: a connection's socket and
  pidfd, two per region, the stable segment's descriptor while a welcome waits
  in a connection's queue.  A ghost (a worker that disconnected while alive)
  keeps its pidfd and its regions charged to its uid until its process exits.
  Counting is incremental, at every place a descriptor is taken or given back;
  :func:`recount` counts from scratch (the tests compare the two).
* **Who is capped.**  Each uid other than the coordinator's own is held to the
  ``max_*_per_uid`` controls, and all of them together to three quarters of
  ``max_connections`` and of the descriptor budget: the last quarter is kept for
  the coordinator's uid, which is bounded only by the global caps (same uid =
  same trust) plus ``CLIENT_RESERVE`` connections past ``max_connections`` that
  may only say hello as clients, so its CLI always gets in.
* **The descriptor budget** (``max_fds``, 0: automatic) is what the soft
  ``RLIMIT_NOFILE`` leaves once the descriptors open when the coordinator
  starts (an embedding application's included) and a reserve for the loop
  itself, the client reserve and the metrics server are set aside.  A
  standalone coordinator first raises its soft limit to the hard one
  (:func:`raise_nofile_limit`).

Every refusal is a reason string, never an exception: a connection past a cap is
closed at accept (logged), a registration past one is answered ``ok: false``
and the region keeps working unmerged.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from shmdedup.stats import UidStats

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

FD_RESERVE = 64          # the loop's own: listener, selector, wake pipe, stable segment, logs
CLIENT_RESERVE = 8       # owner connections past max_connections, for clients only
MIN_FD_BUDGET = 16
OWNER_SHARE = 4          # 1/OWNER_SHARE of max_connections and of max_fds is the owner's alone


@dataclass
class Usage:
    """What one uid's peers (or all peers) hold."""
    connections: int = 0
    regions: int = 0
    pages: int = 0
    fds: int = 0

    def empty(self) -> bool:
        return not (self.connections or self.regions or self.pages or self.fds)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped by fs.nr_open);
    return (old, new) soft limits.  For a standalone coordinator only: an
    embedding application may rely on select() and fds under 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY or target > 1 << 20:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = min(int(f.read()), target if target != resource.RLIM_INFINITY else 1 << 30)
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError) as e:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, e)
    return soft, soft


def descriptor_budget(reserve: int) -> int:
    """Descriptors the coordinator may hold for its peers: the soft
    RLIMIT_NOFILE minus those open now and *reserve*."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return max(MIN_FD_BUDGET, soft - open_now - reserve)


def recount(peers: Iterable[Any], ghosts: Iterable[Any]) -> dict[int, Usage]:
    """Usage per uid counted from scratch, from the connections and ghosts
    (what the incremental counts of :class:`Quotas` must always equal)."""
    out: dict[int, Usage] = {}
    for p in peers:
        u = out.setdefault(p.uid, Usage())
        u.connections += 1
        u.fds += 1 + (p.pidfd is not None) + p.unsent.fds
        _add_regions(u, p.regions.values())
    for g in ghosts:
        u = out.setdefault(g.uid, Usage())
        u.fds += 1
        _add_regions(u, g.regions)
    return {uid: u for uid, u in out.items() if not u.empty()}


def _add_regions(u: Usage, regions: Iterable[Any]) -> None:
    for r in regions:
        u.regions += 1
        u.pages += r.npages
        u.fds += 2


class Quotas:
    """Usage per uid and the checks against the caps (see module docstring).

    ``controls`` is the coordinator's live controls dict (caps set at run time
    apply at once); ``owner`` is the coordinator's uid; ``auto_fds`` the
    budget ``max_fds`` = 0 stands for.
    """

    def __init__(self, controls: dict[str, int], owner: int, auto_fds: int) -> None:
        self.controls = controls
        self.owner = owner
        self.auto_fds = auto_fds
        self.by_uid: dict[int, Usage] = {}
        self.total: Usage = Usage()
        self.others: Usage = Usage()          # every uid but the owner's

    # -- limits ---------------------------------------------------------------

    def max_fds(self) -> int:
        return self.controls["max_fds"] or self.auto_fds

    def max_fds_per_uid(self) -> int:
        return self.controls["max_fds_per_uid"] or max(1, self.max_fds() // OWNER_SHARE)

    def _others_share(self, total: int) -> int:
        return total - max(1, total // OWNER_SHARE)

    # -- accounting -----------------------------------------------------------

    def usage(self, uid: int) -> Usage:
        return self.by_uid.get(uid) or Usage()

    def charge(self, uid: int, connections: int = 0, regions: int = 0, pages: int = 0,
               fds: int = 0) -> None:
        """Add to (or, with negative numbers, take from) *uid*'s usage."""
        u = self.by_uid.setdefault(uid, Usage())
        for acc in (u, self.total) + ((self.others,) if uid != self.owner else ()):
            acc.connections += connections
            acc.regions += regions
            acc.pages += pages
            acc.fds += fds
        if u.empty():
            del self.by_uid[uid]

    # -- checks (a reason, or None) -------------------------------------------

    def connection_refusal(self, uid: int) -> str | None:
        """Per-uid and owner-reserve checks for a new connection (2 descriptors:
        the socket and a pidfd).  The global cap is the caller's (it may evict)."""
        if uid == self.owner:
            return None
        c = self.controls
        u = self.usage(uid)
        if u.connections >= c["max_connections_per_uid"]:
            return f"uid {uid} has {u.connections} connections already (max_connections_per_uid)"
        share = self._others_share(c["max_connections"])
        if self.others.connections >= share:
            return (f"other uids hold {self.others.connections} connections, the most they may "
                    f"(a quarter of max_connections is kept for uid {self.owner})")
        return self._fd_refusal(uid, 2)

    def fds_full(self, n: int = 2) -> bool:
        """True when *n* more descriptors would pass the budget."""
        return self.total.fds + n > self.max_fds()

    def region_refusal(self, uid: int, npages: int, freed: Usage | None = None) -> str | None:
        """Checks for one more region of *npages* pages (2 descriptors) of *uid*;
        *freed* is what registering it gives back at once (the same region
        taken back from the uid's ghost)."""
        freed = freed or Usage()
        c = self.controls
        if uid != self.owner:
            u = self.usage(uid)
            if u.regions - freed.regions + 1 > c["max_regions_per_uid"]:
                return f"uid {uid} has {u.regions} regions already (max_regions_per_uid)"
            if u.pages - freed.pages + npages > c["max_pages_per_uid"]:
                return (f"uid {uid} has {u.pages} + {npages} pages, over max_pages_per_uid "
                        f"{c['max_pages_per_uid']}")
            why = self._fd_refusal(uid, 2 - freed.fds)
            if why:
                return why
        if self.total.fds - freed.fds + 2 > self.max_fds():
            return (f"the coordinator holds {self.total.fds} descriptors for its peers "
                    f"(max_fds {self.max_fds()})")
        return None

    def _fd_refusal(self, uid: int, n: int) -> str | None:
        u = self.usage(uid)
        if u.fds + n > self.max_fds_per_uid():
            return (f"uid {uid} holds {u.fds} descriptors in the coordinator "
                    f"(max_fds_per_uid {self.max_fds_per_uid()})")
        share = self._others_share(self.max_fds())
        if self.others.fds + n > share:
            return (f"other uids hold {self.others.fds} descriptors in the coordinator, the most "
                    f"they may (a quarter of max_fds is kept for uid {self.owner})")
        if self.fds_full(n):
            return f"the coordinator holds {self.total.fds} descriptors for its peers (max_fds {self.max_fds()})"
        return None

    def stats(self, uid: int | None = None) -> list[UidStats]:
        """One line per uid with usage (only *uid*'s if given)."""
        return [UidStats(uid=u, connections=usage.connections, regions=usage.regions,
                         pages=usage.pages, fds=usage.fds)
                for u, usage in sorted(self.by_uid.items()) if uid is None or u == uid]


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
