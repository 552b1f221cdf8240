"""Slot accounting and statistics: the part of the scanner that settles.

:class:`Accounting` is a mixin of :class:`~shmdedup.coordinator.scan.scanner.Scanner` (as
``matching.Matcher`` is): it settles the workers' replies to merge and unmerge
requests (``merge_done``, ``unmerge_done``), requests that will never be
answered (``forget_request``), the slots of regions that go away
(``_release``) or whose worker disconnected alive (``_reconcile_detached``),
and derives KSM's statistics from the scanner's per-page state on demand, so
they always equal a recount.

Invariant 6 (DESIGN.md): a slot is freed only at zero sharers and nothing
pending; sharer counts follow the workers' state bytes (a page whose state
byte reads PRIVATE no longer maps its slot).  Everything here walks the
blocks the scanner keeps (``pagetable``) and the state bytes that hold data,
so its cost follows what workers hold, not the sizes they claim.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.coordinator.scan.indexes import StableIndex
from shmdedup.coordinator.scan.stable import StableSegment
from shmdedup.coordinator.scan.tracking import (
    MERGED, METADATA_BYTES_PER_PAGE, NEW, UNMERGING, UNSHARED, VOLATILE, ZERO, Queued, RegionState,
    Run, count_inherited, inherited_pages)
from shmdedup.pages import PAGE_SIZE

log: logging.Logger = logging.getLogger("shmdedup.coordinator")


class Accounting:
    """Replies, releases and statistics for :class:`~shmdedup.coordinator.scan.scanner.Scanner`."""

    # Provided by the Scanner.
    sidx: StableIndex
    stable: StableSegment
    budget: MappingBudget
    regions: list[RegionState]
    detached: list[RegionState]
    pages_scanned: int
    pages_skipped: int
    full_scans: int

    if TYPE_CHECKING:
        @property
        def sharers(self) -> np.ndarray: ...       # per slot: confirmed sharers
        @property
        def pending(self) -> np.ndarray: ...       # per slot: merges in flight

    # -- releases ----------------------------------------------------------

    def _release(self, reg: RegionState) -> None:
        held = [ch.slot[ch.slot >= 0] for ch in reg.table.chunks()]
        merged = np.concatenate(held) if held else np.zeros(0, np.int32)
        np.subtract.at(self.sharers, merged, 1)
        reg.table.clear()
        self.sidx.free_unused(merged)
        reg.close()

    def _reconcile_detached(self) -> None:
        # A page whose state byte reads PRIVATE no longer maps its slot (the
        # break publishes PRIVATE after remapping the backing), whatever the
        # worker does next: its sharer reference can go.  A state byte that
        # cannot be read keeps its reference (a slot held too long is safe).
        for reg in self.detached:
            try:
                for ch in reg.table.chunks():
                    held = np.flatnonzero(ch.slot >= 0)
                    if not len(held):
                        continue
                    gone = held[reg.states[ch.pages[held]] == _native.PRIVATE]
                    if len(gone):
                        slots = ch.slot[gone].copy()
                        np.subtract.at(self.sharers, slots, 1)
                        ch.slot[gone] = -1
                        self.sidx.free_unused(slots)
            except (OSError, MemoryError) as e:
                log.warning("pid %s: cannot read the state bytes of detached region %d (%s); "
                            "its stable pages stay held", getattr(reg.worker, "pid", "?"), reg.rid, e)

    def forget_request(self, items: list[Run]) -> None:
        """A request that will never be answered (worker gone): release its slots."""
        for reg, first, n, slot in items:
            self.budget.settled(reg.worker, 1)
            if slot >= 0:
                self.pending[slot:slot + n] -= 1
                self.sidx.free_unused(np.arange(slot, slot + n))

    # -- replies -----------------------------------------------------------

    def merge_done(self, items: list[Run], result: bytes) -> None:
        """Settle a merge request: items are (reg, first, n, slot) runs, result
        one byte per page.  Each run is written to the page table as slices
        (a run's pages and slots both advance by one)."""
        every = b"\0" not in result            # all merged (the common case): no mask
        res = None if every else np.frombuffer(result, np.uint8).astype(bool)
        off = 0
        touched = []
        for reg, first, n, slot in items:
            ok = res[off:off + n] if res is not None else np.ones(0, bool)
            off += n
            self.budget.settled(reg.worker, 1)
            self.budget.touch(reg, first, n)
            all_ok = res is None or bool(ok.all())
            if slot >= 0:
                self.pending[slot:slot + n] -= 1
                if not all_ok:
                    touched.append(np.arange(slot, slot + n, dtype=np.int64)[~ok])
            if reg.closed:
                # Unregistered meanwhile (closed, so unmapped): whatever
                # merged holds nothing now.
                if slot >= 0:
                    touched.append(np.arange(slot, slot + n, dtype=np.int64) if all_ok
                                   else np.arange(slot, slot + n, dtype=np.int64)[ok])
                continue
            if all_ok:
                if slot >= 0:
                    self.sharers[slot:slot + n] += 1      # a run: distinct slots
                    reg.table.assign_range(first, first + n, {
                        "slot": np.arange(slot, slot + n, dtype=np.int32), "status": MERGED})
                else:
                    reg.table.assign_range(first, first + n, {"status": ZERO})
                continue
            pages = np.arange(first, first + n, dtype=np.int64)
            good = pages[ok]
            if slot >= 0:
                self.sharers[slot:slot + n] += ok
                reg.slot[good] = np.arange(slot, slot + n, dtype=np.int64)[ok]
            reg.status[good] = MERGED if slot >= 0 else ZERO
            # Refused by the worker's proof: the page changed under us.
            reg.status[pages[~ok]] = VOLATILE
        for slots in touched:
            self.sidx.free_unused(slots)

    def unmerge_done(self, items: list[Run]) -> None:
        """Settle an unmerge request (successful or not: the state bytes tell
        which pages are private now)."""
        for reg, first, n, _ in items:
            if reg.closed:
                continue
            self.budget.touch(reg, first, n)
            pages = np.arange(first, first + n)
            private = reg.states[pages] == _native.PRIVATE
            slots = reg.slot[pages]
            freed = slots[private & (slots >= 0)]
            np.subtract.at(self.sharers, freed, 1)
            # KSM computes the checksum now so the page gets a quick chance to
            # enter the unstable index (or the stable one) at its next visit.
            reg.checksum[pages[private & (slots >= 0)]] = self.sidx.slot_hash[freed]
            reg.slot[pages[private]] = -1
            reg.status[pages[private]] = VOLATILE
            still = pages[~private]
            # Still merged: on our slot, on the zero page, or (no slot, not a
            # zero page) on a previous coordinator's stable object.
            reg.status[still] = np.where(reg.slot[still] >= 0, MERGED,
                                         np.where(reg.states[still] == _native.ZERO, ZERO, NEW))
            self.sidx.free_unused(freed)

    def merged_items(self, reg: RegionState) -> list[Queued]:
        """(reg, pages, slots) of every merged page of a region (for run=2),
        inherited ones included: run=2 unmerges everything."""
        pages, slots = [], []
        for ch in reg.table.chunks():
            m = np.flatnonzero((ch.status == MERGED) | (ch.status == ZERO))
            if len(m):
                ch.status[m] = UNMERGING
                pages.append(ch.pages[m])
                slots.append(ch.slot[m].astype(np.int64))
        inherited = inherited_pages(reg)
        if len(inherited):
            reg.status[inherited] = UNMERGING
            pages.append(inherited.astype(np.int64))
            slots.append(np.full(len(inherited), -1, np.int64))
        if not pages:
            return []
        return [(reg, np.concatenate(pages).astype(np.int64), np.concatenate(slots))]

    # -- statistics --------------------------------------------------------

    def _counts(self) -> dict[Any, tuple[np.ndarray, int]]:
        """Per worker: (pages per status, inherited pages) over its regions.
        One concatenation and one bincount per worker, one seek per region
        (inherited pages are read only where the state bytes hold data): the
        cost follows the blocks the scanner keeps, not the regions' sizes."""
        statuses: dict[Any, list[np.ndarray]] = {}
        inherited: dict[Any, int] = {}
        for reg in self.regions:
            statuses.setdefault(reg.worker, []).extend(ch.status for ch in reg.table.chunks())
            inherited[reg.worker] = inherited.get(reg.worker, 0) + count_inherited(reg)
        return {w: (_histogram(np.concatenate(st)) if st else np.zeros(UNMERGING + 1, np.int64),
                    inherited[w])
                for w, st in statuses.items()}

    def stats(self) -> dict[str, int]:
        """KSM's counters."""
        return self.counters([])[0]

    def counters(self, workers: list[Any]) -> tuple[dict[str, int], dict[Any, dict[str, int]]]:
        """KSM's counters, and for each of ``workers`` what
        /proc/<pid>/ksm_stat shows, from the same pass over the regions."""
        per = self._counts()
        shared = int(np.count_nonzero(self.sharers > 0))
        sharing = int(self.sharers.sum()) - shared
        total = sum((c for c, _ in per.values()), np.zeros(UNMERGING + 1, np.int64))
        unshared, zero = int(total[UNSHARED]), int(total[ZERO])
        rmap = int(total[NEW + 1:].sum())
        volatile = max(rmap - shared - sharing - unshared - zero, 0)
        chains, dups = self.sidx.chains()
        out = {
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": volatile,
            "pages_scanned": self.pages_scanned,
            "full_scans": self.full_scans,
            "ksm_zero_pages": zero,
            "pages_skipped": self.pages_skipped,
            "stable_node_chains": chains,
            "stable_node_dups": dups,
            "general_profit": (sharing + zero) * PAGE_SIZE - rmap * METADATA_BYTES_PER_PAGE,
            "rmap_items": rmap,
            "stable_pages_allocated": self.stable.pages_in_use,
            "pages_inherited": sum(i for _, i in per.values()),
            "pages_skipped_budget": self.budget.pages_skipped,
        }
        return out, {w: self._worker_line(w, per.get(w)) for w in workers}

    def worker_stats(self, worker: Any) -> dict[str, int]:
        """What /proc/<pid>/ksm_stat shows, for one worker."""
        return self.counters([worker])[1][worker]

    def _worker_line(self, worker: Any, got: tuple[np.ndarray, int] | None) -> dict[str, int]:
        counts, inherited = got if got is not None else (np.zeros(UNMERGING + 1, np.int64), 0)
        rmap = int(counts[NEW + 1:].sum())
        merging = int(counts[MERGED] + counts[UNMERGING])
        zero = int(counts[ZERO])
        return {
            "ksm_rmap_items": rmap,
            "ksm_merging_pages": merging,
            "ksm_zero_pages": zero,
            "ksm_inherited_pages": inherited,
            "ksm_process_profit": (merging + zero) * PAGE_SIZE - rmap * METADATA_BYTES_PER_PAGE,
            "mappings_estimate": self.budget.estimate(worker),
        }


def _histogram(status: np.ndarray) -> np.ndarray:
    """Pages per status value (one count_nonzero per value: ~6x quicker than
    bincount on uint8, which converts the whole array first)."""
    return np.array([np.count_nonzero(status == v) for v in range(UNMERGING + 1)], np.int64)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
