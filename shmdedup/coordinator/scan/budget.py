"""The mapping budget: keep every worker under vm.max_map_count (DESIGN
"Mapping budget").

Every merged run costs a worker up to two mappings (VMAs), and past
``vm.max_map_count`` (65,530 by default) an mmap or mprotect that would split a
mapping fails with ENOMEM.  The coordinator cannot see a worker's mappings, but
it knows their layout: from the worker's state bytes (private or not) and its
own slot array (which stable run), a region maps as a sequence of *stretches*,
each one VMA (the kernel coalesces adjacent compatible mappings):

* private pages: the backing, mapped with the region's own fd;
* merged pages on consecutive stable slots (one mmap of the stable object);
* zero pages (anonymous read-only memory);
* pages merged with slots this coordinator does not know (merged before it
  restarted): neighbouring ones are taken for one stretch.

So a worker's estimate is

    PROCESS_MAPPINGS                 everything else in the process (libraries,
                                     heap, stacks, the stable view, ...)
  + per region: 2 + boundaries       backing and state bytes, plus one VMA per
                                     change of stretch
  + 2 per merge run in flight        sent, not answered yet (at most 2 each)
  + the planned cost of this batch   exact: what the queued merges change

and the scanner queues a merge only while the estimate stays within
``max_mappings``; the other pages are skipped (``pages_skipped_budget``), and
while a worker has no room for even one more run its pages are not read at
all.  They are visited again at later scans, so merging resumes when the
layout coarsens (pages broken back, regions closed, the control raised).

Boundaries are counted per chunk of pages and recounted only for chunks that
may have changed (``touch``: merge and unmerge replies, and every chunk the
scan cursor passes that was not calm, which picks up copy-on-write breaks), so keeping the
estimate costs O(changed pages), not O(pages), per batch; and admission
recounts only when an upper bound (the count so far plus CHUNK for each chunk
to recount) could pass the limit, so a worker far below it (a streaming
merge_now touching a chunk or two per request) is recounted only once its
touched chunks could add up to the headroom.  Only chunks with
a boundary are remembered, and a whole region is recounted (at registration,
or after a touch of many chunks) only where its state bytes hold data: a
page whose state byte is a hole of the worker's metadata object is PRIVATE,
and a stretch of PRIVATE pages has no boundary.  Recounts read a bounded
piece at a time, so a region of 2**26 pages costs what it holds, not what it
claims.  Measured against /proc/<pid>/maps the region part is exact
(tests/integration/test_map_limit.py).

What the estimate sees late: breaks in chunks the cursor has not passed since
(a break inside a run splits it: +2 each), and the transient split while a
merge holds pages write-protected.  That is what the headroom under
vm.max_map_count is for; and should a break still hit the limit, the trap
maps the whole merged stretch with one mmap instead (sd_trap.c break_owned),
which never adds a mapping.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.settings import ScanSettings

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

# Mappings a worker process has besides its regions: a Python process with
# numpy has ~300-600, one with a big framework a few thousand at most.
PROCESS_MAPPINGS = 2000
CHUNK = 2048                 # pages per boundary count
PIECE_CHUNKS = 64            # chunks recounted from one read (bounded temporaries)
TOUCH_ALL = 64               # a touch of more chunks than this recounts the region

# Stretch keys, one int64 per page: a stable run is (slot - page) * 4 (equal
# for consecutive pages on consecutive slots), the others are not multiples
# of 4.  FRESH (+ 8 k for the k-th) stands for a run of slots not allocated
# yet: a stretch of its own.
PRIVATE_KEY = 1
ZERO_KEY = 2
FRESH_KEY = 3
FOREIGN_KEY = 5

PRIVATE_STATE, MERGING_STATE, ZERO_STATE = _native.PRIVATE, _native.MERGING, _native.ZERO


class _RegionMaps:
    """Boundary counts of one region, per chunk (only chunks that have one)."""

    __slots__ = ("bounds", "dirty", "all_dirty", "total")

    def __init__(self) -> None:
        self.bounds: dict[int, int] = {}   # chunk -> boundaries it holds (> 0)
        self.dirty: set[int] = set()       # chunks to recount
        self.all_dirty = True              # recount the whole region (a new one may be merged)
        self.total = 0


class MappingBudget:
    """Per-worker mapping estimates and the admission of merges."""

    def __init__(self, settings: ScanSettings) -> None:
        self.settings: ScanSettings = settings          # max_mappings is read from it
        self.pages_skipped: int = 0                       # cumulative, like pages_scanned
        self._maps: dict[Any, _RegionMaps] = {}      # RegionState -> counts
        self._total: dict[Any, int] = {}             # worker -> sum over its regions (as last counted)
        self._dirty: dict[Any, set[Any]] = {}             # worker -> its regions with chunks to recount
        self._inflight: dict[Any, int] = {}          # worker -> merge runs sent, unanswered
        self._planned: dict[Any, int] = {}           # worker -> cost queued in this batch
        self._warned: set[int] = set()
        # (region, a, state bytes and slots of its pages [a, a + len)): a
        # snapshot that keys() answers from while one merge_now request is
        # worked (prime/unprime).
        self._primed: tuple[Any, int, np.ndarray, np.ndarray | None] | None = None

    @property
    def max_mappings(self) -> int:
        return self.settings.max_mappings

    # -- keeping the counts ------------------------------------------------

    def add(self, reg: Any) -> None:
        self._maps[reg] = _RegionMaps()
        self._total[reg.worker] = self._total.get(reg.worker, 0) + 2   # backing and state bytes
        # Counted at the first estimate: pages may be merged already (by a
        # coordinator before this one).
        self._dirty.setdefault(reg.worker, set()).add(reg)

    def touch(self, reg: Any, first: int, n: int) -> None:
        """Pages [first, first + n) may have changed slot or state: recount
        their chunks (and the chunk before, which holds the boundary on their
        left) at the next estimate."""
        m = self._maps.get(reg)
        if m is None or n <= 0:
            return
        c0, c1 = max(first - 1, 0) // CHUNK, (first + n - 1) // CHUNK + 1
        if c1 - c0 > TOUCH_ALL:
            m.all_dirty = True
        elif not m.all_dirty:
            m.dirty.update(range(c0, c1))
        self._dirty.setdefault(reg.worker, set()).add(reg)

    def drop(self, reg: Any) -> None:
        """The region is gone; forget the worker when it was its last."""
        m = self._maps.pop(reg, None)
        if m is None:
            return
        w = reg.worker
        self._total[w] -= 2 + m.total
        self._dirty.get(w, set()).discard(reg)
        if not any(r.worker is w for r in self._maps):
            for d in (self._total, self._dirty, self._inflight, self._planned):
                d.pop(w, None)
            self._warned.discard(id(w))

    def keys(self, reg: Any, pages: np.ndarray) -> np.ndarray:
        """The stretch key of each page.  The worker's state byte says whether
        the page is mapped from its backing (a break shows at once); the
        scanner's slot says which stable run it maps.  A page merged without
        a slot we know of (by a coordinator before a restart) is FOREIGN;
        neighbouring ones are taken for one run, as they were most likely
        merged.  Pages within a primed snapshot (``prime``) are answered
        from it."""
        n = len(pages)
        primed = self._primed
        if n and primed is not None and primed[0] is reg:
            a0, state, slot = primed[1], primed[2], primed[3]
            lo, hi = int(pages[0]), int(pages[-1])
            if n > 1 and hi - lo == n - 1 and lo >= a0 and hi < a0 + len(state) \
                    and (pages[1:] > pages[:-1]).all():
                sel: Any = slice(lo - a0, hi - a0 + 1)       # a range: slices
            elif lo >= a0 and hi < a0 + len(state) and int(pages.min()) >= a0 \
                    and int(pages.max()) < a0 + len(state):
                sel = pages - a0
            else:
                sel = None
            if sel is not None:
                return self._keys(pages, state[sel], None if slot is None else slot[sel])
        if n > 1 and (np.diff(pages) == 1).all():
            a = int(pages[0])                # a range (the common case): slices, one pread
            state, slot = reg.states[a:a + n], reg.slot[a:a + n]
        else:
            state, slot = reg.states[pages], reg.slot[pages]
        return self.keys_of(pages, state, slot)

    @staticmethod
    def keys_of(pages: np.ndarray, state: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """``keys`` from the state bytes and slots given for the pages."""
        key = np.where(slot >= 0, (slot.astype(np.int64) - pages) * 4,
                       np.where(state == ZERO_STATE, ZERO_KEY, FOREIGN_KEY))
        key[(state == PRIVATE_STATE) | (state == MERGING_STATE)] = PRIVATE_KEY
        return key

    @classmethod
    def _keys(cls, pages: np.ndarray, state: np.ndarray, slot: np.ndarray | None) -> np.ndarray:
        """``keys_of``; ``slot`` None: no page has one."""
        if slot is not None:
            return cls.keys_of(pages, state, slot)
        key = np.where(state == ZERO_STATE, ZERO_KEY, FOREIGN_KEY)
        key[(state == PRIVATE_STATE) | (state == MERGING_STATE)] = PRIVATE_KEY
        return key

    def prime(self, reg: Any, a: int, state: np.ndarray, slot: np.ndarray | None) -> None:
        """Until ``unprime``, answer ``keys`` for the pages [a, a + len(state))
        of ``reg`` from these state bytes and slots (None: no page has one),
        read once: merge_now works one range of one region, whose slots
        do not change meanwhile (only replies change them), and any snapshot
        of the worker's state bytes is as good as another for an estimate.
        Keys are made for the pages asked only (admission asks for the pages
        of the range and their neighbours; a recount, now rare, for chunks)."""
        self._primed = (reg, a, state, slot)

    def unprime(self) -> None:
        self._primed = None

    def _recount(self, reg: Any, m: _RegionMaps) -> None:
        # Chunk c holds the boundaries q in [c * CHUNK, min((c + 1) * CHUNK, last)),
        # q sitting between pages q and q + 1.  Each run of dirty chunks is
        # recounted from one read of its state bytes per piece (statistics
        # may find every chunk dirty: one read, not one per chunk).
        last = reg.npages - 1
        if m.all_dirty:
            m.bounds.clear()
            todo = self._chunks_with_state(reg)
        else:
            todo = sorted(m.dirty)
            for c in todo:
                m.bounds.pop(c, None)
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and todo[j] == todo[j - 1] + 1 and j - i < PIECE_CHUNKS:
                j += 1
            c0, c1 = todo[i], todo[j - 1] + 1
            i = j
            a, b = c0 * CHUNK, min(c1 * CHUNK, last)
            if b <= a:
                continue
            k = self.keys(reg, np.arange(a, b + 1))
            edge = (k[1:] != k[:-1]).astype(np.int64)          # edge[i]: boundary a + i
            starts = np.arange(c1 - c0) * CHUNK
            inside = starts < len(edge)
            counts = np.add.reduceat(edge, starts[inside])
            for c in np.flatnonzero(counts).tolist():
                m.bounds[c0 + c] = int(counts[c])
        m.dirty.clear()
        m.all_dirty = False
        m.total = sum(m.bounds.values())

    @staticmethod
    def _chunks_with_state(reg: Any) -> list[int]:
        """The chunks that can hold a boundary: where the state bytes hold
        data, and the chunk before each such range (it holds the boundary on
        the range's left).  Every chunk when the states are a plain array."""
        ranges = getattr(reg.states, "data_ranges", None)
        nchunks = max(-(-reg.npages // CHUNK), 1)
        if ranges is None:
            return list(range(nchunks))
        out: set[int] = set()
        for a, b in ranges():
            out.update(range(max(a - 1, 0) // CHUNK, min((b - 1) // CHUNK + 1, nchunks)))
        return sorted(out)

    def estimate(self, worker: Any) -> int:
        """The worker's mappings: its regions' layout, its unanswered merge
        runs and what this batch has queued for it."""
        for reg in self._dirty.pop(worker, ()):
            m = self._maps[reg]
            before = m.total
            self._recount(reg, m)
            self._total[worker] += m.total - before
        return (PROCESS_MAPPINGS + self._total.get(worker, 0) + 2 * self._inflight.get(worker, 0)
                + self._planned.get(worker, 0))

    def _bound(self, worker: Any) -> int | None:
        """An upper bound of ``estimate(worker)`` that recounts nothing, or
        None when a whole region awaits its recount.  A chunk to recount
        holds at most CHUNK boundaries, and the count it had is in the total
        already: so the total plus CHUNK per such chunk.  merge_now touches
        a chunk or two per request; recounting them at every request cost
        more than the request's own work (a recount reads and compares the
        chunk's keys), and a worker far from its limit needs no exact count."""
        extra = 0
        for reg in self._dirty.get(worker, ()):
            m = self._maps[reg]
            if m.all_dirty:
                return None
            extra += CHUNK * len(m.dirty)
        return (PROCESS_MAPPINGS + self._total.get(worker, 0) + extra + 2 * self._inflight.get(worker, 0)
                + self._planned.get(worker, 0))

    def _fits(self, worker: Any, need: int) -> bool:
        """``need`` more mappings surely fit, judged without a recount."""
        b = self._bound(worker)
        return b is not None and b + need <= self.max_mappings

    # -- admitting merges --------------------------------------------------

    def full(self, worker: Any) -> bool:
        """No room left for a merge that adds a run (2 mappings): the scanner
        then does not even read the worker's pages."""
        if self._fits(worker, 2):
            return False
        return self.estimate(worker) + 2 > self.max_mappings

    def costs(self, reg: Any, pages: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Mappings added by mapping each of the (ascending) pages to the new
        keys, in order, each counting the earlier ones as done.  The pairs of
        neighbouring pages telescope, so any prefix sum is exact."""
        if not len(pages):
            return np.zeros(0, np.int64)
        last = reg.npages - 1
        left_pages, right_pages = np.maximum(pages - 1, 0), np.minimum(pages + 1, last)
        lo, hi = int(left_pages.min()), int(right_pages.max())
        if hi - lo < 4 * len(pages) + CHUNK:
            # One read of the state bytes around the pages, not three.
            k = self.keys(reg, np.arange(lo, hi + 1))
            old, left_old, right_old = k[pages - lo], k[left_pages - lo], k[right_pages - lo]
        else:
            old = self.keys(reg, pages)
            left_old = self.keys(reg, left_pages)
            right_old = self.keys(reg, right_pages)
        follows = np.zeros(len(pages), bool)
        follows[1:] = pages[1:] == pages[:-1] + 1
        left = np.where(follows, np.roll(new, 1), left_old)
        has_left = pages > 0
        has_right = pages < last
        lc = (new != left).astype(np.int64) - (old != left)
        rc = (new != right_old).astype(np.int64) - (old != right_old)
        return np.where(has_left, lc, 0) + np.where(has_right, rc, 0)

    def room(self, reg: Any, pages: np.ndarray, new: np.ndarray) -> tuple[int, int]:
        """(n, cost): how many of the pages, in order, fit the worker's budget,
        and what they cost."""
        if not len(pages):
            return 0, 0
        ascending = len(pages) == 1 or bool((pages[1:] > pages[:-1]).all())
        if ascending and self._fits(reg.worker, 2 * len(pages)):
            # Each page adds two mappings at most: all fit, and what they
            # cost is the change of boundaries around them (the sum of costs()).
            return len(pages), self._delta(reg, pages, new)
        est = self.estimate(reg.worker)
        if est + 2 * len(pages) <= self.max_mappings and ascending:
            return len(pages), self._delta(reg, pages, new)
        cum = np.cumsum(self.costs(reg, pages, new))
        over = np.flatnonzero(est + cum > self.max_mappings)
        n = int(over[0]) if len(over) else len(pages)
        if n < len(pages):
            self._warn(reg.worker, est)
        return n, int(cum[n - 1]) if n else 0

    def _delta(self, reg: Any, pages: np.ndarray, new: np.ndarray) -> int:
        """Mappings added by mapping the (ascending, distinct) pages to the
        new keys: the boundaries after, less those before, over the pages
        and their two neighbours."""
        lo, hi = max(int(pages[0]) - 1, 0), min(int(pages[-1]) + 1, reg.npages - 1)
        if hi - lo >= 4 * len(pages) + CHUNK:
            return int(self.costs(reg, pages, new).sum())
        k = self.keys(reg, np.arange(lo, hi + 1, dtype=np.int64))
        after = k.copy()
        after[pages - lo] = new
        return int(np.count_nonzero(after[1:] != after[:-1])) - int(np.count_nonzero(k[1:] != k[:-1]))

    def commit(self, worker: Any, cost: int) -> None:
        self._planned[worker] = self._planned.get(worker, 0) + cost

    def admit(self, reg: Any, pages: np.ndarray,
              slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split a merge of pages onto slots (-1: the zero page) into what
        fits the budget and what does not: (pages, slots, skipped pages)."""
        pages = np.asarray(pages, np.int64)
        slots = np.asarray(slots, np.int64)
        if len(pages) > 1 and (np.diff(pages) <= 0).any():
            order = np.argsort(pages, kind="stable")
            pages, slots = pages[order], slots[order]
        new = np.where(slots >= 0, (slots - pages) * 4, ZERO_KEY)
        n, cost = self.room(reg, pages, new)
        self.commit(reg.worker, cost)
        self.pages_skipped += len(pages) - n
        return pages[:n], slots[:n], pages[n:]

    def admit_pairs(self, oreg: Any, opages: np.ndarray, reg: Any, rpages: np.ndarray,
                    starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Which runs of pairs may merge onto new runs of slots, both sides
        within their worker's budget (a slot mapped by one side alone saves
        nothing): a bool per run [starts[i], ends[i]) of the pair arrays
        opages <-> rpages (each run advancing by one page on both sides; the
        runs contiguous, in order).  Admits all, or the longest prefix that
        fits, and counts the pages of the others as skipped."""
        nruns = len(starts)
        rid = np.repeat(np.arange(nruns), ends - starts)
        okeys = FRESH_KEY + 8 * rid                  # a run of its own each (never a multiple of 4)
        rkeys = FRESH_KEY + 8 * (rid + nruns)
        oest = self.estimate(oreg.worker)
        rest = oest if oreg.worker is reg.worker else self.estimate(reg.worker)

        def fit(k: int) -> tuple[bool, int, int]:
            """Do the first k pairs fit, and at what cost to each side."""
            if oreg is reg:
                c = self._costs_any_order(reg, np.concatenate((opages[:k], rpages[:k])),
                                          np.concatenate((okeys[:k], rkeys[:k])))
                oc, rc = int(c[:k].sum()), int(c[k:].sum())
            else:
                oc = int(self._costs_any_order(oreg, opages[:k], okeys[:k]).sum())
                rc = int(self._costs_any_order(reg, rpages[:k], rkeys[:k]).sum())
            if oreg.worker is reg.worker:
                ok = oest + oc + rc <= self.max_mappings
            else:
                ok = oest + oc <= self.max_mappings and rest + rc <= self.max_mappings
            return ok, oc, rc

        n = nruns
        ok, oc, rc = fit(len(rid))
        if not ok:
            # The longest prefix of runs that fits (costs grow with the prefix
            # but for runs that join others; the answer is checked exactly).
            lo, hi = 0, nruns - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fit(int(ends[mid - 1]))[0]:
                    lo = mid
                else:
                    hi = mid - 1
            n = lo
            ok, oc, rc = fit(int(ends[n - 1])) if n else (True, 0, 0)
            if not ok:
                n, oc, rc = 0, 0, 0
            self.pages_skipped += 2 * (len(rid) - (int(ends[n - 1]) if n else 0))
            self._warn(oreg.worker if oest >= rest else reg.worker, max(oest, rest))
        self.commit(oreg.worker, oc)
        self.commit(reg.worker, rc)
        keep = np.zeros(nruns, bool)
        keep[:n] = True
        return keep

    def _costs_any_order(self, reg: Any, pages: np.ndarray, keys: np.ndarray) -> np.ndarray:
        order = np.argsort(pages, kind="stable")
        out = np.empty(len(pages), np.int64)
        out[order] = self.costs(reg, pages[order], keys[order])
        return out

    def end_batch(self, sent: dict[Any, int]) -> None:
        """The batch's merges went out as ``sent[worker]`` runs: their cost is
        counted as in flight (2 each) from now until the replies."""
        for worker, runs in sent.items():
            self._inflight[worker] = self._inflight.get(worker, 0) + runs
        self._planned.clear()

    def settled(self, worker: Any, runs: int) -> None:
        """Replies (or the worker's end) for runs of a merge request."""
        left = self._inflight.get(worker, 0) - runs
        if left > 0:
            self._inflight[worker] = left
        else:
            self._inflight.pop(worker, None)

    def _warn(self, worker: Any, est: int) -> None:
        key = id(worker)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("pid %s: mapping budget reached (~%d of max_mappings %d); merges that "
                        "would add mappings are skipped (pages_skipped_budget)",
                        getattr(worker, "pid", "?"), est, self.max_mappings)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
