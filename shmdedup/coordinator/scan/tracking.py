"""What the coordinator tracks per registered region and page.

``RegionState`` holds one worker region's per-page arrays (16 bytes a page:
checksum, slot, status, advice, smart_scan age and skips) and reads the
worker's state bytes with pread (``security.StateBytes``: never a mapping, so a
worker shrinking its objects cannot crash the coordinator).  The status codes
are the scanner's view of each page; the worker's state byte is the truth about
its mapping.  Also the helpers the scanner and coordinator share: the zero
page's checksum, runs from page/slot arrays (``_coalesce``), pages merged by a
previous coordinator (``_inherited``), and two array helpers (``_unique``,
``_repeated``) that the scan's hot path uses instead of np.unique.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmdedup import _native, _shm
from shmdedup.coordinator.security import StateBytes, check_worker_object

PAGE_SIZE: int = _native.PAGE_SIZE
CHUNK_PAGES = 2048          # pages read and hashed per pread/hash call
METADATA_BYTES_PER_PAGE = 8 + 4 + 1 + 1 + 1 + 1

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
    _meta_map: Any = None
    checksum: np.ndarray = field(init=False)
    slot: np.ndarray = field(init=False)
    status: np.ndarray = field(init=False)
    advice: np.ndarray = field(init=False)
    age: np.ndarray = field(init=False)      # smart_scan: visits without a merge
    skip: np.ndarray = field(init=False)     # smart_scan: visits still to skip
    closed: bool = False
    uid: int = -1                            # the scanner's id, for the unstable index

    def __post_init__(self) -> None:
        self.checksum = np.zeros(self.npages, np.uint64)
        self.slot = np.full(self.npages, -1, np.int32)
        self.status = np.zeros(self.npages, np.uint8)
        self.advice = np.zeros(self.npages, bool)
        self.age = np.zeros(self.npages, np.uint8)
        self.skip = np.zeros(self.npages, np.uint8)

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
        if self._meta_map is not None:
            try:
                self._meta_map.close()
            except BufferError:
                pass  # a view is still alive; the map is freed with it
        for fd in (self.backing_fd, self.meta_fd):
            os.close(fd)

    def present(self, p0: int, p1: int) -> np.ndarray:
        """Mask of pages in [p0, p1) that hold data (holes are never read)."""
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


# One run of a merge or unmerge request: (region, first page, pages, first slot),
# page and slot both advancing by one (slot -1: the zero page throughout).
Run = tuple[RegionState, int, int, int]
# Pages queued for one request: (region, pages, slots or -1), int64 arrays;
# _coalesce turns them into Runs.
Queued = tuple[RegionState, np.ndarray, np.ndarray]
# Queued pages of one batch, per worker (the scanner keys them by reg.worker).
QueuedByWorker = dict[Any, list[Queued]]


def _inherited(reg: RegionState) -> np.ndarray:
    """Pages merged by a previous coordinator (this one never tracked them).

    After a coordinator restart the workers' merged pages stay mapped on the
    dead coordinator's stable object, which lives on through those mappings:
    they are correct, copy-on-write still works, and the memory stays saved.
    This coordinator cannot read that object, so it leaves them alone: it
    never scans them (they are not PRIVATE), counts them apart
    (``pages_inherited``, not in pages_shared/pages_sharing, which describe
    its own slots), and scans a page normally once a write breaks it.
    run=2 unmerges them like the rest."""
    s = reg.states[:]
    out: np.ndarray = (reg.status == NEW) & ((s == _native.MERGED) | (s == _native.ZERO))
    return out


def _coalesce(items: list[Queued]) -> list[Run]:
    """(reg, pages, slots) array triples -> (reg, first, n, slot) runs where both
    the page and the slot advance by one (zero-page items: slot -1 throughout)."""
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
        zero = slots < 0
        cut = np.flatnonzero((np.diff(pages) != 1) | (zero[1:] != zero[:-1])
                             | (~zero[1:] & (np.diff(slots) != 1))) + 1
        starts = np.concatenate(([0], cut))
        ends = np.concatenate((cut, [len(pages)]))
        runs.extend((reg, int(pages[a]), int(b - a), int(slots[a])) for a, b in zip(starts.tolist(), ends.tolist()))
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
