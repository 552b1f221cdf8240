"""The merge_now fast paths give what the general paths give.

merge_now (``scan/inline.py``) writes the page table as slices
(``PageTable.assign_range``, and ``assign`` when its pages are a range),
admits merges with the exact cost of the whole batch when the mapping
budget cannot bind (``MappingBudget.room``), answers stretch keys from a
snapshot while it works one range (``MappingBudget.prime``), and coalesces
a single run without cutting (``tracking._coalesce``).  Each is checked
here against the general path on random inputs.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from shmdedup import _native
from shmdedup.coordinator.scan.budget import FRESH_KEY, ZERO_KEY, MappingBudget
from shmdedup.coordinator.scan.pagetable import BLOCK_PAGES, CHUNK_PAGES, FIELDS, PageTable
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.coordinator.scan.tracking import Run, _coalesce
from tests.unit.test_budget import FakeRegion, scatter

NPAGES = 3 * CHUNK_PAGES + 100


def _table_state(t: PageTable) -> dict[str, np.ndarray]:
    return {name: t.get_range(name, 0, t.npages) for name in FIELDS}


@pytest.mark.parametrize("seed", range(6))
def test_assign_range_equals_assign_page_by_page(seed: int) -> None:
    rng = random.Random(seed)
    fast, slow = PageTable(NPAGES), PageTable(NPAGES)
    for _ in range(60):
        a = rng.randrange(NPAGES)
        b = min(NPAGES, a + rng.choice([1, 2, BLOCK_PAGES, 1000, CHUNK_PAGES, 2 * CHUNK_PAGES + 7]))
        kind = rng.random()
        if kind < 0.3:
            values = {"status": rng.randrange(7), "age": 0, "skip": 0}
        elif kind < 0.5:
            values = {"status": 0, "age": 0}          # defaults only: no block made for them
        elif kind < 0.8:
            values = {"slot": np.arange(b - a, dtype=np.int32) + rng.randrange(1000), "status": 3}
        else:
            values = {"checksum": np.array([rng.getrandbits(64) for _ in range(b - a)], np.uint64)}
        fast.assign_range(a, b, values)
        pages = np.arange(a, b, dtype=np.int64)
        slow._assign_pages(pages, values)
        assert all((x == y).all() for x, y in zip(_table_state(fast).values(), _table_state(slow).values()))
        # Blocks are made for the same pages (defaults never make one).
        assert fast.nbytes == slow.nbytes
    fast.assign(np.arange(10, 20, dtype=np.int64), {"status": 6})   # a range through assign
    assert (fast.get_range("status", 10, 20) == 6).all()


def test_defaults_on_a_fresh_range_keep_no_block() -> None:
    t = PageTable(NPAGES)
    t.assign_range(0, CHUNK_PAGES, {"status": 0, "age": 0, "skip": 0})
    assert t.nbytes == 0
    t.assign_range(5, 6, {"status": 1})
    t.assign_range(0, CHUNK_PAGES, {"status": 0})
    assert t.nbytes == BLOCK_PAGES * sum(np.dtype(d).itemsize for d, _ in FIELDS.values())


@pytest.mark.parametrize("seed", range(8))
def test_room_when_the_budget_cannot_bind_costs_what_costs_sums(seed: int) -> None:
    rng = random.Random(seed)
    reg = FakeRegion(object(), rng.choice([5, CHUNK_PAGES + 3, 3 * CHUNK_PAGES]))
    scatter(reg, rng, 40)
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    b.add(reg)
    for _ in range(20):
        k = rng.randrange(1, reg.npages + 1)
        if rng.random() < 0.5:
            a = rng.randrange(reg.npages - k + 1)
            pages = np.arange(a, a + k, dtype=np.int64)
        else:
            pages = np.array(sorted(rng.sample(range(reg.npages), k)), np.int64)
        choice = rng.random()
        if choice < 0.4:
            new = FRESH_KEY + 8 * np.zeros(k, np.int64)
        elif choice < 0.6:
            new = np.full(k, ZERO_KEY, np.int64)
        else:
            new = (np.arange(k, dtype=np.int64) + rng.randrange(1 << 20) - pages) * 4
        n, cost = b.room(reg, pages, new)
        assert n == k and cost == int(b.costs(reg, pages, new).sum())


@pytest.mark.parametrize("seed", range(4))
def test_primed_keys_equal_keys_read_afresh(seed: int) -> None:
    rng = random.Random(seed)
    reg = FakeRegion(object(), 3 * CHUNK_PAGES)
    scatter(reg, rng, 60)
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    b.add(reg)
    a0, a1 = CHUNK_PAGES - 1, 2 * CHUNK_PAGES + 1
    b.prime(reg, a0, reg.states[a0:a1].copy(), reg.slot[a0:a1].copy())
    try:
        for _ in range(30):
            lo = rng.randrange(a0, a1)
            pages = np.arange(lo, rng.randrange(lo, a1) + 1, dtype=np.int64)
            if rng.random() < 0.5:
                pages = np.array(sorted(rng.sample(range(a0, a1), 7)), np.int64)
            primed = b.keys(reg, pages).copy()
            b.unprime()
            assert (primed == b.keys(reg, pages)).all()
            b.prime(reg, a0, reg.states[a0:a1].copy(), reg.slot[a0:a1].copy())
        # Pages outside the snapshot are read afresh.
        out = np.array([0, 3 * CHUNK_PAGES - 1], np.int64)
        got = b.keys(reg, out).copy()
        b.unprime()
        assert (got == b.keys(reg, out)).all()
        # No slot at all (a fresh range): the same keys as slots of -1.
        fresh = FakeRegion(object(), CHUNK_PAGES)
        fresh.states[::3] = _native.ZERO
        b.prime(fresh, 0, fresh.states.copy(), None)
        got = b.keys(fresh, np.arange(CHUNK_PAGES, dtype=np.int64)).copy()
    finally:
        b.unprime()
    assert (got == b.keys(fresh, np.arange(CHUNK_PAGES, dtype=np.int64))).all()


def _cut(reg: object, pages: np.ndarray, slots: np.ndarray) -> list[Run]:
    # The general path: two items force the concatenation and the cut.
    half = len(pages) // 2
    return _coalesce([(reg, pages[:half], slots[:half]), (reg, pages[half:], slots[half:])])  # type: ignore[list-item]


@pytest.mark.parametrize("pages, slots", [
    (np.arange(10, 20), np.arange(100, 110)),
    (np.arange(10, 20), np.full(10, -1)),
    (np.arange(10, 20), np.r_[np.arange(100, 105), np.arange(200, 205)]),
    (np.r_[np.arange(10, 15), np.arange(16, 21)], np.arange(100, 110)),
    (np.arange(10, 20), np.r_[np.full(5, -1), np.arange(100, 105)]),
    (np.array([20, 19, 18]), np.array([5, 4, 3])),
    (np.array([7]), np.array([3])),
])
def test_one_item_coalesces_as_the_general_cut(pages: np.ndarray, slots: np.ndarray) -> None:
    reg = object()
    pages, slots = pages.astype(np.int64), slots.astype(np.int64)
    assert _coalesce([(reg, pages, slots)]) == _cut(reg, pages, slots)  # type: ignore[list-item]
