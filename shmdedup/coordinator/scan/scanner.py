"""The scanner: ksmd's algorithm over the workers' registered regions.

A cursor walks every registered region, chunk by chunk, in batches of
``pages_to_scan`` visited pages; one cursor per uid (a *lane*), the scan's CPU
going to the lane that has had least of it, and a full scan ending when every
lane has been through all its regions (one uid: ksmd's single cursor).  It
goes only where there is something to do: chunks with advised pages that hold
data (cachestat on the backing), and chunks where the scanner keeps state
(``pagetable``); what a worker merely claims (a huge sparse region, advice
over holes) costs neither time nor memory per page.  For each chunk it first
*reconciles* (DESIGN invariant 6): pages we merged whose state byte is PRIVATE
again were broken by a copy-on-write fault, so their slot loses a sharer; a
slot with one sharer left is given back to it ("break cow once unshared", seed
patch 4); a slot with none is freed (punched).  Then, for each present
(cachestat), private, mergeable page:

1. checksum it (C, pages read with pread: never through a mapping);
2. checksum changed since the last visit: record it, the page is volatile,
   and only step 3 is tried (Linux searches the stable tree before its
   checksum test; the two-visit rule keeps churning pages out of the unstable
   index).  A page seen for the first time goes on to every step: nothing
   says it churns yet, and waiting a full scan doubled the time a new copy
   lives (amendment 15);
3. look it up in the stable index (checksum -> slots), queue a merge onto
   that slot (no compare: the worker's proof decides, amendment 16);
4. else look it up in the unstable index (reset at every full scan); on a
   match confirm, copy into a fresh stable slot, queue merges for both;
5. else insert it into the unstable index.

A chunk whose pages are all merged (the steady state) costs one read of its
state bytes and a few vector operations: which pages hold data is asked only
when something needs it, and the mapping budget recounts a chunk only when
its pages were not *calm* (``_note_calm``).

Steps 3-5 live in ``matching.py`` (:class:`Matcher`, which the scanner owns
as ``self.matcher``), merging at write time in ``inline.py``
(:class:`Inliner`, ``self.inliner``); both are given what they work with in
their constructors: the settings (``settings.py``, one object shared by
reference and filled from the controls by the coordinator), the indexes, the
mapping budget and the merge queue (``mergequeue.py``).  Settling replies,
releasing slots and the statistics live in ``accounting.py`` (the
:class:`Accounting` mixin); registration, detaching and the lanes in
``registry.py`` (the :class:`Registry` mixin).  Merges are queued per worker
and sent as coalesced runs at the end of the batch; the coordinator settles
the replies here (``merge_done``, ``unmerge_done``).  The coordinator's
checksum and compare are only hints: the worker proves equality under write
protection before mapping (DESIGN invariant 1).

Per tracked page the scanner keeps 15 bytes: checksum (8), slot (4), status,
age and skip count (1 each), in blocks of 256 pages that hold data or a merge;
advice is kept as runs.  The indexes (``indexes.py``) add 28 bytes per
stable slot plus 8 a bucket, and 16 a bucket of the unstable index (buckets
37-75% full; emptied every full scan).  Statistics are derived from these on demand, so they always
equal a recount.

Every worker object is hostile: it may be truncated, grown or punched at any
moment (reads past its end are zeros, a look for data that races a truncation
ends the walk early), and it never makes the scan wait: no system call on it
takes a lock its worker can hold (``_shm.data_extents``), and a step walks at
most ``LOOK_RUNS`` runs of advice.  An error while scanning one region
(OSError, MemoryError, or a bug of ours) ends the work on it for the batch,
releases what the batch had queued for its worker, and is reported in
``failed``: the coordinator drops that worker with the reason logged, and
everyone else keeps being served.

smart_scan (Linux 6.7): a page that keeps failing to merge ages one step per
visit and is skipped for 1, 2, 4, then 8 full scans (``pages_skipped``).

Slots outlive connections, never mappings (invariants 6 and 7): a region whose
worker disconnected but may be alive is *detached* (kept, not scanned, its
sharer references held until its worker exits or its state bytes show a page
broken); closing the scanner frees nothing.  Pages a previous coordinator
merged are *inherited* (see ``inherited_pages``).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.accounting import Accounting
from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.coordinator.scan.indexes import StableIndex, UnstableIndex
from shmdedup.coordinator.scan.inline import InlineResult, Inliner
from shmdedup.coordinator.scan.matching import Matcher, ReadBuffer
from shmdedup.coordinator.scan.mergequeue import MergeQueue
from shmdedup.coordinator.scan.pagetable import BLOCK_PAGES, BLOCKS_PER_CHUNK, CHUNK_PAGES
from shmdedup.coordinator.scan.registry import Lane, Registry
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.coordinator.scan.stable import StableSegment
from shmdedup.coordinator.scan.tracking import (  # noqa: F401  (re-exported: the scanner's vocabulary)
    MERGED, METADATA_BYTES_PER_PAGE, NEW, PENDING, UNMERGING, UNSHARED, VOLATILE,
    ZERO, ZERO_CHECKSUM, Queued, QueuedByWorker, RegionState, Run, _coalesce, _repeated, _unique,
    inherited_pages)
from shmdedup.pages import PAGE_SIZE

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

# smart_scan, by a page's age (visits without a merge): its next age, and
# Linux's skip_age(): after a few failed visits skip 1, 2, 4, then 8 scans.
_AGES = np.arange(256)
_NEXT_AGE = np.minimum(_AGES + 1, 255).astype(np.uint8)
_SKIP_AGE = np.select([_AGES < 3, _AGES <= 3, _AGES <= 5, _AGES <= 8], [0, 1, 2, 4], 8).astype(np.uint8)
_RANGE = np.arange(CHUNK_PAGES, dtype=np.int64)
# Runs of advice one step walks looking for data (a few ms at most); the
# next step goes on from there.
LOOK_RUNS = 256


class _Present:
    """Which pages of [p0, p1) hold data (``RegionState.present``), asked
    at most once per step and only if needed; ``select`` and ``cut`` follow
    the step's entries (a chunk with blocks missing, a batch that ends
    inside it)."""

    __slots__ = ("reg", "p0", "p1", "adv", "mask", "rel", "k")

    def __init__(self, reg: RegionState, p0: int, p1: int, adv: np.ndarray) -> None:
        self.reg, self.p0, self.p1, self.adv = reg, p0, p1, adv
        self.mask: np.ndarray | None = None       # for [p0, p1)
        self.rel: np.ndarray | None = None        # the entries' offsets in [p0, p1)
        self.k: int | None = None                 # only the first k entries

    def _all(self) -> np.ndarray:
        if self.mask is None:
            n = self.p1 - self.p0
            self.mask = self.reg.present(self.p0, self.p1) if self.adv.any() \
                else np.zeros(n, bool)
        return self.mask

    def __call__(self) -> np.ndarray:
        """The mask for the step's entries."""
        m = self._all()
        if self.rel is not None:
            m = m[self.rel]
        return m if self.k is None else m[:self.k]

    def filled(self, base: int) -> np.ndarray | None:
        """The blocks of the chunk at ``base`` with an advised page of
        [p0, p1) holding data (a bool per block), or None if there is none."""
        data = self.adv & self._all()
        if not data.any():
            return None
        out = np.zeros(BLOCKS_PER_CHUNK, bool)
        out[(np.flatnonzero(data) + (self.p0 - base)) // BLOCK_PAGES] = True
        return out

    def select(self, rel: np.ndarray) -> None:
        self.rel = rel

    def cut(self, k: int) -> None:
        self.k = k


class Scanner(Registry, Accounting):
    """The cursors, the two indexes, and the slot accounting; registration
    and the lanes come from :class:`Registry`, replies, releases and
    statistics from :class:`Accounting`.  It owns the candidate matching
    (steps 3-5, ``self.matcher``: :class:`Matcher`) and merging at write
    time (``merge_now``, ``self.inliner``:
    :class:`~shmdedup.coordinator.scan.inline.Inliner`).  ``settings`` is
    the controls' share the scan reads (the coordinator fills it).

    ``send_merge(worker, items)`` / ``send_unmerge(worker, items)`` are called
    with lists of :class:`~shmdedup.coordinator.scan.tracking.Run`; the coordinator sends them
    and later calls :meth:`merge_done` / :meth:`unmerge_done`.
    """

    def __init__(self, send_merge: Callable[[Any, list[Run]], None],
                 send_unmerge: Callable[[Any, list[Run]], None],
                 settings: ScanSettings | None = None) -> None:
        self.send_merge: Callable[[Any, list[Run]], None] = send_merge
        self.send_unmerge: Callable[[Any, list[Run]], None] = send_unmerge
        # The controls the scan reads, one object shared by every part below.
        self.settings: ScanSettings = settings if settings is not None else ScanSettings()
        self.sidx: StableIndex = StableIndex(self.settings)
        self.stable: StableSegment = self.sidx.segment
        self.unstable: UnstableIndex = UnstableIndex()
        self.regions: list[RegionState] = []
        self.by_uid: dict[int, RegionState] = {}
        self._uids = itertools.count()
        # Regions of workers that disconnected while perhaps still alive; they
        # hold sharer references but are not scanned (see detach_region).
        self.detached: list[RegionState] = []
        # One cursor per uid (a lane), sharing the scan's CPU evenly: with a
        # single uid (the usual domain) this is ksmd's one cursor.
        self.lanes: dict[Any, Lane] = {}
        # Full scans still owed to reconciliation although nothing may be
        # advised (see settle()).
        self.settle_scans: int = 0
        self._advised: set[RegionState] = set()     # regions with advice (idle())
        # (worker, reason) for each worker a region of which the last batch
        # could not scan: the coordinator drops them.
        self.failed: list[tuple[Any, str]] = []
        self.full_scans: int = 0
        self.pages_scanned: int = 0
        # What the scan found to do, cumulative: pages seen first or changed,
        # merged pages found broken, merges and unmerges queued.  Pacing
        # (pacing.py) tells a quiet domain by a full scan that added none.
        self.changes: int = 0
        self.pages_skipped: int = 0
        # One read buffer for the scanner's life (a chunk is at most
        # CHUNK_PAGES pages; untouched pages cost no memory), shared with
        # merge_now: nothing keeps a view of it past a call.
        self._read_buffer: ReadBuffer = ReadBuffer(CHUNK_PAGES * PAGE_SIZE)   # given back every full scan
        self._scratch: np.ndarray = self._read_buffer.array
        # Each worker's mappings, estimated; merges past max_mappings are skipped.
        self.budget: MappingBudget = MappingBudget(self.settings)
        self.queue: MergeQueue = MergeQueue(self.sidx, self.budget)
        self.matcher: Matcher = Matcher(self.settings, self.sidx, self.unstable, self.budget,
                                        self.queue, self.by_uid, self._blame, self._read_buffer)
        self.inliner: Inliner = Inliner(self.settings, self.sidx, self.budget, self.queue,
                                        self._scratch, self._candidates, self._next_chunk)
        self._now: float = 0.0          # time.monotonic() at the start of the batch

    @property
    def sharers(self) -> np.ndarray:
        return self.sidx.sharers

    @property
    def pending(self) -> np.ndarray:
        return self.sidx.pending

    def idle(self) -> bool:
        """True when there is nothing to scan (ksmd keeps quiet, seed patch 5):
        nothing advised, and no reconciliation owed (settle())."""
        return not self.settle_scans and not self._advised

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

    def batch(self, budget: int, cpu_limit: float | None = None) -> int:
        """Visit up to ``budget`` pages of each lane from the cursors; returns
        pages visited.  A batch ends at the end of a full scan, like ksmd's,
        or once it has used ``cpu_limit`` seconds of this thread's CPU.
        Regions whose scan failed are in ``self.failed`` afterwards, as
        (worker, reason).

        Each step goes to the lane (uid) that has had the least of the scan's
        CPU, among those with pages of their budget left; a lane that has been
        through all its regions starts again while others are still on their
        way, and a full scan ends when every lane has been through all its
        regions since the last one ended.  So one uid's data, however much,
        delays another uid's scan by at most its share, and a single uid scans
        as ksmd does.  The budget is each lane's: a uid whose pages are cheap
        to visit (a converged domain's rescan) would otherwise take the whole
        batch's pages before its CPU caught up with a uid whose pages are
        dear, and leave that one a few pages a batch."""
        self.failed = []
        if not self.regions:        # nothing registered: nothing to settle either
            self._reconcile_detached()
            self.settle_scans = 0
            return 0
        visited = 0
        merges: QueuedByWorker = {}
        unmerges: QueuedByWorker = {}
        self._now = time.monotonic()
        now = time.thread_time()
        deadline = now + cpu_limit if cpu_limit else None
        taken: dict[Lane, int] = {}         # pages each lane visited in this batch
        while self.lanes:
            if all(lane.passed for lane in self.lanes.values()):
                self._end_full_scan()
                break
            if deadline is not None and now >= deadline:
                break
            left = [ln for ln in self.lanes.values() if taken.get(ln, 0) < budget]
            if not left:
                break
            lane = left[0] if len(left) == 1 else min(left, key=Lane.spent_of)
            if lane.cursor >= len(lane.regions):
                lane.passed = True
                lane.cursor = lane.page = 0
                continue
            reg = lane.regions[lane.cursor]
            try:
                n = self._step(lane, reg, budget - taken.get(lane, 0), merges, unmerges)
                visited += n
                taken[lane] = taken.get(lane, 0) + n
            except Exception as e:  # noqa: BLE001 - one region's trouble is its worker's
                self._fail(lane, reg, e)
            t = time.thread_time()
            lane.spent += t - now
            now = t
        for worker, _ in self.failed:
            self.queue.release(merges.pop(worker, []))
            unmerges.pop(worker, None)
        runs = {}
        for worker, items in merges.items():
            try:
                runs[worker] = _coalesce(items)
            except MemoryError as e:
                self.failed.append((worker, f"cannot queue its merges: {type(e).__name__}"))
                self.queue.release(items)
        self.budget.end_batch({worker: len(r) for worker, r in runs.items()})
        self.changes += sum(len(r) for r in runs.values()) + sum(len(u) for u in unmerges.values())
        for worker, r in runs.items():
            self.send_merge(worker, r)
        for worker, items in unmerges.items():
            self.send_unmerge(worker, _coalesce(items))
        return visited

    def _fail(self, lane: Lane, reg: RegionState, e: BaseException) -> None:
        """The scan of ``reg`` raised: report its worker, skip the region."""
        if not isinstance(e, (OSError, MemoryError)):
            log.error("internal error scanning region %d of pid %s", reg.rid,
                      getattr(reg.worker, "pid", "?"), exc_info=True)
        why = f"scanning region {reg.rid} failed: {type(e).__name__}: {e}"
        if all(w is not reg.worker for w, _ in self.failed):
            self.failed.append((reg.worker, why))
        if lane.cursor < len(lane.regions) and lane.regions[lane.cursor] is reg:
            lane.cursor += 1
            lane.page = 0

    def _blame(self, reg: RegionState, e: BaseException) -> None:
        """Reading ``reg`` (another region than the one being scanned: an
        unstable mate) failed: its worker is reported, the scan goes on."""
        why = f"reading region {reg.rid} failed: {type(e).__name__}: {e}"
        if all(w is not reg.worker for w, _ in self.failed):
            self.failed.append((reg.worker, why))

    def _next_chunk(self, reg: RegionState, p: int) -> int | None:
        """The first chunk at or after page p with something to do: one where
        the scanner keeps state, or one with an advised page that holds data.
        Costs a look for data (``next_data``: cachestat) per run of advice
        that holds no data at most, not a step per page or chunk."""
        return self._look(reg, p, None)[0]

    def _look(self, reg: RegionState, p: int, max_runs: int | None) -> tuple[int | None, int | None]:
        """``_next_chunk``, walking at most ``max_runs`` runs of advice (None:
        all): ``(chunk, None)``, or ``(None, None)`` when nothing is left, or
        ``(None, q)`` when it gave up at page q with runs left to walk: a
        region advised in many runs over holes costs a step per
        ``max_runs``, and the batch's CPU limit holds between them."""
        if p >= reg.npages:
            return None, None
        held = reg.table.next_chunk(p // CHUNK_PAGES)
        limit = reg.npages if held is None else min(held * CHUNK_PAGES, reg.npages)
        q = p
        runs = 0
        while q < limit:
            if max_runs is not None and runs >= max_runs:
                return None, q
            run = reg.advice.next_run(q)
            if run is None or run[0] >= limit:
                break
            d = reg.next_data(max(q, run[0]))
            if d is None or d >= limit:
                break
            if d < run[1]:
                return d // CHUNK_PAGES, None
            q = d          # data past this run: continue from there
            runs += 1
        return held, None

    def _step(self, lane: Lane, reg: RegionState, room: int, merges: QueuedByWorker,
              unmerges: QueuedByWorker) -> int:
        """Scan the next chunk of ``reg`` with something to do, from the
        cursor; returns the pages visited (advised pages that hold data or a
        merge: what counts against pages_to_scan).  Works on the chunk's
        entries (``pagetable.Chunk``) directly: one step, no lookups.  Which
        pages hold data (``present``: cachestat) is asked only when something
        needs it: blocks to create, pages never visited, pages a merge may
        take, or blocks to give back; a chunk of merged pages costs none."""
        c, resume = self._look(reg, lane.page, LOOK_RUNS)
        if resume is not None:
            lane.page = resume
            return 0
        if c is None:
            lane.cursor += 1
            lane.page = 0
            return 0
        base = c * CHUNK_PAGES
        p0 = max(lane.page, base)
        p1 = min(base + CHUNK_PAGES, reg.npages)
        adv = reg.advice.mask(p0, p1)
        ch = reg.table.chunk(c)
        got = _Present(reg, p0, p1, adv)
        filled = None                  # blocks of the chunk with an advised page holding data
        # Dense: every block of [p0, p1) is held, so entry lo + i is page p0 + i.
        b0, b1 = (p0 - base) // BLOCK_PAGES, (p1 - 1 - base) // BLOCK_PAGES + 1
        dense = ch is not None and (ch.full or not (ch.pos[b0:b1] < 0).any())
        if ch is None or not dense:
            filled = got.filled(base)
            if filled is not None and (ch is None or (ch.pos[filled] < 0).any()):
                ch = reg.table.ensure(c, np.flatnonzero(filled).tolist())
            if ch is None:
                lane.page = p1
                return 0
            dense = not (ch.pos[b0:b1] < 0).any()
        lo, hi = ch.span(p0, p1)
        if dense:
            pages = _RANGE[:hi - lo] + p0
        else:
            pages = ch.pages[lo:hi]
            got.select(pages - p0)
            adv = adv[pages - p0]
        st = ch.status[lo:hi]
        # Every advised page the cursor passes counts against the budget if
        # it holds data or a merge (as rmap_items do in ksmd): a fully merged
        # domain costs pages_to_scan cheap visits per batch, not a full scan
        # per batch; advised holes cost nothing.
        fresh = adv & (st == NEW)
        counted = adv & (got() | (st != NEW)) if fresh.any() else adv
        visited = int(np.count_nonzero(counted))
        whole = True
        if visited > room:
            passed = np.cumsum(counted)
            k = int(np.searchsorted(passed, room)) + 1
            hi = lo + k
            pages, adv, st = pages[:k], adv[:k], st[:k]
            got.cut(k)
            visited = int(passed[k - 1])
            lane.page = int(pages[-1]) + 1
            whole = False
        elif p1 >= reg.npages:
            lane.cursor += 1            # the region's last chunk: on to the next one
            lane.page = 0
        else:
            lane.page = p1
        if not len(pages):
            return 0
        states = self._reconcile(reg, ch, lo, hi, pages, unmerges, dense)
        cand = self._eligible(reg, adv, states, st, ch.slot[lo:hi], got)
        todo = np.flatnonzero(cand) + lo           # entries of the chunk
        skipped = 0
        if len(todo) and self.settings.smart_scan:
            before = len(todo)
            todo = self._smart_skip(reg, ch, todo)
            skipped = before - len(todo)
        self.pages_scanned += visited - skipped
        if len(todo):
            self._visit(reg, ch, todo, pages[todo - lo], merges)
        if whole and p0 == base:
            self._trim(reg, c, filled, got)
        return visited

    def _eligible(self, reg: RegionState, adv: np.ndarray, states: np.ndarray, st: np.ndarray | None,
                  slot: np.ndarray | None, present: Callable[[], np.ndarray]) -> np.ndarray:
        """Which pages a merge may take (the scan's and merge_now's rule):
        advised, private, in no merge or unmerge, with no slot, holding data
        (``present()``, asked only if any is left); none while the worker's
        mapping budget is full (then not even read: they are visited again
        once the worker has room).  A mask like the arrays given; ``st`` and
        ``slot`` None: pages the scanner keeps no state for (NEW, no slot)."""
        cand: np.ndarray = adv & (states == _native.PRIVATE)
        if not cand.any():
            return cand
        if st is not None and slot is not None:
            cand &= (st != PENDING) & (st != UNMERGING) & (slot < 0)
        if cand.any() and self.budget.full(reg.worker):
            self.budget.pages_skipped += int(np.count_nonzero(cand))
            cand[:] = False
        if cand.any():
            cand &= present()
        return cand

    def merge_inline(self, reg: RegionState, first: int, n: int,
                     hints: np.ndarray | None = None) -> InlineResult:
        """merge_now for pages [first, first + n) of ``reg``: :meth:`Inliner.merge_inline`."""
        return self.inliner.merge_inline(reg, first, n, hints)

    def _candidates(self, reg: RegionState, p0: int, p1: int, states: np.ndarray | None = None,
                    slot: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """The pages of [p0, p1) of ``reg`` a merge may take (``_eligible``),
        for merge_now, which has no chunk in hand, and whether a page of the
        range has a merge in flight already.  ``states`` and ``slot``: the
        pages' state bytes and slots if the caller has read them.  Pages the
        scanner keeps no state for (a fresh load) cost no table read."""
        if states is None:
            states = reg.states[p0:p1]
        held = reg.table.next_chunk(p0 // CHUNK_PAGES)
        st = None
        waiting = False
        if held is not None and held * CHUNK_PAGES < p1:
            st = reg.status[p0:p1]
            if slot is None:
                slot = reg.slot[p0:p1]
            waiting = bool((st == PENDING).any())
        cand = self._eligible(reg, reg.advice[p0:p1], states, st, slot, lambda: reg.present(p0, p1))
        return np.flatnonzero(cand) + p0, waiting

    def _trim(self, reg: RegionState, c: int, filled: np.ndarray | None,
              got: _Present | None = None) -> None:
        """Give back the blocks of chunk c that hold nothing worth keeping:
        no merge (done, in flight, or being undone) and no advised page with
        data (a page punched, truncated away or no longer advised needs no
        checksum history).  ``filled``: the blocks with an advised page that
        holds data, or None: none, or (``got`` given) not asked yet."""
        ch = reg.table.chunk(c)
        if ch is None:
            return
        # MERGED, ZERO, PENDING and UNMERGING are the statuses from MERGED up;
        # entries past the region's end (its last block's) hold nothing.
        n = ch.span(ch.base, reg.npages)[1]
        held = ch.status[:n] >= MERGED
        if held.all():
            return                      # every page holds a merge: the common steady case
        if n < len(ch.status):
            held = np.concatenate((held, np.zeros(len(ch.status) - n, bool)))
        keep = held | (ch.slot >= 0)
        if keep.all():
            return
        if filled is None and got is not None:
            filled = got.filled(ch.base)
        if filled is not None:
            if (filled | (ch.pos < 0)).all():
                return                  # every block held has data
            keep |= np.repeat(filled[ch.pos >= 0], BLOCK_PAGES)
        if not keep.all():
            reg.table.retain(ch, keep)

    def _smart_skip(self, reg: RegionState, ch: Any, e: np.ndarray) -> np.ndarray:
        """smart_scan: drop the entries (of chunk ``ch``) still serving a
        skip, age the others; returns those."""
        skipping = ch.skip[e] > 0
        if skipping.any():
            sk = e[skipping]
            ch.skip[sk] -= 1
            self.pages_skipped += len(sk)
            e = e[~skipping]
            # Unlike Linux, a skipped unique page stays findable: its last
            # checksum goes back into the unstable index without a read, so a
            # twin that appears meanwhile still merges with it (the match is
            # confirmed by reading both, and proven by the worker).
            lone = sk[ch.status[sk] == UNSHARED]
            if len(lone):
                self.unstable.insert(ch.checksum[lone], reg.uid, ch.pages[lone])
        age = ch.age[e]
        ch.age[e] = _NEXT_AGE[age]
        ch.skip[e] = _SKIP_AGE[age]
        return e

    def _end_full_scan(self) -> None:
        self._reconcile_detached()
        self.settle_scans = max(0, self.settle_scans - 1)
        self.full_scans += 1
        self._restart_lanes()
        self.matcher.restart()

    def _reconcile(self, reg: RegionState, ch: Any, lo: int, hi: int, pages: np.ndarray,
                   unmerges: QueuedByWorker, dense: bool = False) -> np.ndarray:
        """Invariant 6 for the entries [lo, hi) of chunk ``ch`` (``pages``):
        merged pages whose state byte reads PRIVATE were broken; a slot left
        with one sharer is given back.  Returns the state bytes read.
        ``dense``: the chunk holds every block of the pages (entry lo + i
        is page pages[0] + i).

        The mapping budget recounts the pages' chunk unless they are calm
        now and were at their last visit (``_note_calm``)."""
        a, b = int(pages[0]), int(pages[-1]) + 1
        st = ch.status[lo:hi]
        slot = ch.slot[lo:hi]
        states = reg.states[a:b] if dense else reg.states[pages]
        private = states == _native.PRIVATE
        merged_st = (st == MERGED) | (st == ZERO)
        broken = np.flatnonzero(merged_st & private)
        if len(broken):
            self.changes += len(broken)
            slots = slot[broken]
            slots = slots[slots >= 0]
            np.subtract.at(self.sharers, slots, 1)
            slot[broken] = -1
            st[broken] = VOLATILE
            self.sidx.free_unused(slots)
        is_merged = st == MERGED
        n = int(np.count_nonzero(is_merged))
        lonely = None
        if n:
            merged = None if n == len(st) else np.flatnonzero(is_merged)
            slots = slot if merged is None else slot[merged]
            one = self.sharers[slots] == 1
            if one.any():
                # A stable page merge_now created is kept for inline_keep
                # (the next loader of the same bytes is usually close behind).
                cand = np.flatnonzero(one) if merged is None else merged[one]
                s1 = slot[cand]
                lonely = cand[(self.pending[s1] == 0)
                              & (self.sidx.born_inline[s1] + self.settings.inline_keep <= self._now)]
                if len(lonely):
                    st[lonely] = UNMERGING
                    self.sidx.retire(slot[lonely])
                    unmerges.setdefault(reg.worker, []).append(
                        (reg, pages[lonely].astype(np.int64), slot[lonely].astype(np.int64)))
        calm = dense and not len(broken) and (lonely is None or not len(lonely)) and not (
            (merged_st == (private | (states == _native.MERGING))) | (st >= PENDING)).any()
        self._note_calm(reg, ch, a, b, calm)
        out: np.ndarray = states
        return out

    def _note_calm(self, reg: RegionState, ch: Any, a: int, b: int, calm: bool) -> None:
        """The mapping budget recounts chunk ``ch`` (``touch``) unless its
        pages [a, b) just reconciled are *calm* and were at their last visit.
        Calm: every page merged (status MERGED or ZERO) has a state byte that
        says so and every other page's reads private, no merge or unmerge is
        in flight, and every block of the pages is held (a page without a
        block is not looked at).  A calm page's layout changes only by a
        break (not calm at the next visit) or by a request, whose reply
        recounts it; so the count stays right.  ``ch.calm``: every page of
        the chunk was calm at its last visit; ``ch.calm_upto``: the pages
        [base, base + calm_upto) were found calm in this pass (a batch may
        end inside a chunk: the next visits it in pieces)."""
        if not (calm and ch.calm):
            self.budget.touch(reg, a, b - a)
        if not calm:
            ch.calm, ch.calm_upto = False, 0
            return
        base = ch.base
        ch.calm_upto = b - base if a == base or ch.calm_upto == a - base else 0
        if ch.calm_upto >= min(CHUNK_PAGES, reg.npages - base):
            ch.calm = True

    def _visit(self, reg: RegionState, ch: Any, e: np.ndarray, pages: np.ndarray,
               merges: QueuedByWorker) -> None:
        """Steps 1-2 for the entries ``e`` of chunk ``ch`` (``pages``): read
        and checksum the pages; those seen for the first time or unchanged
        since the last visit go on to matching (amendment 15), those changed
        only to the stable index."""
        n = len(e)
        buf = self._scratch[:n * PAGE_SIZE]
        hashes = np.empty(n, np.uint64)
        _native.read_pages(reg.backing_fd, pages, buf, hashes)
        old = ch.checksum[e]
        st = ch.status[e]
        first = st == NEW
        steady = ~first & (old == hashes)
        ch.checksum[e] = hashes
        ch.status[e[~steady]] = VOLATILE
        k = np.flatnonzero(steady | first)  # candidates, as indexes into buf
        self.changes += n - int(np.count_nonzero(steady))
        if len(k) < n and self.stable.pages_in_use:
            # Changed since the last visit: only the stable index is asked
            # (KSM's order); the unstable one waits for a steady checksum.
            fresh = np.flatnonzero(~(steady | first))
            self.matcher.cmp_stable(reg, pages[fresh], hashes[fresh], merges)
        if len(k):
            self.matcher.cmp_and_merge(reg, pages[k], hashes[k], k, buf, merges)

    def _restart_lanes(self) -> None:
        # Every lane from its first region: the next full scan then sees
        # every page of every lane at least once.
        for lane in self.lanes.values():
            lane.cursor = lane.page = 0
            lane.passed = False

    def reset_after_unmerge(self, ok: bool) -> None:
        self._restart_lanes()
        self.matcher.restart()
        if ok:
            self.full_scans = 0

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
