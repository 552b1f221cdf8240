"""The stable index's chains, counted as Linux counts stable_node_chains and
stable_node_dups: every dup of a chain, the newest one included."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shmdedup import _native
from shmdedup.coordinator.scan.indexes import StableIndex

P = _native.PAGE_SIZE


def _add(ix: StableIndex, byte: int, checksum: int) -> int:
    s = ix.add(np.full(P, byte, np.uint8), np.array([checksum], np.uint64))
    assert s is not None
    return s


def test_chains_count_every_dup_of_each_chain() -> None:
    ix = StableIndex()
    try:
        assert ix.chains() == (0, 0)
        a = [_add(ix, 1, 11)]
        assert ix.chains() == (0, 0)                # one slot: a plain stable node
        a.append(_add(ix, 1, 11))
        assert ix.chains() == (1, 2)
        a.append(_add(ix, 1, 11))
        assert ix.chains() == (1, 3)
        b = [_add(ix, 2, 22) for _ in range(4)]
        _add(ix, 3, 33)                             # alone: in no chain
        assert ix.chains() == (2, 7)
        assert ix.chain(int(ix.lookup(np.array([11], np.uint64))[0])) == a[::-1]
        # Freeing dups: the middle one, then the newest; a chain left with one
        # dup is a plain node again (Linux collapses it too).
        ix.free_unused(np.array([a[1]]))
        assert ix.chains() == (2, 6)
        ix.free_unused(np.array([a[2]]))
        assert ix.chains() == (1, 4)
        ix.retire(np.array([b[0], b[3]]))           # given back: out of the chain
        assert ix.chains() == (1, 2)
    finally:
        ix.close()


def test_free_unused_frees_runs_at_once_and_chains_slot_by_slot(monkeypatch) -> None:
    """A worker's exit frees its slots in long runs: one punch per run, not per
    slot; slots in chains, slots freed already, slots still shared and retired
    slots in the same call are each handled as before."""
    ix = StableIndex()
    try:
        n = 300
        content = np.repeat(np.arange(n, dtype=np.uint8), P)
        first = ix.add(content, np.arange(1000, 1000 + n, dtype=np.uint64))
        assert first is not None
        run = list(range(first, first + n))
        dup = [_add(ix, 7, 1005), _add(ix, 7, 1005)]     # a chain under run[5]'s checksum
        ix.sharers[run[10]] = 1                          # still shared: kept
        ix.retire(np.array([run[20]]))                   # given back: out of the index already
        punches: list[tuple[int, int]] = []
        real = ix.segment.free
        monkeypatch.setattr(ix.segment, "free", lambda s, k=1: (punches.append((s, k)), real(s, k)))
        ix.free_unused(np.array(run[:50] + [dup[0]]))
        assert punches == [(run[0], 10), (run[11], 39), (dup[0], 1)]
        ix.free_unused(np.array(run[:60]))               # the first 50 are free already
        assert punches[3:] == [(run[50], 10)]
        kept = run[10]
        assert ix.segment.is_allocated(kept) and not ix.segment.is_allocated(run[0])
        got = ix.lookup(np.arange(1000, 1000 + n, dtype=np.uint64))
        assert got[10] == kept and (np.delete(got[:60], [5, 10]) == -1).all()
        assert (got[60:] == np.array(run[60:])).all()
        # run[5]'s checksum: its own slot is gone, the chain's newest is left.
        assert ix.lookup(np.array([1005], np.uint64))[0] == dup[1]
        assert ix.chains() == (0, 0) and ix.read(kept) == bytes([10]) * P
    finally:
        ix.close()


# -- memory: the tables' sizes follow what they hold -------------------------

def test_slot_index_matches_a_dict_model_and_shrinks() -> None:
    """SlotIndex (8-byte buckets, the checksums in the caller's slot_hash)
    against a dict, with keys sharing their high 32 bits (the bits a bucket
    keeps) and keys sharing their buckets; deleting most entries halves the
    table, clear() returns it to its initial size."""
    rng = np.random.default_rng(7)
    n = 20000
    slot_hash = rng.integers(0, 2**63, n, dtype=np.uint64)
    slot_hash[::3] = (slot_hash[::3] & np.uint64(0xFFFFFFFF)) | np.uint64(0xABCD << 32)  # same high bits
    slot_hash = np.unique(slot_hash)[:15000].copy()
    n = len(slot_hash)
    ix = _native.SlotIndex()
    small = ix.nbytes
    model: dict[int, int] = {}
    slots = rng.permutation(n).astype(np.int64)
    for part in np.array_split(slots, 7):
        ix.put(slot_hash[part], part, slot_hash)
        model.update(zip(slot_hash[part].tolist(), part.tolist()))
    assert len(ix) == len(model) == n
    assert ix.nbytes == 8 * 32768              # 15000 entries: 37-75% full, 8 bytes a bucket
    out = np.empty(n, np.int64)
    ix.get(slot_hash, out, slot_hash)
    assert (out == np.arange(n)).all()
    gone = rng.permutation(n)[:n - 500]
    assert ix.delete(slot_hash[gone], slot_hash) == len(gone)
    for s in gone.tolist():
        del model[int(slot_hash[s])]
    assert ix.delete(slot_hash[gone[:10]], slot_hash) == 0
    assert len(ix) == 500 and ix.nbytes <= 8 * 4096       # halved while under 1/8 full
    ix.get(slot_hash, out, slot_hash)
    want = np.array([model.get(int(h), -1) for h in slot_hash.tolist()])
    assert (out == want).all()
    absent = rng.integers(0, 2**63, 1000, dtype=np.uint64)
    got = np.empty(1000, np.int64)
    ix.get(absent, got, slot_hash)
    assert (got == -1).all()
    ix.clear()
    assert len(ix) == 0 and ix.nbytes == small


def test_slot_index_rejects_a_short_or_wrong_slot_hash() -> None:
    ix = _native.SlotIndex()
    keys = np.array([5, 6], np.uint64)
    ix.put(keys, np.array([0, 1], np.int64), keys)
    out = np.empty(2, np.int64)
    with pytest.raises(ValueError, match="at least 2"):
        ix.get(keys, out, keys[:1])                  # would read past its end
    with pytest.raises(ValueError, match="at least 2"):
        ix.delete(keys, keys[:1])
    with pytest.raises(ValueError, match="not the key"):
        ix.put(np.array([7], np.uint64), np.array([0], np.int64), keys)
    with pytest.raises(ValueError, match="out of range"):
        ix.put(keys[:1], np.array([2], np.int64), keys)
    with pytest.raises(ValueError):
        ix.put(keys[:1], np.array([-1], np.int64), keys)
    ix.get(keys, out, keys)
    assert out.tolist() == [0, 1]                    # nothing lost


def test_hash_index_gives_memory_back_on_clear_and_when_emptied() -> None:
    """Deleting most entries halves the table; clear() sizes it for what it
    held: back to its initial size once its entries left (merged), kept when
    still well used (the next full scan finds the same unique pages)."""
    ix = _native.HashIndex()
    small = ix.nbytes
    keys = np.arange(1, 100001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ix.put(keys, np.arange(100000, dtype=np.int64))
    assert ix.nbytes == 16 * 262144
    ix.delete(keys[:99000])
    assert len(ix) == 1000 and ix.nbytes <= 16 * 8192
    out = np.empty(1000, np.int64)
    ix.get(keys[99000:], out)
    assert (out == np.arange(99000, 100000)).all()
    ix.clear()
    assert len(ix) == 0 and ix.nbytes == small
    ix.put(keys, np.arange(100000, dtype=np.int64))
    ix.clear()                                       # still well used: kept
    assert len(ix) == 0 and ix.nbytes == 16 * 262144
    ix.get(keys[:1000], out)
    assert (out == -1).all()
    ix.clear()                                       # held nothing: back to small
    assert ix.nbytes == small


def test_stable_index_shrinks_as_slots_are_freed() -> None:
    ix = StableIndex()
    try:
        n = 5000
        content = np.zeros((n, P), np.uint8)
        content[:, :8] = np.arange(n, dtype=np.uint64).view(np.uint8).reshape(n, 8)
        first = ix.add(content, np.arange(10, 10 + n, dtype=np.uint64))
        assert first is not None
        big = ix.ix.nbytes
        assert big == 8 * 8192                       # 8 bytes a bucket
        assert ix.born_inline[first:first + n].max() == 0.0   # not merge_now's
        ix.free_unused(np.arange(first, first + n - 10))
        assert len(ix.ix) == 10 and ix.ix.nbytes == 8 * 2048     # its initial size
        got = ix.lookup(np.arange(10, 10 + n, dtype=np.uint64))
        assert (got[:n - 10] == -1).all() and (got[n - 10:] == np.arange(first + n - 10, first + n)).all()
    finally:
        ix.close()


def _resident(a: np.ndarray) -> int:
    """Resident bytes of the mapping that holds array a (/proc/self/smaps)."""
    addr = a.ctypes.data
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the array")


def test_each_full_scan_empties_the_unstable_index_and_gives_memory_back() -> None:
    """Linux rebuilds its unstable tree every full scan: ours is emptied at
    each full scan's end, its entries leave as their pages merge and it
    shrinks with them, and the read buffer's pages are given back then (a
    scan that finds everything merged keeps neither)."""
    from shmdedup.coordinator.scan.scanner import Scanner
    from shmdedup.coordinator.scan.tracking import RegionState

    class W:
        uid = pid = 0

    sc = Scanner(lambda w, runs: None, lambda w, runs: None)
    sc.settings.smart_scan = False
    n = 6000                                          # pages 3000.. repeat pages 0..
    b = os.memfd_create("unstable", os.MFD_CLOEXEC)
    m = os.memfd_create("unstable", os.MFD_CLOEXEC)
    try:
        os.ftruncate(b, n * P)
        os.ftruncate(m, 2 * P)
        half = np.random.default_rng(1).integers(0, 256, n // 2 * P, dtype=np.uint8).tobytes()
        os.pwrite(b, half + half, 0)
        reg = RegionState.open(W(), 1, n, os.dup(b), os.dup(m))
        sc.add_region(reg)
        sc.advise(reg, 0, n, True)
        small = sc.unstable.nbytes
        biggest = 0
        while sc.full_scans < 1:                    # first visits: the first half in, then out as it merges
            sc.batch(1000)
            biggest = max(biggest, sc.unstable.nbytes)
            if sc.full_scans < 1:
                assert _resident(sc._scratch) > 0
        assert biggest >= 16 * 4096                 # 3000 entries
        assert len(sc.unstable) == 0 and sc.unstable.nbytes == small
        assert _resident(sc._scratch) == 0
    finally:
        sc.close()
        os.close(b)
        os.close(m)


def _source(pages: np.ndarray) -> int:
    fd = os.memfd_create("src")
    os.pwrite(fd, pages.tobytes(), 0)
    return fd


def test_copy_new_writes_and_checksums_pages_into_slots_not_indexed_yet() -> None:
    ix = StableIndex()
    data = np.random.default_rng(5).integers(0, 256, (300, P), dtype=np.uint8)
    fd = _source(data)
    try:
        pages = np.array([3, 4, 5, 40, 299] + list(range(100, 200)), np.int64)
        got = ix.copy_new(fd, pages, np.empty(64 * P, np.uint8))
        assert got is not None
        s, hashes, written = got
        assert written == len(pages) and ix.pages_in_use == len(pages)
        for i, p in enumerate(pages.tolist()):
            assert ix.segment.read(s + i) == data[p].tobytes()
        assert (hashes == np.frombuffer(_native.hash_pages(data[pages]), np.uint64)).all()
        assert (ix.lookup(hashes) == -1).all()           # the caller indexes what it keeps
        ix.index_new(np.arange(s, s + len(pages)), hashes)
        assert (ix.lookup(hashes) == np.arange(s, s + len(pages))).all()
    finally:
        os.close(fd)
        ix.close()


def test_copy_new_past_max_kernel_pages_does_nothing() -> None:
    from shmdedup.coordinator.scan.settings import ScanSettings
    ix = StableIndex(ScanSettings(max_kernel_pages=10))
    fd = _source(np.ones((20, P), np.uint8))
    try:
        assert ix.copy_new(fd, np.arange(11, dtype=np.int64), np.empty(64 * P, np.uint8)) is None
        assert ix.pages_in_use == 0
        assert ix.copy_new(fd, np.arange(10, dtype=np.int64), np.empty(64 * P, np.uint8)) is not None
    finally:
        os.close(fd)
        ix.close()


def test_copy_new_keeps_what_was_written_before_a_full_tmpfs(monkeypatch) -> None:
    """A write that fails (ENOSPC) leaves the pages before it written and
    theirs; the slots after are freed and the failure recorded, as add()
    records it."""
    import errno
    ix = StableIndex()
    fd = _source(np.ones((200, P), np.uint8))
    real = _native.copy_pages

    def full_after_64(src, idx, buf, hashes, dst, first):   # type: ignore[no-untyped-def]
        real(src, idx[:64], buf, hashes, dst, first)
        return 64, errno.ENOSPC

    monkeypatch.setattr(_native, "copy_pages", full_after_64)
    try:
        got = ix.copy_new(fd, np.arange(200, dtype=np.int64), np.empty(64 * P, np.uint8))
        assert got is not None
        s, _, written = got
        assert written == 64 and ix.pages_in_use == 64 and ix.segment.is_allocated(s, 64)
        assert ix.write_failures == 1 and "No space" in ix.write_error
    finally:
        os.close(fd)
        ix.close()
