"""The coordinator's workers: their regions, and the ghosts of those gone.

``Workers`` is the part of the server (``server.py``) that answers a
worker's ``register``, ``advise`` and ``unregister`` messages, and settles
what a worker held when its connection goes (``depart``); it runs in the
coordinator's single thread.

* A region arrives as two descriptors (the backing and the state bytes,
  SCM_RIGHTS).  Caps are not offences: a region over a cap (regions or pages
  per worker, the uid's quota, descriptors short, no pidfd) is refused, told
  to the worker, and the worker keeps working unmerged.
* Failure semantics (DESIGN invariants 6 and 7): a slot is freed only when
  no live process can map it.  A worker's slots are released when its
  process has exited (a pidfd per connection tells); one that loses its
  connection while alive keeps them, held by a ``Ghost``, until it exits
  (``bury``), and takes them back if it registers the same region again.
* Releasing what a departed worker held never fails the loop: should it
  fail (no memory), what it held stays held (``settle``).
"""

from __future__ import annotations

import logging
import os
import selectors
from collections.abc import Callable, Iterable
from typing import Any

from shmdedup._shm import close_fds
from shmdedup.errors import ProtocolError
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Ghost, Peer, _exited, _same_file, peer_pidfd, process_key
from shmdedup.coordinator.quotas import Quotas, Usage
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import RegionState, Run
from shmdedup.coordinator.security import LogLimiter

log: logging.Logger = logging.getLogger("shmdedup.coordinator")


class Workers:
    """Workers' regions, and the ghosts of workers gone while perhaps alive.

    ``evict_silent(uid)`` is the admission's: it frees the place of a
    connection still without hello when a region needs descriptors;
    ``wake_scan()`` the server's: the next batch runs now."""

    def __init__(self, sel: selectors.BaseSelector, controls: dict[str, int], quotas: Quotas,
                 scanner: Scanner, outbox: Outbox, warn: LogLimiter,
                 evict_silent: Callable[[int], bool], wake_scan: Callable[[], None]) -> None:
        self.sel = sel
        self.controls = controls
        self.quotas = quotas
        self.scanner = scanner
        self.outbox = outbox
        self.warn = warn
        self.evict_silent = evict_silent
        self.wake_scan = wake_scan
        self.ghosts: dict[int, Ghost] = {}   # by pidfd

    # -- messages ----------------------------------------------------------

    def on_register(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
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
        ghost = self.ghost_of(peer)
        again = None
        if ghost is not None and ghost.uid == peer.uid:
            again = next((g for g in ghost.regions if g.rid == rid and g.npages == npages), None)
        if self.quotas.fds_full(2):
            self.evict_silent(peer.uid)   # a connection still without hello needs none
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
                self.bury(ghost)

    def _region(self, peer: Peer, rid: int) -> RegionState:
        reg = peer.regions.get(rid)
        if reg is None:
            raise ProtocolError(f"region {rid} is not registered by this worker")
        return reg

    def on_advise(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
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
        self.wake_scan()

    def on_unregister(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        if msg["rid"] in peer.refused:
            peer.refused.discard(msg["rid"])
            return
        reg = self._region(peer, msg["rid"])
        del peer.regions[reg.rid]
        peer.pages -= reg.npages
        self.scanner.remove_region(reg)
        _uncharge(self.quotas, peer.uid, _held([reg]))

    # -- departures ----------------------------------------------------------

    def depart(self, peer: Peer, merges: list[list[Run]], release: bool) -> None:
        """A worker's connection is gone, with *merges* (its merge requests)
        unanswered.  What it held is released now only if its process has
        exited; if it may still be alive (it closed the connection, or sent
        something bad) a Ghost holds it until it exits.  ``release=False``
        (shutdown) releases nothing at all."""
        q = self.quotas
        held = _held(peer.regions.values())
        if not release:
            for reg in peer.regions.values():
                reg.close()
            _uncharge(q, peer.uid, held)
        elif peer.pidfd is not None and (peer.regions or merges) and not _exited(peer.pidfd):
            # One ghost per process, however often it reconnects.  It keeps
            # its pidfd and regions' descriptors charged to its uid.
            ghost = self.ghost_of(peer)
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
                self.settle(self.scanner.detach_region, reg, peer.pid)
        else:
            for items in merges:
                self.settle(self.scanner.forget_request, items, peer.pid)
            for reg in peer.regions.values():
                self.settle(self.scanner.remove_region, reg, peer.pid)
            _uncharge(q, peer.uid, held)
        if peer.pidfd is not None:
            os.close(peer.pidfd)
            peer.pidfd = None
            q.charge(peer.uid, fds=-1)
        peer.regions.clear()

    def ghost_of(self, peer: Peer) -> Ghost | None:
        """The ghost of the process behind this connection, if it has one."""
        if peer.key is None:
            return None
        return next((g for g in self.ghosts.values() if g.key == peer.key), None)

    def bury(self, ghost: Ghost) -> None:
        """A ghost's process exited (its pidfd is readable): its mappings are
        gone, so its slots can be released."""
        self.sel.unregister(ghost.pidfd)
        del self.ghosts[ghost.pidfd]
        os.close(ghost.pidfd)
        self.quotas.charge(ghost.uid, fds=-1)
        _uncharge(self.quotas, ghost.uid, _held(ghost.regions))
        for items in ghost.merges:
            self.settle(self.scanner.forget_request, items, ghost.pid)
        for reg in ghost.regions:
            self.settle(self.scanner.release_detached, reg, ghost.pid)

    def settle(self, fn: Any, arg: Any, pid: int) -> None:
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


def _held(regions: Iterable[RegionState]) -> Usage:
    """What *regions* hold against a quota: themselves, pages, 2 descriptors each."""
    regions = list(regions)
    return Usage(regions=len(regions), pages=sum(r.npages for r in regions), fds=2 * len(regions))


def _uncharge(quotas: Quotas, uid: int, held: Usage) -> None:
    quotas.charge(uid, regions=-held.regions, pages=-held.pages, fds=-held.fds)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
