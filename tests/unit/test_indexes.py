"""The stable index's chains, counted as Linux counts stable_node_chains and
stable_node_dups: every dup of a chain, the newest one included."""

from __future__ import annotations

import numpy as np

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
