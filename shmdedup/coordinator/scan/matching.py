"""Steps 3-5 of the scan: matching a batch of candidate pages and queueing merges.

:class:`Matcher` is a collaborator of the
:class:`~shmdedup.coordinator.scan.scanner.Scanner`, which owns it: it takes
the candidate pages of one chunk (read and checksummed by ``Scanner._visit``:
seen for the first time, or unchanged since the last visit) and, vectorised
over the chunk:

3. looks each up in the stable index (checksum -> newest slot of a chain) and
   queues a merge onto that slot while the chain has room under
   ``max_page_sharing`` (a full chain: the next slot), with no compare: a
   stable page never changes, and the worker's proof decides (amendment 16);
4. else looks it up in the unstable index; on a confirmed match copies the
   pair's content into a fresh stable slot and queues merges for both;
5. else inserts it into the unstable index (status UNSHARED).

Zero pages (``use_zero_pages``) merge onto the zero page instead (slot -1);
with ``merge_zero_pages_only`` nothing else merges.  Pages whose checksum
repeats inside the chunk, and equal pages of a full chain, take the
sequential path (:meth:`Matcher._cmp_and_merge_one`).  New slots continue the
run of the previous page's slot when they can (``_last_new``), so consecutive
duplicate pages map to consecutive slots and a worker maps a whole run with one
mmap.  Merges are queued per worker (``merges``) as (reg, pages, slots)
through the scanner's ``mergequeue.MergeQueue``; the scanner coalesces and
sends them at the end of the batch.

Invariants kept (DESIGN.md): the checksums and compares here are only hints,
the worker proves equality under write protection before mapping (1); worker
pages are compared from the read buffer or read with pread, never through a
mapping (4); stable slots are written only here, when new and unshared (5); a
queued merge holds a ``pending`` count on its slot, so the slot is not freed
while the request is in flight, and a slot no merge was queued for is freed at
once (6).

What it works with is given to its constructor: the scan's settings
(``settings.py``), the two indexes (``indexes.py``), the mapping budget
(``budget.py``), the merge queue (``mergequeue.py``), the scanner's regions
by uid, the scanner's way to report a worker whose object could not be
read (``Scanner._blame``), and the scanner's :class:`ReadBuffer`, whose pages
it gives back at every full scan's end (a scan that finds everything merged
reads little and keeps little).
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.coordinator.scan.indexes import StableIndex, UnstableIndex
from shmdedup.coordinator.scan.mergequeue import MergeQueue
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.coordinator.scan.tracking import (
    PENDING, UNSHARED, VOLATILE, ZERO_CHECKSUM, QueuedByWorker, RegionState, _repeated, _unique)
from shmdedup.pages import PAGE_SIZE, cut_runs


class ReadBuffer:
    """The scanner's read buffer (``array``: a chunk of pages at most), in
    its own anonymous mapping: untouched pages cost nothing, and
    :meth:`release` gives the touched ones back (their content is lost:
    nothing keeps a view of the buffer past a call)."""

    def __init__(self, nbytes: int) -> None:
        self._map: mmap.mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array: np.ndarray = np.frombuffer(self._map, np.uint8)

    def release(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)


class Matcher:
    """Candidate matching for :class:`~shmdedup.coordinator.scan.scanner.Scanner` (steps 3-5)."""

    def __init__(self, settings: ScanSettings, sidx: StableIndex, unstable: UnstableIndex,
                 budget: MappingBudget, queue: MergeQueue, by_uid: dict[int, RegionState],
                 blame: Callable[[RegionState, BaseException], None],
                 read_buffer: ReadBuffer | None = None) -> None:
        self.settings: ScanSettings = settings
        self.sidx: StableIndex = sidx                # per slot: sharers, pending (merges in flight)
        self.unstable: UnstableIndex = unstable
        self.budget: MappingBudget = budget
        self.queue: MergeQueue = queue
        self.by_uid: dict[int, RegionState] = by_uid   # the scanner's registered regions, by uid
        # Reports a worker whose object could not be read (an unstable mate's).
        self.blame: Callable[[RegionState, BaseException], None] = blame
        self.read_buffer: ReadBuffer | None = read_buffer   # released at every restart
        # Where the last new slot went, to continue runs across batches:
        # (mate's region, mate's page, region, page, slot).
        self._last_new: tuple[RegionState, int, RegionState, int, int] | None = None

    def restart(self) -> None:
        """A new full scan (or after run=2): the unstable index starts empty
        (sized for what it held, ``indexes.py``), no run of new slots is
        continued, and the read buffer's pages are given back (refaulting a
        chunk's worth costs ~1 ms a full scan)."""
        self.unstable.clear()
        self._last_new = None
        if self.read_buffer is not None:
            self.read_buffer.release()

    def cmp_and_merge(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray,
                       k: np.ndarray, buf: np.ndarray, merges: QueuedByWorker) -> None:
        """Steps 3-5 for a batch of candidate pages of one region, vectorised:
        index lookups, compares and copies run in C or numpy over whole
        arrays.  Pages whose checksum repeats inside the batch take the
        sequential path (they may match each other)."""
        todo = np.ones(len(pages), bool)
        rows = buf.reshape(-1, PAGE_SIZE)
        if self.settings.use_zero_pages or self.settings.zero_pages_only:
            zi = [i for i in np.flatnonzero(hashes == ZERO_CHECKSUM).tolist() if _native.is_zero(rows[k[i]])]
            if zi:
                self.queue.add(merges, reg, pages[zi], np.full(len(zi), -1))
                todo[zi] = False
        if self.settings.zero_pages_only:  # nothing else merges: no stable slot, no timing signal
            reg.status[pages[todo]] = VOLATILE
            return
        for i in self._stable_step(reg, pages, hashes, todo, merges).tolist():
            # The chain is full: another slot, or a new chain (compared).
            self._cmp_and_merge_one(reg, int(pages[i]), hashes[i:i + 1], rows[k[i]], merges)
        rest = np.flatnonzero(todo)
        if not len(rest):
            return
        # Checksums repeated inside the batch: sequential path, in page order.
        dup = _repeated(hashes[rest])
        for i in rest[dup].tolist():
            self._cmp_and_merge_one(reg, int(pages[i]), hashes[i:i + 1], rows[k[i]], merges)
        rest = rest[~dup]
        # Unstable index.
        uid, opage = self.unstable.lookup(hashes[rest])
        matched = np.zeros(len(pages), bool)
        for u in _unique(uid[uid >= 0]).tolist():
            sel = uid == u
            self._merge_with_mates(reg, pages, hashes, k, rows, rest[sel], self.by_uid.get(u),
                                   opage[sel], matched, merges)
        lone = rest[~matched[rest]]
        if len(lone):
            self.unstable.insert(hashes[lone], reg.uid, pages[lone])
            reg.status[pages[lone]] = UNSHARED

    def cmp_stable(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray,
                   merges: QueuedByWorker) -> None:
        """KSM's first look, for pages changed since their last visit:
        Linux's cmp_and_merge_page searches the stable tree before its
        checksum test, so such a page merges at once onto an equal stable
        page.  Only the stable index is asked: the two-visit rule still keeps
        changing pages out of the unstable one (and a page whose chain is
        full waits for its next visit)."""
        if self.settings.zero_pages_only or not len(pages):
            return
        self._stable_step(reg, pages, hashes, np.ones(len(pages), bool), merges)

    def _stable_step(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray,
                     todo: np.ndarray, merges: QueuedByWorker) -> np.ndarray:
        """Step 3 for the pages still ``todo``: look each up in the stable
        index (the newest slot of each chain: the one with room, if any)
        and queue a merge while the chain has room under
        ``max_page_sharing`` (counting earlier pages of this batch).
        Clears ``todo`` for the pages it queued and for those whose chain
        is full, which it returns (as indexes).

        No compare here (amendment 16): a stable page never changes, so
        comparing it with what this visit read could only catch a 64-bit
        checksum collision, and the worker's proof under protection
        (invariant 1) refuses that merge anyway; the compare read every
        matched stable page once more (13% of the coordinator's samples
        while 4 x 256 MiB converged)."""
        head = self.sidx.lookup(hashes)
        ci = np.flatnonzero((head >= 0) & todo)
        if not len(ci):
            return ci
        cs = head[ci]
        order = np.argsort(cs, kind="stable")
        srt = cs[order]
        rank = np.empty(len(cs), np.int64)
        rank[order] = np.arange(len(cs)) - np.searchsorted(srt, srt, side="left")
        room = self.sidx.sharers[cs] + self.sidx.pending[cs] + rank < self.settings.max_page_sharing
        self.queue.add(merges, reg, pages[ci[room]], cs[room])
        todo[ci[room]] = False
        full: np.ndarray = ci[~room]
        todo[full] = False
        return full

    def _merge_with_mates(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray,
                          k: np.ndarray, rows: np.ndarray, ii: np.ndarray, oreg: RegionState | None,
                          op: np.ndarray, matched: np.ndarray, merges: QueuedByWorker) -> None:
        """Confirm unstable matches with pages of ``oreg``, and copy each run of
        them into consecutive new stable slots (one pwrite; one mapping per
        worker later)."""
        if oreg is None or oreg.closed:
            self.unstable.delete(hashes[ii])
            return
        try:
            # The mates' objects are their worker's: reading them may fail.
            ok = oreg.advice[op] & (oreg.status[op] == UNSHARED) & (oreg.states[op] == _native.PRIVATE)
            if oreg is reg:
                ok &= op != pages[ii]
            self.unstable.delete(hashes[ii[~ok]])
            ii, op = ii[ok], op[ok]
            if not len(ii):
                return
            # Compared in C, in runs read by pread (the mates are mostly consecutive).
            same = np.frombuffer(_native.compare_slots(rows, k[ii].astype(np.int64), oreg.backing_fd,
                                                       op.astype(np.int64)), np.uint8).astype(bool)
        except OSError as e:
            self.blame(oreg, e)             # the mate's worker goes, not this one
            self.unstable.delete(hashes[ii])
            return
        ii, op = ii[same], op[same]
        if not len(ii):
            return
        # Runs: my page and the mate's page both advance by one.
        starts, ends = cut_runs(pages[ii], op)
        keep = self.budget.admit_pairs(oreg, op, reg, pages[ii], starts, ends)
        for a, b in zip(starts[keep].tolist(), ends[keep].tolist()):
            self._new_run(reg, pages, hashes, k, rows, ii[a:b], oreg, int(op[a]), matched, merges)

    def _new_run(self, reg: RegionState, pages: np.ndarray, hashes: np.ndarray, k: np.ndarray,
                 rows: np.ndarray, ii: np.ndarray, oreg: RegionState, opage0: int,
                 matched: np.ndarray, merges: QueuedByWorker) -> None:
        ii = ii[:self.sidx.room(len(ii))]      # max_kernel_pages
        if not len(ii):
            return
        n = len(ii)
        i0 = int(ii[0])
        hint = None
        last = self._last_new
        if last and last[0] is oreg and last[1] == opage0 - 1 and last[2] is reg \
                and last[3] == pages[i0] - 1:
            hint = last[4] + 1
        b0 = int(k[i0])
        # The run's pages sit side by side in the read buffer (both advance by
        # one page): written to the new slots from there, without a copy.
        content = rows[b0:b0 + n] if int(k[ii[-1]]) - b0 == n - 1 else np.ascontiguousarray(rows[k[ii]])
        s = self.sidx.add(content, hashes[ii], hint)
        if s is None:
            return
        self.unstable.delete(hashes[ii])
        slots = np.arange(s, s + n, dtype=np.int64)
        self._last_new = (oreg, opage0 + n - 1, reg, int(pages[ii[-1]]), s + n - 1)
        # The caller checked both workers' mapping budgets (admit_pairs).
        self.queue.add(merges, oreg, np.arange(opage0, opage0 + n), slots, checked=True)
        self.queue.add(merges, reg, pages[ii], slots, checked=True)
        matched[ii] = True

    def _cmp_and_merge_one(self, reg: RegionState, page: int, h: np.ndarray, content: np.ndarray,
                           merges: QueuedByWorker) -> None:
        """Steps 3-5 for one page (the sequential path); h is a 1-element array."""
        if reg.status[page] == PENDING:
            # Queued already in this pass, as the unstable mate of an equal
            # page before it (its entry from an earlier visit: a uid's pages
            # are visited again while other uids' full scan goes on).
            return
        one = np.array([page])
        if (self.settings.use_zero_pages or self.settings.zero_pages_only) and int(h[0]) == ZERO_CHECKSUM \
                and _native.is_zero(content):
            self.queue.add(merges, reg, one, np.array([-1]))
            return
        if self.settings.zero_pages_only:
            reg.status[page] = VOLATILE
            return
        for s in self.sidx.chain(int(self.sidx.lookup(h)[0])):
            if self.sidx.sharers[s] + self.sidx.pending[s] < self.settings.max_page_sharing and \
                    _native.pages_equal(content, self.sidx.read(s)):
                self.queue.add(merges, reg, one, np.array([s]))
                return
        uid, opage = self.unstable.lookup(h)
        oreg = self.by_uid.get(int(uid[0])) if uid[0] >= 0 else None
        if oreg is not None:
            op = int(opage[0])
            try:
                other = None
                if not oreg.closed and oreg.advice[op] and oreg.status[op] == UNSHARED \
                        and oreg.states[op] == _native.PRIVATE and not (oreg is reg and op == page):
                    other = os.pread(oreg.backing_fd, PAGE_SIZE, op * PAGE_SIZE)
            except OSError as e:
                self.blame(oreg, e)
                self.unstable.delete(h)
                other = None
            if other is not None:
                if _native.pages_equal(content, other):
                    new = self.sidx.add(content, h)
                    if new is not None:
                        self.unstable.delete(h)
                        self.queue.add(merges, oreg, np.array([op]), np.array([new]))
                        self.queue.add(merges, reg, one, np.array([new]))
                        self.sidx.free_unused([new])   # if the budget turned both away
                        return
                reg.status[page] = UNSHARED   # the mate stays the indexed one
                return
        self.unstable.insert(h, reg.uid, one)
        reg.status[page] = UNSHARED


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
