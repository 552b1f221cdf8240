"""Registration: the regions the scanner walks, and the lanes it walks them in.

:class:`Registry` is a mixin of :class:`~shmdedup.coordinator.scan.scanner.Scanner` (as
``accounting.Accounting`` is).  It adds and removes
regions, records advice (as runs: O(log runs) whatever the range), detaches
the regions of a worker that disconnected while perhaps alive (they keep
their sharer references, and only the blocks that hold them: invariant 6),
hands them back when the same process registers again, and keeps the
*lanes*: one cursor per uid over that uid's regions (:class:`Lane`), so the
scan's CPU can be shared evenly between uids.
"""

from __future__ import annotations

from typing import Any

from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.coordinator.scan.inline import Inliner
from shmdedup.coordinator.scan.tracking import MERGED, ZERO, RegionState


class Lane:
    """The cursor over one uid's regions, and the scan CPU it has had."""

    __slots__ = ("regions", "cursor", "page", "spent", "passed")

    def __init__(self, spent: float) -> None:
        self.regions: list[RegionState] = []
        self.cursor: int = 0            # index into regions
        self.page: int = 0              # page of regions[cursor]
        self.spent: float = spent       # thread CPU seconds its steps took
        self.passed: bool = False       # through all its regions since the last full scan

    @staticmethod
    def spent_of(lane: Lane) -> float:
        return lane.spent


def _lane_key(reg: RegionState) -> Any:
    return getattr(reg.worker, "uid", None)


class Registry:
    """Regions, advice, detaching and lanes for :class:`~shmdedup.coordinator.scan.scanner.Scanner`."""

    # Provided by the Scanner.
    budget: MappingBudget
    regions: list[RegionState]
    detached: list[RegionState]
    by_uid: dict[int, RegionState]
    lanes: dict[Any, Lane]
    _advised: set[RegionState]
    _uids: Any
    _release: Any                  # Accounting's: releases a region's slots
    settle: Any                    # the Scanner's: reconcile before going idle
    inliner: Inliner

    def add_region(self, reg: RegionState) -> None:
        reg.uid = next(self._uids)
        self.by_uid[reg.uid] = reg
        self.regions.append(reg)
        key = _lane_key(reg)
        lane = self.lanes.get(key)
        if lane is None:
            # A new uid starts level with the others, neither ahead nor behind.
            spent = min((ln.spent for ln in self.lanes.values()), default=0.0)
            lane = self.lanes[key] = Lane(spent)
        lane.regions.append(reg)
        self.budget.add(reg)
        if reg.advice.any():
            self._advised.add(reg)

    def advise(self, reg: RegionState, start: int, n: int, mergeable: bool) -> None:
        """Advice for pages [start, start + n) of a registered region: O(log
        runs), whatever n.  Raises ValueError past MAX_ADVICE_RUNS."""
        reg.advice.set(start, n, mergeable)
        if reg.advice.any():
            self._advised.add(reg)
        else:
            self._advised.discard(reg)

    def remove_region(self, reg: RegionState) -> None:
        """Drop a region (closed or its worker died): its merged pages stop
        sharing; pending requests are settled by :meth:`forget_request`.
        Its unstable entries go stale and are dropped when next looked up."""
        self._unlink(reg)
        self._release(reg)
        self.settle()

    def detach_region(self, reg: RegionState) -> None:
        """Stop scanning a region whose worker disconnected but may still be
        alive: it may still map our slots, so it keeps its sharer counts until
        :meth:`release_detached` (the worker exited) or until its state bytes
        show a page broken (:meth:`_reconcile_detached`).  Freeing them now
        would punch pages out from under a live process (invariant 6).  Only
        the blocks that hold a merge are kept."""
        self._unlink(reg)
        for ch in reg.table.chunks():
            reg.table.retain(ch, (ch.slot >= 0) | (ch.status == ZERO))
        self.detached.append(reg)

    def reattach_region(self, reg: RegionState, old: RegionState) -> None:
        """The worker that owned detached region ``old`` registered it again as
        ``reg`` (same process, same region): hand its slot references over."""
        self.detached.remove(old)
        for ch in old.table.chunks():
            pages = ch.pages
            held = ch.slot >= 0
            if held.any():
                p = pages[held]
                reg.slot[p] = ch.slot[held]
                # An unmerge that was in flight is lost with the old
                # connection: MERGED again, and the next reconcile decides anew.
                reg.status[p] = MERGED
                reg.checksum[p] = ch.checksum[held]
            zero = ch.status == ZERO
            if zero.any():
                reg.status[pages[zero]] = ZERO
        old.table.clear()
        old.close()
        self.budget.touch(reg, 0, reg.npages)

    def release_detached(self, reg: RegionState) -> None:
        """The worker of a detached region has exited: release its slots."""
        self.detached.remove(reg)
        self._release(reg)
        self.settle()

    def abandon(self, reg: RegionState) -> None:
        """Stop scanning a region whose release failed, holding on to what
        its pages hold (never freed: safe, if a leak)."""
        if reg in self.regions:
            self.regions.remove(reg)
            self._leave_lane(reg)
        self.by_uid.pop(reg.uid, None)
        self._advised.discard(reg)

    def _unlink(self, reg: RegionState) -> None:
        self.inliner.forget(reg)
        self.regions.remove(reg)
        self.by_uid.pop(reg.uid, None)
        self._advised.discard(reg)
        self.budget.drop(reg)              # not scanned any more: it gets no merges
        self._leave_lane(reg)

    def _leave_lane(self, reg: RegionState) -> None:
        key = _lane_key(reg)
        lane = self.lanes.get(key)
        if lane is None or reg not in lane.regions:
            return
        i = lane.regions.index(reg)
        del lane.regions[i]
        if i < lane.cursor:
            lane.cursor -= 1
        elif i == lane.cursor:
            lane.page = 0
        if not lane.regions:
            del self.lanes[key]


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
