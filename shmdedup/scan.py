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

New slots continue the run of the previous page's slot when they can, so
consecutive duplicate pages map to consecutive slots and a worker maps a whole
run with one mmap.  Merges are queued per worker and sent as coalesced runs.
The coordinator's checksum and compare are only hints: the worker proves
equality under write protection before mapping (DESIGN invariant 1).

Per tracked page the scanner keeps 14 bytes: checksum (8), slot (4), status (1)
and advice (1).  Statistics are derived from these arrays on demand, so they
always equal a recount.

Slots outlive connections, never mappings (invariants 6 and 7): a region whose
worker disconnected but may be alive is *detached* (kept, not scanned, its
sharer references held until its worker exits or its state bytes show a page
broken); closing the scanner frees nothing.  Pages a previous coordinator
merged are *inherited* (see ``_inherited``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmdedup import _native, _shm
from shmdedup.stable import StableSegment

log = logging.getLogger("shmdedup.coordinator")

PAGE_SIZE: int = _native.PAGE_SIZE
CHUNK_PAGES = 2048          # pages read and hashed per pread/hash call
METADATA_BYTES_PER_PAGE = 8 + 4 + 1 + 1

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
ZERO_CHECKSUM = _native.murmur3_128(_ZERO_PAGE)[0]


@dataclass(eq=False)
class RegionState:
    """What the coordinator tracks for one registered region of one worker."""

    worker: Any
    rid: int
    npages: int
    backing_fd: int
    meta_fd: int
    states: np.ndarray                       # the worker's state bytes (read-only map)
    _meta_map: Any = None
    checksum: np.ndarray = field(init=False)
    slot: np.ndarray = field(init=False)
    status: np.ndarray = field(init=False)
    advice: np.ndarray = field(init=False)
    closed: bool = False

    def __post_init__(self) -> None:
        self.checksum = np.zeros(self.npages, np.uint64)
        self.slot = np.full(self.npages, -1, np.int32)
        self.status = np.zeros(self.npages, np.uint8)
        self.advice = np.zeros(self.npages, bool)

    @classmethod
    def open(cls, worker: Any, rid: int, npages: int, backing_fd: int, meta_fd: int) -> RegionState:
        import mmap
        size = os.fstat(backing_fd).st_size
        if size < npages * PAGE_SIZE:
            raise ValueError(f"backing object holds {size} bytes, {npages * PAGE_SIZE} needed")
        meta_len = -(-npages // PAGE_SIZE) * PAGE_SIZE
        if os.fstat(meta_fd).st_size < meta_len:
            raise ValueError("metadata object is smaller than one byte per page")
        mm = mmap.mmap(meta_fd, meta_len, mmap.MAP_SHARED, mmap.PROT_READ)
        states = np.frombuffer(mm, np.uint8, npages)
        return cls(worker, rid, npages, backing_fd, meta_fd, states, mm)

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
        mask = np.zeros(p1 - p0, bool)
        for start, length in _shm.data_extents(self.backing_fd, p0 * PAGE_SIZE, p1 * PAGE_SIZE):
            a = start // PAGE_SIZE - p0
            b = -(-(start + length) // PAGE_SIZE) - p0
            mask[max(a, 0):min(b, p1 - p0)] = True
        return mask


class Scanner:
    """Stable and unstable indexes, the cursor, and the slot accounting.

    ``send_merge(worker, items)`` / ``send_unmerge(worker, items)`` are called
    with lists of (rid, first, npages, slot) runs; the coordinator sends them
    and later calls :meth:`merge_done` / :meth:`unmerge_done`.
    """

    def __init__(self, send_merge: Callable[[Any, list], None],
                 send_unmerge: Callable[[Any, list], None]) -> None:
        self.send_merge = send_merge
        self.send_unmerge = send_unmerge
        self.stable = StableSegment()
        self.regions: list[RegionState] = []
        # Regions of workers that disconnected while perhaps still alive; they
        # hold sharer references but are not scanned (see detach_region).
        self.detached: list[RegionState] = []
        self.cursor = 0          # index into regions
        self.cursor_page = 0
        self.stable_index: dict[int, list[int]] = {}
        self.unstable: dict[int, tuple[RegionState, int]] = {}
        cap = 1024
        self.sharers = np.zeros(cap, np.int32)
        self.pending = np.zeros(cap, np.int32)
        self.slot_hash = np.zeros(cap, np.uint64)
        self.full_scans = 0
        self.pages_scanned = 0
        # Controls the scanner reads (the coordinator validates them).
        self.max_page_sharing = 256
        self.max_kernel_pages = 0
        self.use_zero_pages = False
        # Where the last new slot went, to continue runs across pages/batches.
        self._last_new: tuple[RegionState, int, RegionState, int, int] | None = None

    # -- registration ----------------------------------------------------

    def add_region(self, reg: RegionState) -> None:
        self.regions.append(reg)

    def remove_region(self, reg: RegionState) -> None:
        """Drop a region (closed or its worker died): its merged pages stop
        sharing; pending requests are settled by :meth:`forget_request`."""
        self._unlink(reg)
        self._release(reg)

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

    def release_detached(self, reg: RegionState) -> None:
        """The worker of a detached region has exited: release its slots."""
        self.detached.remove(reg)
        self._release(reg)

    def _unlink(self, reg: RegionState) -> None:
        i = self.regions.index(reg)
        del self.regions[i]
        if i < self.cursor:
            self.cursor -= 1
        elif i == self.cursor:
            self.cursor_page = 0
        self.unstable = {h: v for h, v in self.unstable.items() if v[0] is not reg}

    def _release(self, reg: RegionState) -> None:
        merged = reg.slot[(reg.slot >= 0)]
        np.subtract.at(self.sharers, merged, 1)
        reg.slot[:] = -1
        self._free_unused(np.unique(merged))
        reg.close()

    def _reconcile_detached(self) -> None:
        # A page whose state byte reads PRIVATE no longer maps its slot (the
        # break publishes PRIVATE after remapping the backing), whatever the
        # worker does next: its sharer reference can go.
        for reg in self.detached:
            gone = (reg.slot >= 0) & (reg.states == _native.PRIVATE)
            if gone.any():
                slots = reg.slot[gone]
                np.subtract.at(self.sharers, slots, 1)
                reg.slot[gone] = -1
                self._free_unused(slots)

    def forget_request(self, items: list) -> None:
        """A request that will never be answered (worker gone): release its slots."""
        for reg, first, n, slot in items:
            if slot >= 0:
                self.pending[slot:slot + n] -= 1
                self._free_unused(np.arange(slot, slot + n))

    def idle(self) -> bool:
        """True when there is nothing to scan (ksmd keeps quiet, seed patch 5)."""
        return not any(r.advice.any() for r in self.regions)

    # -- slots -------------------------------------------------------------

    def _ensure_slot_arrays(self, n: int) -> None:
        if n <= len(self.sharers):
            return
        cap = max(n, 2 * len(self.sharers))
        for name in ("sharers", "pending", "slot_hash"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def _new_slot(self, content: memoryview, h: int, hint: int | None) -> int | None:
        if self.max_kernel_pages and self.stable.pages_in_use >= self.max_kernel_pages:
            return None
        s = self.stable.alloc(1, hint)
        if s is None:
            return None
        self._ensure_slot_arrays(s + 1)
        self.stable.write(s, content)
        self.slot_hash[s] = h
        self.stable_index.setdefault(h, []).append(s)
        return s

    def _free_unused(self, slots: np.ndarray) -> None:
        for s in np.unique(slots):
            s = int(s)
            if s < 0 or self.sharers[s] > 0 or self.pending[s] > 0:
                continue
            if not self.stable._slots.is_allocated(s, 1):
                continue
            h = int(self.slot_hash[s])
            chain = self.stable_index.get(h)
            if chain and s in chain:
                chain.remove(s)
                if not chain:
                    del self.stable_index[h]
            self.stable.free(s)
            self.sharers[s] = 0

    # -- the batch --------------------------------------------------------

    def batch(self, budget: int) -> int:
        """Visit up to ``budget`` pages from the cursor; returns pages visited.
        A batch ends at the end of a full scan, like ksmd's."""
        visited = 0
        merges: dict[Any, list] = {}
        unmerges: dict[Any, list] = {}
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
            self._reconcile(reg, p0, p1, unmerges)
            cand = reg.advice[p0:p1] & (reg.states[p0:p1] == _native.PRIVATE)
            st = reg.status[p0:p1]
            cand &= (st != PENDING) & (st != UNMERGING) & (reg.slot[p0:p1] < 0)
            if cand.any():
                cand &= reg.present(p0, p1)
            idx = np.flatnonzero(cand)
            if len(idx) > budget - visited:
                idx = idx[:budget - visited]
                p1 = p0 + int(idx[-1]) + 1
            self.cursor_page = p1
            if len(idx):
                visited += len(idx)
                self._visit(reg, idx + p0, merges)
        self.pages_scanned += visited
        for worker, items in merges.items():
            self.send_merge(worker, _coalesce(items))
        for worker, items in unmerges.items():
            self.send_unmerge(worker, _coalesce(items))
        return visited

    def _end_full_scan(self) -> None:
        self._reconcile_detached()
        self.full_scans += 1
        self.cursor = 0
        self.cursor_page = 0
        self.unstable.clear()
        self._last_new = None

    def _reconcile(self, reg: RegionState, p0: int, p1: int, unmerges: dict) -> None:
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
            self._free_unused(slots)
        merged = np.flatnonzero(st == MERGED) + p0
        if len(merged):
            slots = reg.slot[merged]
            lonely = (self.sharers[slots] == 1) & (self.pending[slots] == 0)
            for page in merged[lonely]:
                reg.status[page] = UNMERGING
                unmerges.setdefault(reg.worker, []).append((reg, int(page), int(reg.slot[page])))

    def _visit(self, reg: RegionState, pages: np.ndarray, merges: dict) -> None:
        n = len(pages)
        buf = np.empty(n * PAGE_SIZE, np.uint8)
        hashes = np.empty(n, np.uint64)
        _native.read_pages(reg.backing_fd, pages.astype(np.int64), buf, hashes)
        old = reg.checksum[pages]
        st = reg.status[pages]
        steady = (st != NEW) & (old == hashes)
        reg.checksum[pages] = hashes
        reg.status[pages[~steady]] = VOLATILE
        view = memoryview(buf)
        for k in np.flatnonzero(steady):
            page = int(pages[k])
            content = view[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
            self._cmp_and_merge(reg, page, int(hashes[k]), content, merges)

    def _queue(self, merges: dict, reg: RegionState, page: int, slot: int) -> None:
        reg.status[page] = PENDING
        if slot >= 0:
            self.pending[slot] += 1
        merges.setdefault(reg.worker, []).append((reg, page, slot))

    def _cmp_and_merge(self, reg: RegionState, page: int, h: int, content: memoryview,
                       merges: dict) -> None:
        if self.use_zero_pages and h == ZERO_CHECKSUM and _native.is_zero(content):
            self._queue(merges, reg, page, -1)
            return
        # Stable index: any slot of the chain with room and the same bytes.
        chain = self.stable_index.get(h)
        if chain:
            for s in chain:
                # pread, not StableSegment.read: the slot is known allocated
                # (it is indexed) and this is the scan's hot path.
                if self.sharers[s] + self.pending[s] < self.max_page_sharing and \
                        _native.pages_equal(content, os.pread(self.stable.fd, PAGE_SIZE, s * PAGE_SIZE)):
                    self._queue(merges, reg, page, s)
                    return
        # Unstable index.
        mate = self.unstable.get(h)
        if mate is not None:
            oreg, opage = mate
            if not oreg.closed and oreg.advice[opage] and oreg.status[opage] == UNSHARED \
                    and oreg.states[opage] == _native.PRIVATE:
                other = os.pread(oreg.backing_fd, PAGE_SIZE, opage * PAGE_SIZE)
                if _native.pages_equal(content, other):
                    hint = None
                    last = self._last_new
                    if last and last[0] is oreg and last[1] == opage - 1 and last[2] is reg \
                            and last[3] == page - 1:
                        hint = last[4] + 1
                    s = self._new_slot(content, h, hint)
                    if s is not None:
                        del self.unstable[h]
                        self._last_new = (oreg, opage, reg, page, s)
                        self._queue(merges, oreg, opage, s)
                        self._queue(merges, reg, page, s)
                        return
            else:
                del self.unstable[h]
        if h not in self.unstable:
            self.unstable[h] = (reg, page)
        reg.status[page] = UNSHARED

    # -- replies -----------------------------------------------------------

    def merge_done(self, items: list, result: bytes) -> None:
        """Settle a merge request: items are (reg, first, n, slot) runs, result
        one byte per page."""
        res = np.frombuffer(result, np.uint8)
        off = 0
        touched = []
        for reg, first, n, slot in items:
            ok = res[off:off + n].astype(bool)
            off += n
            if slot >= 0:
                slots = np.arange(slot, slot + n, dtype=np.int32)
                self.pending[slots] -= 1
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
                np.add.at(self.sharers, slots[ok], 1)
                reg.status[pages[ok]] = MERGED
            else:
                reg.status[pages[ok]] = ZERO
            # Refused by the worker's proof: the page changed under us.
            reg.status[pages[~ok]] = VOLATILE
        for slots in touched:
            self._free_unused(slots)

    def unmerge_done(self, items: list) -> None:
        """Settle an unmerge request (successful or not: the state bytes tell
        which pages are private now)."""
        for reg, first, n, _ in items:
            if reg.closed:
                continue
            pages = np.arange(first, first + n)
            private = reg.states[pages] == _native.PRIVATE
            slots = reg.slot[pages]
            freed = slots[private & (slots >= 0)]
            np.subtract.at(self.sharers, freed, 1)
            # KSM computes the checksum now so the page gets a quick chance to
            # enter the unstable index (or the stable one) at its next visit.
            reg.checksum[pages[private & (slots >= 0)]] = self.slot_hash[freed]
            reg.slot[pages[private]] = -1
            reg.status[pages[private]] = VOLATILE
            still = pages[~private]
            # Still merged: on our slot, on the zero page, or (no slot, not a
            # zero page) on a previous coordinator's stable object.
            reg.status[still] = np.where(reg.slot[still] >= 0, MERGED,
                                         np.where(reg.states[still] == _native.ZERO, ZERO, NEW))
            self._free_unused(freed)

    def merged_items(self, reg: RegionState) -> list:
        """(reg, page, slot) of every merged page of a region (for run=2),
        inherited ones included: run=2 unmerges everything."""
        pages = np.flatnonzero((reg.status == MERGED) | (reg.status == ZERO) | _inherited(reg))
        reg.status[pages] = UNMERGING
        return [(reg, int(p), int(reg.slot[p])) for p in pages]

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
        return {
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": volatile,
            "pages_scanned": self.pages_scanned,
            "full_scans": self.full_scans,
            "ksm_zero_pages": zero,
            "stable_node_chains": sum(1 for c in self.stable_index.values() if len(c) > 1),
            "general_profit": (sharing + zero) * PAGE_SIZE - rmap * METADATA_BYTES_PER_PAGE,
            "rmap_items": rmap,
            "stable_pages_allocated": self.stable.pages_in_use,
            "pages_inherited": inherited,
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
        }

    def close(self) -> None:
        """Close every region and the stable segment without freeing a slot:
        workers keep their merged pages, and the stable object lives on
        through their mappings until the last one is broken or unmapped."""
        for reg in self.regions + self.detached:
            reg.close()
        self.regions.clear()
        self.detached.clear()
        self.stable.close()


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
    s = reg.states
    return (reg.status == NEW) & ((s == _native.MERGED) | (s == _native.ZERO))


def _coalesce(items: list) -> list:
    """(reg, page, slot) triples -> (reg, first, n, slot) runs where both the
    page and the slot advance by one (zero-page items: slot -1 throughout)."""
    items.sort(key=lambda t: (id(t[0]), t[1]))
    runs: list = []
    for reg, page, slot in items:
        if runs:
            r = runs[-1]
            if r[0] is reg and r[1] + r[2] == page and (
                    (slot < 0 and r[3] < 0) or (slot >= 0 and r[3] >= 0 and r[3] + r[2] == slot)):
                r[2] += 1
                continue
        runs.append([reg, page, 1, slot])
    return [tuple(r) for r in runs]
