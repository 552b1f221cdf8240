"""Merging at write time: the coordinator's side of ``Region.merge_now``.

The scan merges what already exists, two visits apart; a worker that declares
a range final asks for it to be merged now.  :class:`Inliner` (a collaborator
of the :class:`~shmdedup.coordinator.scan.scanner.Scanner`, which owns it, as it
owns :class:`~shmdedup.coordinator.scan.matching.Matcher`) turns one such request
into merges, in one pass over the range:

1. the candidates: advised, PRIVATE pages with data (holes are never read),
   not already in a merge or an unmerge, within the worker's mapping budget
   (the scan's own rule: the scanner's ``_candidates``, given to the
   constructor, as is its walk over the chunks with something to do);
2. pages whose worker-sent checksum (a hint) names a stable page with room
   under ``max_page_sharing``: a merge onto it is queued without a read (the
   worker proves equality under write protection, invariant 1; a wrong hint
   only makes that proof fail, and the page stays private);
3. the others are read with pread and checksummed here (invariant 4), then
   looked up in the stable index again and confirmed by a compare;
   3a. when the worker sent checksums, the pages they found nothing for are
   most likely new: each is read, checksummed and written into a new stable
   slot in one pass (``StableIndex.copy_new``, 64 pages at a time, while the
   bytes are in cache), then indexed under the checksum computed here; a
   page that turns out equal to a stable page, or to an earlier page of the
   range, is compared byte for byte with it (read back from its new slot)
   and merged onto it, and its new slot is freed before anyone maps it.
   The copies are most of merge_now's cost, and this makes them one pass
   over memory instead of two;
4. each remaining page becomes a stable page at once: its bytes, as read here,
   are written into a new stable slot (runs of pages into runs of slots, one
   pwrite each, continuing the slots of the pages before them so that a
   streaming load maps onto one long run), indexed by the checksum computed
   here, and a merge onto it is queued.  Pages with equal bytes inside the
   range share one new slot.  What enters the stable index is what the
   coordinator read and hashed itself, never a checksum a worker sent.

The two-visit rule is waived for these pages only, for this request.  Limits
apply as to the scan: ``max_kernel_pages`` (no new slot past it),
``max_page_sharing`` (a full slot gets a twin), the mapping budget (merges past
it are skipped and counted in ``pages_skipped_budget``), ``use_zero_pages`` and
``merge_zero_pages_only``.  A page that cannot get a stable slot because the
shared-memory filesystem is full stays private; the request reports ENOSPC.

A stable page created here starts with one sharer (the worker that asked); the
scan would give it back at once ("break cow once unshared"), before the next
process with the same bytes arrives.  So its creation time is recorded
(``born_inline``), and the give-back rule applies to it only once
``inline_keep_millisecs`` have passed since (then within a full scan).

Concurrent requests for the same content converge on one stable copy: the
coordinator handles one message at a time, and a new slot is in the stable
index (with a pending merge holding it, invariant 6) before the next request
is looked at.

What it works with is given to its constructor: the scan's settings
(``settings.py``), the stable index (``indexes.py``), the mapping budget
(``budget.py``), the merge queue (``mergequeue.py``), the scanner's read
buffer, and the scanner's candidate selection and chunk walk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.budget import FRESH_KEY, MappingBudget
from shmdedup.coordinator.scan.indexes import StableIndex
from shmdedup.coordinator.scan.mergequeue import MergeQueue
from shmdedup.coordinator.scan.pagetable import CHUNK_PAGES
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.coordinator.scan.tracking import (
    VOLATILE, ZERO_CHECKSUM, QueuedByWorker, RegionState, Run,
    _coalesce, _first_of_each)
from shmdedup.pages import PAGE_SIZE, cut_runs

# Pages copied at a time by 3a (read, checksummed, written): 256 KiB stay in L2.
_COPY_PIECE = 64


@dataclass
class InlineResult:
    """What one merge_now request queued and met."""
    runs: list[Run]             # (reg, first, n, slot) merge runs for the worker
    queued: int = 0             # pages queued for a merge
    created: int = 0            # of which onto stable pages created for them
    waiting: bool = False       # pages of the range have a merge in flight already
    enospc: str = ""            # why stable pages could not be written, if they could not


class Inliner:
    """``merge_inline`` for :class:`~shmdedup.coordinator.scan.scanner.Scanner`."""

    def __init__(self, settings: ScanSettings, sidx: StableIndex, budget: MappingBudget,
                 queue: MergeQueue, scratch: np.ndarray,
                 candidates: Callable[[RegionState, int, int, np.ndarray | None, np.ndarray | None],
                                      tuple[np.ndarray, bool]],
                 next_chunk: Callable[[RegionState, int], int | None]) -> None:
        self.settings: ScanSettings = settings
        self.sidx: StableIndex = sidx                # per slot: sharers, pending (merges in flight)
        self.budget: MappingBudget = budget
        self.queue: MergeQueue = queue
        # The scanner's read buffer (CHUNK_PAGES pages; the coordinator runs
        # one thing at a time, and no view of it outlives a call).
        self.scratch: np.ndarray = scratch
        # Scanner._candidates: the pages of [p0, p1) a merge may take (the
        # scan's rule), given their state bytes and slots, and whether one is
        # in a merge already.
        self.candidates: Callable[[RegionState, int, int, np.ndarray | None, np.ndarray | None],
                                  tuple[np.ndarray, bool]] = candidates
        # Scanner._next_chunk: the first chunk at or after a page with something to do.
        self.next_chunk: Callable[[RegionState, int], int | None] = next_chunk
        # (region, last page, its new slot) of the last stable pages created.
        self._last_inline: tuple[RegionState, int, int] | None = None

    def forget(self, reg: RegionState) -> None:
        """``reg`` is no longer scanned: no run of new slots continues it."""
        if self._last_inline is not None and self._last_inline[0] is reg:
            self._last_inline = None

    def merge_inline(self, reg: RegionState, first: int, n: int,
                     hints: np.ndarray | None = None) -> InlineResult:
        """Queue merges for the pages of [first, first + n) of ``reg`` (see
        the module docstring); returns the runs to send and what happened.
        ``hints``: the worker's checksum of each page of the range, or None."""
        merges: QueuedByWorker = {}
        out = InlineResult([])
        failures = self.sidx.write_failures
        end = first + n
        # Only chunks with data or state to look at: a range of holes, however
        # long, costs a look for data (the scanner's own walk, next_chunk).
        try:
            for p0, p1 in self._spans(reg, first, end):
                # The state bytes and slots of the chunk, the one before (the
                # last request's, whose reply left both to recount) and the
                # first page after, read once: for the candidates, and for
                # the mapping budget, which answers its stretch keys from
                # them meanwhile (those recounts included).
                base = (p0 // CHUNK_PAGES) * CHUNK_PAGES
                a, b = max(base - CHUNK_PAGES, 0), min(base + CHUNK_PAGES + 1, reg.npages)
                states = reg.states[a:b]
                held = reg.table.next_chunk(a // CHUNK_PAGES)
                slot = reg.slot[a:b] if held is not None and held * CHUNK_PAGES < b else None
                self.budget.prime(reg, a, states, slot)
                pages, waiting = self.candidates(reg, p0, p1, states[p0 - a:p1 - a],
                                                 None if slot is None else slot[p0 - a:p1 - a])
                out.waiting |= waiting
                if len(pages):
                    h = None if hints is None else hints[pages - first]
                    self._inline_chunk(reg, pages, h, merges, out)
        finally:
            self.budget.unprime()
        if self.sidx.write_failures != failures:
            out.enospc = self.sidx.write_error
        items = merges.get(reg.worker, [])
        if items:
            out.runs = _coalesce(items)
            out.queued = sum(r.n for r in out.runs)
        return out

    def _spans(self, reg: RegionState, first: int, end: int) -> Iterator[tuple[int, int]]:
        """[p0, p1) of each chunk of [first, end) that holds advised data or
        the scanner's state, in order."""
        p = first
        while p < end:
            c = self.next_chunk(reg, p)
            if c is None or c * CHUNK_PAGES >= end:
                return
            p0 = max(p, c * CHUNK_PAGES)
            p1 = min(end, (c + 1) * CHUNK_PAGES, reg.npages)
            yield p0, p1
            p = p1

    def _inline_chunk(self, reg: RegionState, pages: np.ndarray, hints: np.ndarray | None,
                      merges: QueuedByWorker, out: InlineResult) -> None:
        # 2. Hints that name a stable page: merge without reading (0: the
        # worker saw no data or no private page there).
        if hints is not None and not self.settings.zero_pages_only:
            hinted = np.flatnonzero(hints != 0)
            hit = np.zeros(len(pages), bool)
            hit[hinted] = self._queue_onto_heads(reg, pages[hinted], hints[hinted], None, merges)
            pages = pages[~hit]
            if not len(pages):
                return
        # 3. Read and checksum the rest here: pages the worker's checksums
        # say are new are copied into new stable slots on the way (3a).
        if hints is not None and not (self.settings.use_zero_pages or self.settings.zero_pages_only) \
                and self._copy_new(reg, pages, merges, out):
            return
        nn = len(pages)
        buf = self.scratch[:nn * PAGE_SIZE]
        hashes = np.empty(nn, np.uint64)
        _native.read_pages(reg.backing_fd, pages.astype(np.int64), buf, hashes)
        reg.checksum[pages] = hashes
        rows = buf.reshape(-1, PAGE_SIZE)
        todo = np.ones(nn, bool)
        if self.settings.use_zero_pages or self.settings.zero_pages_only:
            zi = [i for i in np.flatnonzero(hashes == ZERO_CHECKSUM).tolist() if _native.is_zero(rows[i])]
            if zi:
                self.queue.add(merges, reg, pages[zi], np.full(len(zi), -1))
                todo[zi] = False
        if self.settings.zero_pages_only:    # no stable page, ever: the rest stays private
            reg.status[pages[todo]] = VOLATILE
            return
        idx = np.flatnonzero(todo)
        while len(idx):
            hit = self._queue_onto_heads(reg, pages[idx], hashes[idx], (buf, idx), merges)
            idx = idx[~hit]
            if not len(idx):
                break
            # 4. New stable pages: the first page of each checksum; equal pages
            # after it find that slot at the next round (or, past
            # max_page_sharing, get the next slot).
            firsts = _first_of_each(hashes[idx])
            made = self._new_stable(reg, pages, hashes, rows, idx[firsts], merges)
            out.created += made
            if made < len(firsts):
                # No slot (max_kernel_pages, the budget, a full tmpfs): pages
                # with those checksums stay private this time.
                lost = np.isin(hashes[idx], hashes[idx[firsts]][made:])
                reg.status[pages[idx[lost]]] = VOLATILE
                keep = np.ones(len(idx), bool)
                keep[firsts] = False
                idx = idx[keep & ~lost]
            else:
                keep = np.ones(len(idx), bool)
                keep[firsts] = False
                idx = idx[keep]

    def _copy_new(self, reg: RegionState, pages: np.ndarray, merges: QueuedByWorker,
                  out: InlineResult) -> bool:
        """3a. The pages left after the hints (the worker found no stable
        page for them: most likely new content) are read, checksummed and
        written into a run of new stable slots in one pass (``copy_new``),
        not read into the buffer first and written from it later (the
        copies are most of merge_now's cost).  Then, as in 3 and 4:
        a page whose checksum names a stable page, or repeats an earlier page
        of the range, is compared byte for byte with it and merged onto it
        where equal (its new slot is freed); every other page keeps its slot,
        indexed under the checksum computed here.  Returns False, having done
        nothing, when the run does not fit (mapping budget, max_kernel_pages,
        the segment): the caller then takes the way of 3 and 4."""
        n = len(pages)
        starts, ends = cut_runs(pages)
        keys = FRESH_KEY + 8 * np.repeat(np.arange(len(starts)), ends - starts)
        fit, cost = self.budget.room(reg, pages, keys)
        if fit < n:
            return False
        pages = np.ascontiguousarray(pages, np.int64)
        got = self.sidx.copy_new(reg.backing_fd, pages, self.scratch[:_COPY_PIECE * PAGE_SIZE],
                                 self._continue_at(reg, int(pages[0])))
        if got is None:
            return False
        self.budget.commit(reg.worker, cost)
        s, hashes, written = got
        if written < n:           # a full tmpfs: the pages not written stay private
            reg.status[pages[written:]] = VOLATILE
            pages, hashes = pages[:written], hashes[:written]
        if not written:
            return True
        reg.checksum[pages] = hashes
        slots = np.arange(s, s + written, dtype=np.int64)
        # Twins: a stable page with this checksum already, or an earlier page
        # of the range.  The others enter the index and the merge queue
        # first (a twin of an earlier page then finds that page's slot, with
        # its merge counted against max_page_sharing); then the twins are
        # compared with their stable page, read back from their new slots.
        twin = self.sidx.lookup(hashes) >= 0
        if written > 1:
            later = np.ones(written, bool)
            later[_first_of_each(hashes)] = False
            twin |= later
        keep = np.flatnonzero(~twin)
        self.sidx.index_new(slots[keep], hashes[keep])
        self._keep_new(reg, pages[keep], slots[keep], merges, out)
        ti = np.flatnonzero(twin)
        if not len(ti):
            return True
        buf = self.scratch[:len(ti) * PAGE_SIZE]
        _native.read_pages(self.sidx.fd, slots[ti], buf)
        done = self._queue_onto_heads(reg, pages[ti], hashes[ti], (buf, np.arange(len(ti))), merges)
        freed = slots[ti[done]]                 # merged onto their twins: never mapped
        for a, e in zip(*(x.tolist() for x in cut_runs(freed))):
            self.sidx.segment.free(int(freed[a]), e - a)
        # The rest (a checksum collision, or a twin with no room left under
        # max_page_sharing) are pages of their own, indexed one checksum at
        # a time so that each chain links every one of them.
        rest = ti[~done]
        while len(rest):
            first = _first_of_each(hashes[rest])
            now = rest[first]
            self.sidx.index_new(slots[now], hashes[now])
            self._keep_new(reg, pages[now], slots[now], merges, out)
            left = np.ones(len(rest), bool)
            left[first] = False
            rest = rest[left]
        return True

    def _keep_new(self, reg: RegionState, pages: np.ndarray, slots: np.ndarray,
                  merges: QueuedByWorker, out: InlineResult) -> None:
        """Pages copied into new slots of their own (indexed): queue their
        merges, and note when the slots were made and where the run ends."""
        if not len(pages):
            return
        self.sidx.born_inline[slots] = time.monotonic()
        self._last_inline = (reg, int(pages[-1]), int(slots[-1]))
        self.queue.add(merges, reg, pages, slots, checked=True)
        out.created += len(pages)

    def _continue_at(self, reg: RegionState, p0: int) -> int | None:
        """The slot that continues the run of the page before p0 (so that a
        streaming load, and every process mapping the same pages later,
        gets one run), if any."""
        last = self._last_inline
        if last is not None and last[0] is reg and last[1] == p0 - 1:
            return last[2] + 1
        if p0 > 0 and reg.slot[p0 - 1] >= 0:
            return int(reg.slot[p0 - 1]) + 1
        return None

    def _queue_onto_heads(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray,
                          content: tuple[np.ndarray, np.ndarray] | None, merges: QueuedByWorker) -> np.ndarray:
        """Queue merges of pages onto the stable page their checksum names
        (the newest of its chain) while it has room; with ``content`` (the
        read buffer and each page's index in it) only where the bytes compare
        equal.  Returns which pages were queued."""
        head = self.sidx.lookup(hashes)
        ci = np.flatnonzero(head >= 0)
        done = np.zeros(len(pages), bool)
        if not len(ci):
            return done
        cs = head[ci]
        if content is not None:
            buf, bidx = content
            eq = np.frombuffer(_native.compare_slots(buf, bidx[ci].astype(np.int64), self.sidx.fd, cs),
                               np.uint8).astype(bool)
        else:
            eq = np.ones(len(ci), bool)
        room = self.sidx.sharers[cs] + self.sidx.pending[cs]
        if len(cs) > 1 and not (cs[1:] > cs[:-1]).all():
            # The same slot more than once: each counts the ones before it.
            order = np.argsort(cs, kind="stable")
            srt = cs[order]
            rank = np.empty(len(cs), np.int64)
            rank[order] = np.arange(len(cs)) - np.searchsorted(srt, srt, side="left")
            room = room + rank
        ok = eq & (room < self.settings.max_page_sharing)
        if ok.any():
            # Past the mapping budget _queue leaves pages VOLATILE: done too.
            self.queue.add(merges, reg, pages[ci[ok]], cs[ok])
            done[ci[ok]] = True
        return done

    def _new_stable(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray,
                    rows: np.ndarray, ii: np.ndarray, merges: QueuedByWorker) -> int:
        """Copy pages[ii] (ascending, distinct checksums) into new stable slots,
        runs of consecutive pages into runs of consecutive slots, and queue
        their merges.  Returns how many of them, from the start, got a slot."""
        # The runs: consecutive pages that also sit side by side in the buffer.
        starts, ends = cut_runs(pages[ii], ii)
        # The mapping budget, all runs at once: each run a stretch of its own.
        keys = FRESH_KEY + 8 * np.repeat(np.arange(len(starts)), ends - starts)
        fit, cost = self.budget.room(reg, pages[ii], keys)
        self.budget.commit(reg.worker, cost)
        self.budget.pages_skipped += len(ii) - fit
        made = 0
        now = time.monotonic()
        for a, e in zip(starts.tolist(), ends.tolist()):
            b = min(e, fit)
            b = a + self.sidx.room(b - a)          # max_kernel_pages
            if b <= a:
                break
            sel = ii[a:b]
            hint = self._continue_at(reg, int(pages[sel[0]]))
            r0 = int(sel[0])
            s = self.sidx.add(rows[r0:r0 + len(sel)], hashes[sel], hint)
            if s is None:
                break
            slots = np.arange(s, s + len(sel), dtype=np.int64)
            self.sidx.born_inline[slots] = now
            self._last_inline = (reg, int(pages[sel[-1]]), s + len(sel) - 1)
            self.queue.add(merges, reg, pages[sel], slots, checked=True)
            made += len(sel)
            if b < e:
                break
        return made


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
