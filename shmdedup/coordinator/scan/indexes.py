"""The scanner's two indexes, KSM's stable and unstable trees.

Both are C hash tables keyed by page checksum, 37-75% full while growing and
halved once under 1/8 full, used in batches: the steady state keeps no Python
object per page.

* :class:`StableIndex` — checksum -> the newest stable slot with that content
  (``_native.SlotIndex``: 8 bytes a bucket, the checksums being ``slot_hash``);
  older slots with the same checksum (a full ``max_page_sharing`` chain, or a
  checksum collision) are linked through ``chain_prev``.  It also owns the
  stable segment and the per-slot accounting: ``sharers`` (worker pages whose
  merge was confirmed), ``pending`` (merges in flight), ``slot_hash`` and
  ``born_inline`` (when ``merge_now`` created the slot, 0.0 for the scan's:
  such a page is not given back to its only sharer before
  ``inline_keep_millisecs`` have passed, see ``inline.py``).  A slot is freed (punched)
  only when both counts are zero (DESIGN invariant 6).  The per-slot arrays
  (``SLOT_BYTES`` a slot) start zeroed and grow by doubling into zeroed
  (calloc) memory, so only slots in use take memory.
* :class:`UnstableIndex` — checksum -> (region uid, page) of a unique page seen
  in this full scan (``_native.HashIndex``, 16 bytes a bucket).  Emptied at
  every full scan, as Linux rebuilds its unstable tree, and sized then for
  what it held: its memory is given back once its entries have left (they
  leave as their pages merge), kept while the same unique pages fill it scan
  after scan.  Entries are hints: the scanner re-checks that the page is
  still private, advised and unchanged.
"""

from __future__ import annotations

import errno
import logging
import os

import numpy as np

from shmdedup import _native
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.coordinator.scan.stable import StableSegment
from shmdedup.coordinator.scan.tracking import _unique
from shmdedup.pages import PAGE_SIZE, cut_runs

log: logging.Logger = logging.getLogger("shmdedup.coordinator")


# Per stable slot: sharers 4, pending 4, slot_hash 8, chain_prev 4, born_inline 8.
SLOT_BYTES = 28
_SLOT_FIELDS = (("sharers", np.int32), ("pending", np.int32), ("slot_hash", np.uint64),
                ("_prev1", np.int32), ("born_inline", np.float64))


def _one(v: int, dtype: type) -> np.ndarray:
    return np.array([v], dtype)


class StableIndex:
    def __init__(self, settings: ScanSettings | None = None) -> None:
        # max_kernel_pages is read from the scan's settings (settings.py).
        self.settings: ScanSettings = settings if settings is not None else ScanSettings()
        self.segment: StableSegment = StableSegment()
        self.ix: _native.SlotIndex = _native.SlotIndex()     # keys: slot_hash
        # Every per-slot array is zero when unused (np.zeros: calloc, pages
        # untouched until a slot is used).
        cap = 1024
        self.sharers: np.ndarray = np.zeros(cap, np.int32)
        self.pending: np.ndarray = np.zeros(cap, np.int32)
        self.slot_hash: np.ndarray = np.zeros(cap, np.uint64)
        self._prev1: np.ndarray = np.zeros(cap, np.int32)        # chain_prev + 1 (0: none)
        # time.monotonic() of a merge_now slot; 0.0 (boot) for the scan's,
        # older than any inline_keep window.
        self.born_inline: np.ndarray = np.zeros(cap, np.float64)
        self.write_error: str = ""    # why the last new stable page could not be written
        self.write_failures: int = 0  # new stable pages that could not be written, ever

    @property
    def fd(self) -> int:
        return self.segment.fd

    @property
    def pages_in_use(self) -> int:
        return self.segment.pages_in_use

    def nbytes(self) -> int:
        """Bytes the index and per-slot arrays hold (allocated; of the arrays
        only the pages of used slots are resident)."""
        arrays: list[np.ndarray] = [getattr(self, name) for name, _ in _SLOT_FIELDS]
        return self.ix.nbytes + sum(a.nbytes for a in arrays)

    @property
    def chain_prev(self) -> np.ndarray:
        """Per slot, the next older slot of its chain, or -1 (a copy)."""
        out: np.ndarray = self._prev1.astype(np.int64) - 1
        return out

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The newest slot for each checksum, or -1."""
        out = np.empty(len(hashes), np.int64)
        self.ix.get(np.ascontiguousarray(hashes, np.uint64), out, self.slot_hash)
        return out

    def chain(self, head: int) -> list[int]:
        out = []
        while head >= 0:
            out.append(head)
            head = int(self._prev1[head]) - 1
        return out

    def _grow_arrays(self, n: int) -> None:
        if n <= len(self.sharers):
            return
        if n >= 1 << 31:        # 8 TiB of stable pages: past the int32 chain links
            raise OSError(errno.EFBIG, f"{n} stable slots: more than the index can link")
        cap = max(n, 2 * len(self.sharers))
        for name, dtype in _SLOT_FIELDS:
            old = getattr(self, name)
            new = np.zeros(cap, dtype)      # calloc: the tail stays untouched
            new[:len(old)] = old
            setattr(self, name, new)

    def room(self, n: int) -> int:
        """How many of n new slots max_kernel_pages still allows."""
        cap = self.settings.max_kernel_pages    # 0: no cap
        if not cap:
            return n
        return max(0, min(n, cap - self.segment.pages_in_use))

    def add(self, content: np.ndarray, hashes: np.ndarray, hint: int | None = None) -> int | None:
        """Copy len(hashes) pages into a run of new slots and index them;
        returns the first slot, or None past max_kernel_pages (the caller
        trims runs with room()) or when the segment cannot grow."""
        n = len(hashes)
        if self.room(n) < n:
            return None
        try:
            s = self.segment.alloc(n, hint)
        except OSError as e:
            self._cannot_write(e)
            return None
        if s is None:
            return None
        try:
            self._grow_arrays(s + n)
            self.segment.write(s, content.data)   # unshared yet: invariant 5
        except OSError as e:
            self.segment.free(s, n)
            self._cannot_write(e)
            return None
        self.write_error = ""
        self.index_new(np.arange(s, s + n, dtype=np.int64), hashes)
        return s

    def index_new(self, slots: np.ndarray, hashes: np.ndarray) -> None:
        """Index written slots under these (distinct) checksums, the
        coordinator's own of the bytes it wrote: each becomes the newest of
        its chain."""
        hashes = np.ascontiguousarray(hashes, np.uint64)
        slots = np.ascontiguousarray(slots, np.int64)
        self.slot_hash[slots] = hashes
        self._prev1[slots] = self.lookup(hashes) + 1
        self.ix.put(hashes, slots, self.slot_hash)

    def copy_new(self, fd: int, pages: np.ndarray, buf: np.ndarray,
                 hint: int | None = None) -> tuple[int, np.ndarray, int] | None:
        """Copy pages (int64 page numbers of fd) into a run of new slots,
        checksummed on the way (``_native.copy_pages`` through ``buf``:
        read, hashed and written while in cache); not indexed yet (the caller
        indexes what it keeps, ``index_new``, and frees the rest).  Returns
        (first slot, checksums, pages written), or None when max_kernel_pages
        or the segment leaves no room for all of them (nothing done).  A
        write that fails (a full tmpfs) frees the slots not written and is
        recorded as ``add`` records it; a read that fails frees them all and
        raises."""
        n = len(pages)
        if not n or self.room(n) < n:
            return None
        try:
            s = self.segment.alloc(n, hint)
        except OSError:
            return None
        if s is None:
            return None
        try:
            self._grow_arrays(s + n)
        except OSError:                  # past the chain links: add() records it
            self.segment.free(s, n)
            return None
        hashes = np.empty(n, np.uint64)
        try:
            written, err = _native.copy_pages(fd, pages, buf, hashes, self.segment.fd, s)
        except BaseException:
            self.segment.free(s, n)
            raise
        if written < n:
            self.segment.free(s + written, n - written)
            self._cannot_write(OSError(err, os.strerror(err)))
        else:
            self.write_error = ""
        return s, hashes, written

    def _cannot_write(self, e: OSError) -> None:
        """The shared-memory filesystem is full (ENOSPC) or the object cannot
        grow: no new stable page now.  The pages stay unmerged and the scan
        goes on; merging must never stop the coordinator."""
        self.write_failures += 1
        if not self.write_error:
            log.warning("cannot write new stable pages (%s); merges that need one are "
                        "skipped until there is room", e)
        self.write_error = str(e)

    def read(self, slot: int) -> bytes:
        return os.pread(self.segment.fd, PAGE_SIZE, slot * PAGE_SIZE)

    def free_unused(self, slots: np.ndarray | list[int]) -> None:
        """Free each of these slots that nobody shares or awaits."""
        todo = np.asarray(slots, np.int64)
        if not len(todo):
            return
        todo = _unique(todo)
        todo = todo[(todo >= 0) & (todo < len(self.sharers))]
        todo = todo[(self.sharers[todo] <= 0) & (self.pending[todo] <= 0)]
        if not len(todo):
            return
        # In runs of consecutive slots (a worker's exit frees its slots in long
        # runs): one allocator check, one punch and one allocator update per run.
        runs: list[tuple[int, int]] = []
        for a, e in zip(*(x.tolist() for x in cut_runs(todo))):
            s0, n = int(todo[a]), e - a
            if self.segment.is_allocated(s0, n):
                runs.append((s0, n))
            else:                       # some freed already: the allocated stretches
                live = np.array([s for s in range(s0, s0 + n) if self.segment.is_allocated(s)],
                                np.int64)
                runs += [(int(live[x]), y - x) for x, y in zip(*(r.tolist() for r in cut_runs(live)))]
        if not runs:
            return
        freed = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in runs])
        self._unindex_many(freed)
        for s, n in runs:
            self.segment.free(s, n)
        self.sharers[freed] = 0
        self.born_inline[freed] = 0.0

    def _unindex_many(self, slots: np.ndarray) -> None:
        """_unindex each of these (distinct) slots: the common case, a slot
        alone under its checksum, in one call; slots in chains one by one."""
        hashes = self.slot_hash[slots]
        alone = (self.lookup(hashes) == slots) & (self._prev1[slots] == 0)
        if alone.any():
            self.ix.delete(np.ascontiguousarray(hashes[alone]), self.slot_hash)
        for s in slots[~alone].tolist():
            self._unindex(s)

    def retire(self, slots: np.ndarray) -> None:
        """Take slots out of the index while they stay mapped: a slot being
        given back to its last sharer must not take new sharers meanwhile,
        or the give-back and the new merge undo each other every scan.  The
        slot itself is freed later by free_unused, as usual."""
        slots = _unique(np.asarray(slots, np.int64))
        slots = slots[slots >= 0]
        self._unindex_many(slots)

    def _unindex(self, s: int) -> None:
        h = self.slot_hash[s]
        head = int(self.lookup(_one(h, np.uint64))[0])
        prev = int(self._prev1[s]) - 1
        if head == s:
            if prev >= 0:
                self.ix.put(_one(h, np.uint64), _one(prev, np.int64), self.slot_hash)
            else:
                self.ix.delete(_one(h, np.uint64), self.slot_hash)
        else:
            node = head
            while node >= 0 and self._prev1[node] != s + 1:
                node = int(self._prev1[node]) - 1
            if node >= 0:
                self._prev1[node] = prev + 1
        self._prev1[s] = 0

    def chains(self) -> tuple[int, int]:
        """(chains, dups) as Linux counts them (``stable_node_chains``,
        ``stable_node_dups``): checksums that have more than one slot, and
        every slot in those chains (the newest included: Linux's chain is
        a list of dups, none of them special).  A chain is linked newest to
        oldest through ``chain_prev``: its slots are those that point to an
        older one, plus the oldest, to which the one after it points."""
        older = np.flatnonzero(self._prev1)
        if not len(older):
            return 0, 0
        in_chain = _unique(np.concatenate((older, self._prev1[older].astype(np.int64) - 1)))
        return len(_unique(self.slot_hash[in_chain])), len(in_chain)

    def close(self) -> None:
        self.segment.close()


class UnstableIndex:
    def __init__(self) -> None:
        self.ix: _native.HashIndex = _native.HashIndex()

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(region uid, page) per checksum; uid -1 where absent."""
        out = np.empty(len(hashes), np.int64)
        self.ix.get(np.ascontiguousarray(hashes, np.uint64), out)
        return np.where(out >= 0, out >> 32, -1), out & 0xFFFFFFFF

    def insert(self, hashes: np.ndarray, uid: int, pages: np.ndarray) -> None:
        self.ix.put(np.ascontiguousarray(hashes, np.uint64),
                    (np.int64(uid) << 32) | np.asarray(pages, np.int64))

    def delete(self, hashes: np.ndarray) -> None:
        if len(hashes):
            self.ix.delete(np.ascontiguousarray(hashes, np.uint64))

    def clear(self) -> None:
        self.ix.clear()

    def __len__(self) -> int:
        return len(self.ix)

    @property
    def nbytes(self) -> int:
        return self.ix.nbytes


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
