"""The scanner: ksmd's algorithm over the workers' registered regions.

A cursor walks every registered region, page by page, in batches of
``pages_to_scan`` visited pages.  For each chunk of a region it first
*reconciles* (DESIGN invariant 6): pages we merged whose state byte is PRIVATE
again were broken by a copy-on-write fault, so their slot loses a sharer; a
slot with one sharer left is given back to it ("break cow once unshared", seed
patch 4); a slot with none is freed (punched).  Then, for each present
(SEEK_DATA), private, mergeable page:

1. checksum it (C, pages read with pread: never through a mapping);
2. first visit, or checksum changed since the last visit: record it, the page
   is volatile (the two-visit rule keeps churning pages out of the indexes);
3. look it up in the stable index (checksum -> slots), confirm with memcmp,
   queue a merge onto that slot;
4. else look it up in the unstable index (reset at every full scan); on a
   match confirm, copy into a fresh stable slot, queue merges for both;
5. else insert it into the unstable index.

Steps 3-5 live in ``matching.py`` (the :class:`Matcher` mixin this class
inherits).  Merges are queued per worker and sent as coalesced runs at the end
of the batch; the coordinator settles the replies here (``merge_done``,
``unmerge_done``).  The coordinator's checksum and compare are only hints: the
worker proves equality under write protection before mapping (DESIGN
invariant 1).

Per tracked page the scanner keeps 16 bytes: checksum (8), slot (4), status,
advice, age and skip count (1 each); the indexes (``indexes.py``) add 16-21
bytes per indexed page.  Statistics are derived from these arrays on demand,
so they always equal a recount.

smart_scan (Linux 6.7): a page that keeps failing to merge ages one step per
visit and is skipped for 1, 2, 4, then 8 full scans (``pages_skipped``).

Slots outlive connections, never mappings (invariants 6 and 7): a region whose
worker disconnected but may be alive is *detached* (kept, not scanned, its
sharer references held until its worker exits or its state bytes show a page
broken); closing the scanner frees nothing.  Pages a previous coordinator
merged are *inherited* (see ``_inherited``).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.controls import default_max_mappings
from shmdedup.coordinator.scan.indexes import StableIndex, UnstableIndex
from shmdedup.coordinator.scan.inline import Inliner
from shmdedup.coordinator.scan.matching import Matcher
from shmdedup.coordinator.scan.stable import StableSegment
from shmdedup.coordinator.scan.tracking import (  # noqa: F401  (re-exported: the scanner's vocabulary)
    CHUNK_PAGES, MERGED, METADATA_BYTES_PER_PAGE, NEW, PENDING, UNMERGING, UNSHARED, VOLATILE,
    ZERO, ZERO_CHECKSUM, Queued, QueuedByWorker, RegionState, Run, _coalesce, _inherited, _repeated, _unique)

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

PAGE_SIZE: int = _native.PAGE_SIZE


class Scanner(Matcher, Inliner):
    """The cursor, the two indexes, and the slot accounting; candidate
    matching (steps 3-5) comes from :class:`Matcher`, merging at write time
    (``merge_now``) from :class:`~shmdedup.coordinator.scan.inline.Inliner`.

    ``send_merge(worker, items)`` / ``send_unmerge(worker, items)`` are called
    with lists of (reg, first, npages, slot) runs; the coordinator sends them
    and later calls :meth:`merge_done` / :meth:`unmerge_done`.
    """

    def __init__(self, send_merge: Callable[[Any, list[Run]], None],
                 send_unmerge: Callable[[Any, list[Run]], None]) -> None:
        self.send_merge = send_merge
        self.send_unmerge = send_unmerge
        self.sidx: StableIndex = StableIndex()
        self.stable: StableSegment = self.sidx.segment
        self.unstable: UnstableIndex = UnstableIndex()
        self.regions: list[RegionState] = []
        self.by_uid: dict[int, RegionState] = {}
        self._uids = itertools.count()
        # Regions of workers that disconnected while perhaps still alive; they
        # hold sharer references but are not scanned (see detach_region).
        self.detached: list[RegionState] = []
        self.cursor: int = 0          # index into regions
        self.cursor_page: int = 0
        # Full scans still owed to reconciliation although nothing may be
        # advised (see settle()).
        self.settle_scans: int = 0
        self.full_scans: int = 0
        self.pages_scanned: int = 0
        self.pages_skipped: int = 0
        self._scratch: np.ndarray | None = None
        # Controls the scanner reads (the coordinator validates them).
        self.max_page_sharing = 256
        self.use_zero_pages = False
        self.smart_scan = True
        self.zero_pages_only = False  # merge_zero_pages_only: no stable slots at all
        # Each worker's mappings, estimated; merges past max_mappings are skipped.
        self.budget: MappingBudget = MappingBudget(default_max_mappings())
        # Where the last new slot went, to continue runs across batches.
        self._last_new: tuple[RegionState, int, RegionState, int, int] | None = None
        # The same for merge_now, and how long its new stable pages are kept
        # from the give-back rule (inline_keep_millisecs, in seconds).
        self._last_inline: tuple[RegionState, int, int] | None = None
        self.inline_keep: float = 30.0
        self._now = 0.0          # time.monotonic() at the start of the batch

    @property
    def sharers(self) -> np.ndarray:
        return self.sidx.sharers

    @property
    def pending(self) -> np.ndarray:
        return self.sidx.pending

    @property
    def max_kernel_pages(self) -> int:
        return self.sidx.max_pages

    @max_kernel_pages.setter
    def max_kernel_pages(self, v: int) -> None:
        self.sidx.max_pages = v

    # -- registration ----------------------------------------------------

    def add_region(self, reg: RegionState) -> None:
        reg.uid = next(self._uids)
        self.by_uid[reg.uid] = reg
        self.regions.append(reg)
        self.budget.add(reg)

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
        would punch pages out from under a live process (invariant 6)."""
        self._unlink(reg)
        self.detached.append(reg)

    def reattach_region(self, reg: RegionState, old: RegionState) -> None:
        """The worker that owned detached region ``old`` registered it again as
        ``reg`` (same process, same region): hand its slot references over."""
        self.detached.remove(old)
        held = old.slot >= 0
        reg.slot[held] = old.slot[held]
        # An unmerge that was in flight is lost with the old connection:
        # MERGED again, and the next reconcile decides anew.
        reg.status[held] = MERGED
        reg.status[old.status == ZERO] = ZERO
        reg.checksum[held] = old.checksum[held]
        old.slot[:] = -1
        old.close()
        self.budget.touch(reg, 0, reg.npages)

    def release_detached(self, reg: RegionState) -> None:
        """The worker of a detached region has exited: release its slots."""
        self.detached.remove(reg)
        self._release(reg)
        self.settle()

    def _unlink(self, reg: RegionState) -> None:
        if self._last_inline is not None and self._last_inline[0] is reg:
            self._last_inline = None
        i = self.regions.index(reg)
        del self.regions[i]
        self.by_uid.pop(reg.uid, None)
        self.budget.drop(reg)              # not scanned any more: it gets no merges
        if i < self.cursor:
            self.cursor -= 1
        elif i == self.cursor:
            self.cursor_page = 0

    def _release(self, reg: RegionState) -> None:
        merged = reg.slot[(reg.slot >= 0)]
        np.subtract.at(self.sharers, merged, 1)
        reg.slot[:] = -1
        self.sidx.free_unused(merged)
        reg.close()

    def _reconcile_detached(self) -> None:
        # A page whose state byte reads PRIVATE no longer maps its slot (the
        # break publishes PRIVATE after remapping the backing), whatever the
        # worker does next: its sharer reference can go.
        for reg in self.detached:
            gone = (reg.slot >= 0) & (reg.states[:] == _native.PRIVATE)
            if gone.any():
                slots = reg.slot[gone]
                np.subtract.at(self.sharers, slots, 1)
                reg.slot[gone] = -1
                self.sidx.free_unused(slots)

    def forget_request(self, items: list[Run]) -> None:
        """A request that will never be answered (worker gone): release its slots."""
        for reg, first, n, slot in items:
            self.budget.settled(reg.worker, 1)
            if slot >= 0:
                self.pending[slot:slot + n] -= 1
                self.sidx.free_unused(np.arange(slot, slot + n))

    def idle(self) -> bool:
        """True when there is nothing to scan (ksmd keeps quiet, seed patch 5):
        nothing advised, and no reconciliation owed (settle())."""
        return not self.settle_scans and not any(r.advice.any() for r in self.regions)

    def settle(self) -> None:
        """Pages stopped sharing without a scan to see it: advice dropped (the
        worker broke its merged pages), a region removed.  Before going idle,
        walk everything twice more: the first pass drops the broken pages'
        references and frees slots nobody shares, the second gives the pages
        left alone on a slot back to their worker (whatever the region's order
        in the first), so that counters and the stable object are right even
        when nothing is advised any more (KSM frees a stable page with its
        last mapping at ksmd's next pass).  Such a pass visits no page."""
        self.settle_scans = 2

    # -- the batch --------------------------------------------------------

    def batch(self, budget: int) -> int:
        """Visit up to ``budget`` pages from the cursor; returns pages visited.
        A batch ends at the end of a full scan, like ksmd's."""
        if not self.regions:        # nothing registered: nothing to settle either
            self._reconcile_detached()
            self.settle_scans = 0
            return 0
        visited = 0
        merges: QueuedByWorker = {}
        unmerges: QueuedByWorker = {}
        self._now = time.monotonic()
        while visited < budget and self.regions:
            if self.cursor >= len(self.regions):
                self._end_full_scan()
                break
            reg = self.regions[self.cursor]
            p0 = self.cursor_page
            if p0 >= reg.npages:
                self.cursor += 1
                self.cursor_page = 0
                continue
            p1 = min(reg.npages, p0 + CHUNK_PAGES)
            # Every advised page the cursor passes counts against the budget,
            # merged ones included (as rmap_items do in ksmd): a fully merged
            # domain costs pages_to_scan cheap visits per batch, not a full
            # scan per batch.
            passed = np.cumsum(reg.advice[p0:p1])
            if len(passed) and passed[-1] > budget - visited:
                p1 = p0 + int(np.searchsorted(passed, budget - visited)) + 1
            self.cursor_page = p1
            advised = int(passed[p1 - p0 - 1]) if p1 > p0 else 0
            visited += advised
            self._reconcile(reg, p0, p1, unmerges)
            pages = self._candidates(reg, p0, p1)
            skipped = 0
            if len(pages) and self.smart_scan:
                before = len(pages)
                pages = self._smart_skip(reg, pages)
                skipped = before - len(pages)
            self.pages_scanned += advised - skipped
            if len(pages):
                self._visit(reg, pages, merges)
        runs = {worker: _coalesce(items) for worker, items in merges.items()}
        self.budget.end_batch({worker: len(r) for worker, r in runs.items()})
        for worker, r in runs.items():
            self.send_merge(worker, r)
        for worker, items in unmerges.items():
            self.send_unmerge(worker, _coalesce(items))
        return visited

    def _candidates(self, reg: RegionState, p0: int, p1: int) -> np.ndarray:
        """Pages of [p0, p1) of ``reg`` a merge may take (the scan's and
        merge_now's): advised, private, holding data, in no merge or unmerge,
        with no slot; none while the worker's mapping budget is full (then
        not even read: they are visited again once the worker has room)."""
        cand = reg.advice[p0:p1] & (reg.states[p0:p1] == _native.PRIVATE)
        st = reg.status[p0:p1]
        cand &= (st != PENDING) & (st != UNMERGING) & (reg.slot[p0:p1] < 0)
        if cand.any() and self.budget.full(reg.worker):
            self.budget.pages_skipped += int(np.count_nonzero(cand))
            cand[:] = False
        if cand.any():
            cand &= reg.present(p0, p1)
        return np.flatnonzero(cand) + p0

    def _smart_skip(self, reg: RegionState, pages: np.ndarray) -> np.ndarray:
        """smart_scan: drop the pages still serving a skip, age the others."""
        skipping = reg.skip[pages] > 0
        if skipping.any():
            sk = pages[skipping]
            reg.skip[sk] -= 1
            self.pages_skipped += len(sk)
            pages = pages[~skipping]
            # Unlike Linux, a skipped unique page stays findable: its last
            # checksum goes back into the unstable index without a read, so a
            # twin that appears meanwhile still merges with it (the match is
            # confirmed by reading both, and proven by the worker).
            lone = sk[reg.status[sk] == UNSHARED]
            if len(lone):
                self.unstable.insert(reg.checksum[lone], reg.uid, lone)
        age = reg.age[pages]
        reg.age[pages] = np.minimum(age.astype(np.int32) + 1, 255)
        # Linux's skip_age(): after a few failed visits skip 1, 2, 4, then 8 scans.
        reg.skip[pages] = np.select([age < 3, age <= 3, age <= 5, age <= 8], [0, 1, 2, 4], 8)
        return pages

    def _end_full_scan(self) -> None:
        self._reconcile_detached()
        self.settle_scans = max(0, self.settle_scans - 1)
        self.full_scans += 1
        self.cursor = 0
        self.cursor_page = 0
        self.unstable.clear()
        self._last_new = None

    def _reconcile(self, reg: RegionState, p0: int, p1: int, unmerges: QueuedByWorker) -> None:
        self.budget.touch(reg, p0, p1 - p0)   # breaks show in the state bytes: recount
        st = reg.status[p0:p1]
        states = reg.states[p0:p1]
        broken = ((st == MERGED) | (st == ZERO)) & (states == _native.PRIVATE)
        if broken.any():
            pages = np.flatnonzero(broken) + p0
            slots = reg.slot[pages]
            slots = slots[slots >= 0]
            np.subtract.at(self.sharers, slots, 1)
            reg.slot[pages] = -1
            reg.status[pages] = VOLATILE
            self.sidx.free_unused(slots)
        merged = np.flatnonzero(st == MERGED) + p0
        if len(merged):
            slots = reg.slot[merged]
            # A stable page merge_now created is kept for inline_keep (the
            # next loader of the same bytes is usually close behind).
            lonely = merged[(self.sharers[slots] == 1) & (self.pending[slots] == 0)
                            & (self.sidx.born_inline[slots] + self.inline_keep <= self._now)]
            if len(lonely):
                reg.status[lonely] = UNMERGING
                self.sidx.retire(reg.slot[lonely])
                unmerges.setdefault(reg.worker, []).append(
                    (reg, lonely.astype(np.int64), reg.slot[lonely].astype(np.int64)))

    def _visit(self, reg: RegionState, pages: np.ndarray, merges: QueuedByWorker) -> None:
        n = len(pages)
        # One scratch buffer for the scanner's life (a chunk is at most
        # CHUNK_PAGES pages): nothing keeps a view of it past this call.
        if self._scratch is None:
            self._scratch = np.empty(CHUNK_PAGES * PAGE_SIZE, np.uint8)
        buf = self._scratch[:n * PAGE_SIZE]
        hashes = np.empty(n, np.uint64)
        _native.read_pages(reg.backing_fd, pages.astype(np.int64), buf, hashes)
        old = reg.checksum[pages]
        st = reg.status[pages]
        steady = (st != NEW) & (old == hashes)
        reg.checksum[pages] = hashes
        reg.status[pages[~steady]] = VOLATILE
        k = np.flatnonzero(steady)          # candidates, as indexes into buf
        if len(k):
            self._cmp_and_merge(reg, pages[k], hashes[k], k, buf, merges)

    # -- replies -----------------------------------------------------------

    def merge_done(self, items: list[Run], result: bytes) -> None:
        """Settle a merge request: items are (reg, first, n, slot) runs, result
        one byte per page."""
        res = np.frombuffer(result, np.uint8)
        off = 0
        touched = []
        for reg, first, n, slot in items:
            ok = res[off:off + n].astype(bool)
            off += n
            self.budget.settled(reg.worker, 1)
            self.budget.touch(reg, first, n)
            if slot >= 0:
                slots = np.arange(slot, slot + n, dtype=np.int64)
                self.pending[slot:slot + n] -= 1
                touched.append(slots[~ok])
            if reg.closed:
                # Unregistered meanwhile (closed, so unmapped): whatever
                # merged holds nothing now.
                if slot >= 0:
                    touched.append(slots[ok])
                continue
            pages = np.arange(first, first + n)
            if slot >= 0:
                reg.slot[pages[ok]] = slots[ok]
                self.sharers[slot:slot + n] += ok        # a run: distinct slots
                reg.status[pages[ok]] = MERGED
            else:
                reg.status[pages[ok]] = ZERO
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
        pages = np.flatnonzero((reg.status == MERGED) | (reg.status == ZERO) | _inherited(reg))
        reg.status[pages] = UNMERGING
        return [(reg, pages.astype(np.int64), reg.slot[pages].astype(np.int64))] if len(pages) else []

    def reset_after_unmerge(self, ok: bool) -> None:
        self.cursor = 0
        self.cursor_page = 0
        self.unstable.clear()
        self._last_new = None
        if ok:
            self.full_scans = 0

    # -- statistics --------------------------------------------------------

    def stats(self) -> dict[str, int]:
        shared = int(np.count_nonzero(self.sharers > 0))
        sharing = int(self.sharers.sum()) - shared
        unshared = zero = rmap = inherited = 0
        for reg in self.regions:
            st = reg.status
            unshared += int(np.count_nonzero(st == UNSHARED))
            zero += int(np.count_nonzero(st == ZERO))
            rmap += int(np.count_nonzero(st != NEW))
            inherited += int(np.count_nonzero(_inherited(reg)))
        volatile = max(rmap - shared - sharing - unshared - zero, 0)
        chains, dups = self.sidx.chains()
        return {
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
            "pages_inherited": inherited,
            "pages_skipped_budget": self.budget.pages_skipped,
        }

    def worker_stats(self, worker: Any) -> dict[str, int]:
        rmap = merging = zero = inherited = 0
        for reg in self.regions:
            if reg.worker is not worker:
                continue
            st = reg.status
            rmap += int(np.count_nonzero(st != NEW))
            merging += int(np.count_nonzero((st == MERGED) | (st == UNMERGING)))
            zero += int(np.count_nonzero(st == ZERO))
            inherited += int(np.count_nonzero(_inherited(reg)))
        return {
            "ksm_rmap_items": rmap,
            "ksm_merging_pages": merging,
            "ksm_zero_pages": zero,
            "ksm_inherited_pages": inherited,
            "ksm_process_profit": (merging + zero) * PAGE_SIZE - rmap * METADATA_BYTES_PER_PAGE,
            "mappings_estimate": self.budget.estimate(worker),
        }

    def close(self) -> None:
        """Close every region and the stable segment without freeing a slot:
        workers keep their merged pages, and the stable object lives on
        through their mappings until the last one is broken or unmapped."""
        for reg in self.regions + self.detached:
            reg.close()
        self.regions.clear()
        self.detached.clear()
        self.sidx.close()


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
