"""What the coordinator tracks per registered region and page.

``RegionState`` holds one worker region's per-page fields (checksum, slot,
status, smart_scan age and skips: 15 bytes a page, kept only for blocks of
pages that hold data or a merge, ``pagetable.PageTable``), its advice as runs
(``pagetable.AdviceRuns``), and reads the worker's state bytes with pread
(``security.StateBytes``: never a mapping, so a worker shrinking its objects
cannot crash the coordinator).  What a worker claims (pages, advice) costs the
coordinator nothing per page; only what its objects hold does.  The status
codes are the scanner's view of each page; the worker's state byte is the
truth about its mapping.  Also the helpers the scanner and coordinator share:
the zero page's checksum, merge and unmerge runs (:class:`Run`, made from
page/slot arrays by ``_coalesce``), pages merged by a previous coordinator
(``inherited_pages``), and two array helpers (``_unique``, ``_repeated``)
that the scan's hot path uses instead of np.unique.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from shmdedup import _native, _shm
from shmdedup.coordinator.scan.pagetable import BYTES_PER_PAGE, AdviceRuns, Field, PageTable
from shmdedup.coordinator.security import StateBytes, check_worker_object
from shmdedup.pages import PAGE_SIZE, cut_runs

# Per tracked page: checksum, slot, status, age, skips (pagetable.FIELDS).
METADATA_BYTES_PER_PAGE = BYTES_PER_PAGE
# Most state bytes read at once when a whole region is looked at (inherited
# pages, budget recounts): bounded temporaries, whatever the region's size.
STATE_PIECE = 1 << 20

# Per-page status, the scanner's view (the worker's state byte is the truth
# about the mapping; this is what the scanner last decided).
NEW = 0         # never visited
VOLATILE = 1    # visited, checksum recorded, in no index
UNSHARED = 2    # inserted into the unstable index at its last visit
MERGED = 3      # mapped to slot[page] (the worker confirmed)
ZERO = 4        # mapped to the zero page (use_zero_pages)
PENDING = 5     # a merge request is in flight
UNMERGING = 6   # an unmerge request is in flight (still counted as a sharer)

_ZERO_PAGE = bytes(PAGE_SIZE)
_cachestat = True            # cleared if the kernel lacks cachestat(2)
ZERO_CHECKSUM = int(np.frombuffer(_native.hash_pages(_ZERO_PAGE), np.uint64)[0])


@dataclass(eq=False)
class RegionState:
    """What the coordinator tracks for one registered region of one worker."""

    worker: Any
    rid: int
    npages: int
    backing_fd: int
    meta_fd: int
    states: Any                              # the worker's state bytes (security.StateBytes: pread)
    table: PageTable = field(init=False)     # per-page fields, for blocks that need them
    advice: AdviceRuns = field(init=False)   # pages advised mergeable, as runs
    checksum: Field = field(init=False)      # views of the table's fields, indexed by page
    slot: Field = field(init=False)
    status: Field = field(init=False)
    age: Field = field(init=False)           # smart_scan: visits without a merge
    skip: Field = field(init=False)          # smart_scan: visits still to skip
    closed: bool = False
    uid: int = -1                            # the scanner's id, for the unstable index
    inherits: bool = True                    # False once count_inherited found none

    def __post_init__(self) -> None:
        self.table = PageTable(self.npages)
        self.advice = AdviceRuns(self.npages)
        for name in ("checksum", "slot", "status", "age", "skip"):
            setattr(self, name, Field(self.table, name))

    @classmethod
    def open(cls, worker: Any, rid: int, npages: int, backing_fd: int, meta_fd: int) -> RegionState:
        # Both objects are the worker's: vetted here, then only ever pread
        # (never mapped: a worker shrinking its object must not SIGBUS us).
        check_worker_object(backing_fd, "backing object", npages * PAGE_SIZE)
        check_worker_object(meta_fd, "metadata object", npages)
        return cls(worker, rid, npages, backing_fd, meta_fd, StateBytes(meta_fd, npages))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.states = np.zeros(0, np.uint8)
        self.table.clear()
        for fd in (self.backing_fd, self.meta_fd):
            os.close(fd)

    def next_data(self, p: int) -> int | None:
        """The first page at or after p that holds data in the backing (the
        object may shrink or grow meanwhile: a hint, never an error).

        ``_shm.next_data`` asks cachestat (page p itself first, the common
        answer), which never waits for the object's inode lock (a seek did:
        a worker punching merged pages holds it, and the scan spun on it,
        190 us a seek, 4% of the coordinator's CPU converging; a peer can
        hold it for ever, tests/hostile/test_lock_attacks.py)."""
        off = _shm.next_data(self.backing_fd, p * PAGE_SIZE)
        return None if off is None else off // PAGE_SIZE

    def present(self, p0: int, p1: int) -> np.ndarray:
        """Mask of pages in [p0, p1) that hold data (holes are never read).
        The worker may truncate, grow or punch its object at any moment: the
        answer is a snapshot, and a page that goes away after it reads as
        zeros (pread past the end)."""
        global _cachestat
        if _cachestat:
            # Fast path: one cachestat call says whether every page is there.
            try:
                if _native.resident_pages(self.backing_fd, p0 * PAGE_SIZE, (p1 - p0) * PAGE_SIZE) == p1 - p0:
                    return np.ones(p1 - p0, bool)
            except OSError:
                _cachestat = False   # an older kernel: seeks only
        mask = np.zeros(p1 - p0, bool)
        for start, length in _shm.data_extents(self.backing_fd, p0 * PAGE_SIZE, p1 * PAGE_SIZE):
            a = start // PAGE_SIZE - p0
            b = -(-(start + length) // PAGE_SIZE) - p0
            mask[max(a, 0):min(b, p1 - p0)] = True
        return mask


class Run(NamedTuple):
    """One run of a merge or unmerge request: ``n`` pages of ``region`` from
    page ``first`` onto the stable slots from ``slot``, page and slot both
    advancing by one (slot -1: the zero page throughout)."""
    region: RegionState
    first: int
    n: int
    slot: int


# Pages queued for one request: (region, pages, slots or -1), int64 arrays;
# _coalesce turns them into Runs.
Queued = tuple[RegionState, np.ndarray, np.ndarray]
# Queued pages of one batch, per worker (the scanner keys them by reg.worker).
QueuedByWorker = dict[Any, list[Queued]]


def inherited_pages(reg: RegionState) -> np.ndarray:
    """Pages merged by a previous coordinator (this one never tracked them),
    ascending (int64; ``count_inherited`` counts them).

    After a coordinator restart the workers' merged pages stay mapped on the
    dead coordinator's stable object, which lives on through those mappings:
    they are correct, copy-on-write still works, and the memory stays saved.
    This coordinator cannot read that object, so it leaves them alone: it
    never scans them (they are not PRIVATE), counts them apart
    (``pages_inherited``, not in pages_shared/pages_sharing, which describe
    its own slots), and scans a page normally once a write breaks it.
    run=2 unmerges them like the rest.

    Only state bytes that hold data are read (a hole in the worker's metadata
    object is PRIVATE), a piece at a time: the cost follows what the worker
    wrote, not the size it claims."""
    found = list(_inherited_pieces(reg)) if reg.inherits else []
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def count_inherited(reg: RegionState) -> int:
    """How many pages ``inherited_pages`` would return.

    A region has inherited pages only from its registration on (merged
    before it, by a previous coordinator), and only fewer as they are
    broken or unmerged: once none is left, the region is never read for
    them again, so a statistics request does not read every state byte
    of every merged page (1-20 ms a request at 1-8 GiB)."""
    if not reg.inherits:
        return 0
    n = sum(len(p) for p in _inherited_pieces(reg))
    if n == 0:
        reg.inherits = False
    return n


def _inherited_pieces(reg: RegionState) -> Iterator[np.ndarray]:
    if _shm.next_data(reg.meta_fd, 0) is None:     # no state byte written at all: one look
        return
    for a0, b0 in reg.states.data_ranges():
        for a in range(a0, b0, STATE_PIECE):
            b = min(a + STATE_PIECE, b0)
            s = reg.states[a:b]
            hit = (s == _native.MERGED) | (s == _native.ZERO)
            if hit.any():
                hit &= reg.table.get_range("status", a, b) == NEW
                yield np.flatnonzero(hit) + a


def _coalesce(items: list[Queued]) -> list[Run]:
    """(reg, pages, slots) array triples -> Runs where both
    the page and the slot advance by one (zero-page items: slot -1 throughout)."""
    if len(items) == 1 and len(items[0][1]):
        # One run of pages onto one run of slots (a merge_now chunk): no cut.
        reg, pages, slots = items[0]
        n, p0, s0 = len(pages), int(pages[0]), int(slots[0])
        if int(pages[-1]) - p0 == n - 1 and (n == 1 or (pages[1:] > pages[:-1]).all()) and (
                (s0 >= 0 and int(slots[-1]) - s0 == n - 1 and (n == 1 or (slots[1:] > slots[:-1]).all()))
                or (s0 < 0 and bool((slots < 0).all()))):
            return [Run(reg, p0, n, s0)]
    by_reg: dict[int, tuple[RegionState, list[np.ndarray], list[np.ndarray]]] = {}
    for reg, pages, slots in items:
        e = by_reg.setdefault(id(reg), (reg, [], []))
        e[1].append(pages)
        e[2].append(slots)
    runs: list[Run] = []
    for reg, pl, sl in by_reg.values():
        pages = np.concatenate(pl) if len(pl) > 1 else pl[0]
        slots = np.concatenate(sl) if len(sl) > 1 else sl[0]
        if len(pages) > 1 and not (pages[1:] > pages[:-1]).all():
            order = np.argsort(pages, kind="stable")
            pages, slots = pages[order], slots[order]
        starts, ends = cut_runs(pages, slots)
        runs.extend(Run(reg, int(pages[a]), int(b - a), int(slots[a])) for a, b in zip(starts.tolist(), ends.tolist()))
    return runs


def _unique(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-D integer array, like np.unique but
    cheaper, and without np.unique's lazy import of numpy.ma (numpy 2.x),
    which costs ~45 ms the first time a coordinator merges."""
    s = np.sort(np.asarray(a).ravel())
    if len(s) < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def _first_of_each(a: np.ndarray) -> np.ndarray:
    """Ascending indexes of the first occurrence of each value of a 1-D array
    (np.unique's return_index, without its cost)."""
    if len(a) < 2:
        return np.arange(len(a))
    s = np.sort(a)                  # unstable, vectorised: no repeat is the common case
    if not (s[1:] == s[:-1]).any():
        return np.arange(len(a))
    order = np.argsort(a, kind="stable")
    s = a[order]
    return np.sort(order[np.concatenate(([True], s[1:] != s[:-1]))])


def _repeated(a: np.ndarray) -> np.ndarray:
    """Mask of the elements of a 1-D array whose value occurs more than once."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    eq = s[1:] == s[:-1]
    mark = np.zeros(len(a), bool)
    mark[1:] = eq
    mark[:-1] |= eq
    out = np.empty(len(a), bool)
    out[order] = mark
    return out


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
