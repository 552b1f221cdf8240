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
