"""The mapping budget's arithmetic (shmdedup/budget.py) against brute force.

A region here is a stand-in with the arrays the budget reads: the worker's
state bytes and the scanner's slots.  The brute-force count walks the pages
one by one: a new mapping starts wherever a page does not continue the
stretch of the page before (private pages; pages on consecutive stable
slots; zero pages; pages merged without a known slot).  That the estimate
matches the real /proc/<pid>/maps of a worker is checked in
tests/integration/test_map_limit.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from shmdedup import _native
from shmdedup.coordinator.scan.budget import CHUNK, FRESH_KEY, PROCESS_MAPPINGS, ZERO_KEY, MappingBudget
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.controls import default_max_mappings

PRIVATE, MERGED, ZERO = _native.PRIVATE, _native.MERGED, _native.ZERO


@dataclass(eq=False)
class FakeRegion:
    worker: object
    npages: int
    states: np.ndarray = field(init=False)
    slot: np.ndarray = field(init=False)
    closed: bool = False

    def __post_init__(self) -> None:
        self.states = np.full(self.npages, PRIVATE, np.uint8)
        self.slot = np.full(self.npages, -1, np.int32)

    def merge(self, page: int, slot: int) -> None:
        self.states[page] = MERGED if slot >= 0 else ZERO
        self.slot[page] = slot

    def brute_mappings(self) -> int:
        def stretch(p: int) -> tuple:
            if self.states[p] == PRIVATE:
                return ("private",)
            if self.slot[p] >= 0:
                return ("stable", int(self.slot[p]) - p)
            return ("zero",) if self.states[p] == ZERO else ("foreign",)
        runs = 1 + sum(stretch(p) != stretch(p - 1) for p in range(1, self.npages))
        return runs + 1            # and the state bytes


def scatter(reg: FakeRegion, rng: random.Random, n: int) -> None:
    """n random merges: single pages, runs on consecutive slots, zero pages,
    pages merged by someone else (no slot known)."""
    for _ in range(n):
        p = rng.randrange(reg.npages)
        kind = rng.random()
        if kind < 0.5:
            reg.merge(p, rng.randrange(1 << 20))
        elif kind < 0.8:
            length = rng.randrange(1, 40)
            s = rng.randrange(1 << 20)
            for i in range(min(length, reg.npages - p)):
                reg.merge(p + i, s + i)
        elif kind < 0.9:
            reg.merge(p, -1)
        else:
            reg.states[p] = MERGED     # foreign: merged, slot unknown
            reg.slot[p] = -1


@pytest.mark.parametrize("seed", range(5))
def test_estimate_matches_a_recount_after_touches(seed: int) -> None:
    rng = random.Random(seed)
    worker = object()
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    regs = [FakeRegion(worker, rng.choice([1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]))
            for _ in range(3)]
    for reg in regs:
        b.add(reg)
    assert b.estimate(worker) == PROCESS_MAPPINGS + sum(r.brute_mappings() for r in regs)
    for _ in range(4):
        for reg in regs:
            before = reg.states.copy(), reg.slot.copy()
            scatter(reg, rng, rng.randrange(1, 60))
            if rng.random() < 0.3:     # some breaks too
                reg.states[rng.randrange(reg.npages)] = PRIVATE
            changed = np.flatnonzero((reg.states != before[0]) | (reg.slot != before[1]))
            if len(changed):
                b.touch(reg, int(changed.min()), int(changed.max() - changed.min() + 1))
        assert b.estimate(worker) == PROCESS_MAPPINGS + sum(r.brute_mappings() for r in regs)
    b.drop(regs[0])
    assert b.estimate(worker) == PROCESS_MAPPINGS + sum(r.brute_mappings() for r in regs[1:])


@pytest.mark.parametrize("seed", range(4))
def test_recount_of_dirty_runs_equals_chunk_by_chunk(seed: int) -> None:
    """Runs of dirty chunks are recounted from one read: each chunk's count
    equals the one it gets when recounted on its own."""
    rng = random.Random(seed)
    worker = object()
    reg = FakeRegion(worker, rng.choice([CHUNK + 1, 3 * CHUNK + 17, 5 * CHUNK]))
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    b.add(reg)
    scatter(reg, rng, 300)
    b.touch(reg, 0, reg.npages)
    b.estimate(worker)
    together = b._maps[reg].bounds.copy()
    m = b._maps[reg]
    for c in range(-(-reg.npages // CHUNK)):
        m.dirty.add(c)
        b._recount(reg, m)
    assert m.bounds == together
    assert b.estimate(worker) == PROCESS_MAPPINGS + reg.brute_mappings()


def test_untouched_changes_are_seen_only_after_touch() -> None:
    worker = object()
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    reg = FakeRegion(worker, 4 * CHUNK)
    b.add(reg)
    base = b.estimate(worker)
    reg.merge(CHUNK + 5, 100)                 # one page in the middle: +2
    assert b.estimate(worker) == base          # not told
    b.touch(reg, CHUNK + 5, 1)
    assert b.estimate(worker) == base + 2
    reg.merge(CHUNK, 7)                        # first page of a chunk: the boundary
    b.touch(reg, CHUNK, 1)                     # on its left is in the chunk before
    assert b.estimate(worker) == PROCESS_MAPPINGS + reg.brute_mappings() == base + 4


@pytest.mark.parametrize("seed", range(8))
def test_costs_prefix_sums_are_exact(seed: int) -> None:
    rng = random.Random(100 + seed)
    worker = object()
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    reg = FakeRegion(worker, rng.choice([7, 64, 300]))
    b.add(reg)
    scatter(reg, rng, reg.npages // 8)
    private = np.flatnonzero(reg.states == PRIVATE)
    pages = np.sort(rng.sample(list(private), k=max(1, len(private) // 2))).astype(np.int64)
    # New keys: consecutive slots in stretches, zero pages, fresh runs.
    slots = np.empty(len(pages), np.int64)
    s = 5000
    for i, p in enumerate(pages):
        r = rng.random()
        s = s + 1 if r < 0.6 else rng.randrange(6000, 9000)
        slots[i] = -1 if r > 0.9 else s
    new = np.where(slots >= 0, (slots - pages) * 4, ZERO_KEY)
    cum = np.cumsum(b.costs(reg, pages, new))
    before = reg.brute_mappings()
    for i, (p, sl) in enumerate(zip(pages.tolist(), slots.tolist())):
        reg.merge(p, sl)
        assert reg.brute_mappings() - before == cum[i], (i, p, sl)


def test_admit_stops_at_max_mappings_and_counts_the_rest() -> None:
    worker = object()
    reg = FakeRegion(worker, 1000)
    b = MappingBudget(ScanSettings(max_mappings=PROCESS_MAPPINGS + 2 + 20))      # room for 10 scattered merges
    b.add(reg)
    pages = np.arange(0, 1000, 2)[1:]                 # 2, 4, ...: each +2
    ok, slots, over = b.admit(reg, pages, pages + 100)
    assert len(ok) == 10 and list(ok) == list(pages[:10]) and len(over) == len(pages) - 10
    assert b.pages_skipped == len(pages) - 10
    assert b.full(worker)
    # A run on consecutive slots costs 2 in all, however long.
    b2 = MappingBudget(ScanSettings(max_mappings=PROCESS_MAPPINGS + 2 + 2))
    b2.add(reg2 := FakeRegion(worker, 1000))
    ok, _, over = b2.admit(reg2, np.arange(100, 600), np.arange(7, 507))
    assert len(ok) == 500 and not len(over)
    # Unsorted pages are taken in page order.
    b3 = MappingBudget(ScanSettings(max_mappings=PROCESS_MAPPINGS + 2 + 4))
    b3.add(reg3 := FakeRegion(worker, 100))
    ok, slots, over = b3.admit(reg3, np.array([50, 10, 30]), np.array([1, 2, 3]))
    assert list(ok) == [10, 30] and list(slots) == [2, 3] and list(over) == [50]


def test_admission_far_below_the_limit_recounts_nothing_and_near_it_is_exact() -> None:
    """Touched chunks wait for their recount while an upper bound (CHUNK
    boundaries each) leaves room; once the bound could pass the limit the
    exact count decides, so admission never admits past max_mappings."""
    worker = object()
    reg = FakeRegion(worker, 8 * CHUNK)
    b = MappingBudget(ScanSettings(max_mappings=10**6))
    b.add(reg)
    assert not b.full(worker)               # the first count of a new region is exact
    scattered = np.arange(1, 4 * CHUNK, 2)  # every other page: 2 mappings each
    for p in scattered.tolist():
        reg.merge(p, 1000 + 7 * p)
    b.touch(reg, 0, 4 * CHUNK)
    assert not b.full(worker)               # far below: judged without a recount
    assert b._maps[reg].dirty                # still to recount
    exact = b.estimate(worker)
    assert exact - PROCESS_MAPPINGS == reg.brute_mappings()
    # Now a limit the exact count is close to: the bound would refuse, the
    # recount admits exactly what fits.
    b2 = MappingBudget(ScanSettings(max_mappings=exact + 6))
    b2.add(reg2 := FakeRegion(worker, 8 * CHUNK))
    b2.estimate(worker)
    for p in scattered.tolist():
        reg2.merge(p, 1000 + 7 * p)
    b2.touch(reg2, 0, 4 * CHUNK)
    assert not b2.full(worker)
    pages = np.arange(5 * CHUNK, 5 * CHUNK + 20, 2)   # +2 each: 3 fit in 6
    ok, _, over = b2.admit(reg2, pages, pages + 50_000 + 3 * np.arange(len(pages)))
    assert len(ok) == 3 and len(over) == len(pages) - 3
    assert b2.full(worker)                  # the 6 planned fill it


def test_admit_pairs_both_sides_or_neither() -> None:
    wa, wb = object(), object()
    a, b_ = FakeRegion(wa, 400), FakeRegion(wb, 400)
    budget = MappingBudget(ScanSettings(max_mappings=PROCESS_MAPPINGS + 2 + 10))  # 5 scattered runs each
    budget.add(a)
    budget.add(b_)
    b_.merge(0, 900)                                   # wb has 2 mappings fewer to spare
    budget.touch(b_, 0, 1)
    op = np.arange(10, 40, 3)                          # 10 single-page runs
    rp = np.arange(100, 130, 3)
    starts, ends = np.arange(10), np.arange(1, 11)
    keep = budget.admit_pairs(a, op, b_, rp, starts, ends)
    assert keep.tolist() == [True] * 4 + [False] * 6   # wb: 1 + 4 runs
    assert budget.pages_skipped == 2 * 6
    # Planned costs count for the next admission in the same batch.
    assert budget.estimate(wb) == PROCESS_MAPPINGS + 2 + 1 + 8 and budget.full(wb)
    budget.end_batch({wa: 4, wb: 4})                   # sent as 4 runs each: 8 in flight
    assert budget.estimate(wa) == PROCESS_MAPPINGS + 2 + 8
    budget.settled(wa, 4)
    assert budget.estimate(wa) == PROCESS_MAPPINGS + 2


def test_admit_pairs_in_one_region_counts_both_sides() -> None:
    w = object()
    reg = FakeRegion(w, 100)
    budget = MappingBudget(ScanSettings(max_mappings=PROCESS_MAPPINGS + 2 + 6))
    budget.add(reg)
    # Pages 10-14 pair with 30-34: one run each, 2 + 2 mappings; 50 <-> 70 would need 4 more.
    op, rp = np.array([10, 11, 12, 13, 14, 50]), np.array([30, 31, 32, 33, 34, 70])
    keep = budget.admit_pairs(reg, op, reg, rp, np.array([0, 5]), np.array([5, 6]))
    assert keep.tolist() == [True, False]
    # Adjacent fresh runs are still two runs.
    budget2 = MappingBudget(ScanSettings(max_mappings=PROCESS_MAPPINGS + 2 + 2))
    budget2.add(reg2 := FakeRegion(w, 100))
    keep = budget2.admit_pairs(reg2, np.array([10, 11]), reg2, np.array([12, 13]),
                               np.array([0]), np.array([2]))
    assert keep.tolist() == [False]                    # [10,11] and [12,13]: 3 more mappings
    assert budget2.costs(reg2, np.array([10, 11, 12, 13]),
                         np.array([FRESH_KEY] * 2 + [FRESH_KEY + 8] * 2)).sum() == 3


def test_foreign_merged_pages_count_as_runs() -> None:
    """Pages merged without a slot this coordinator knows of (a coordinator
    before a restart merged them): consecutive ones are taken for one run,
    counted from the moment the region is registered."""
    w = object()
    reg = FakeRegion(w, 3 * CHUNK)
    reg.states[10:20] = MERGED
    reg.states[30] = MERGED
    reg.states[2 * CHUNK + 7] = ZERO
    b = MappingBudget(ScanSettings(max_mappings=10**9))
    b.add(reg)
    assert b.estimate(w) == PROCESS_MAPPINGS + 1 + 7 == PROCESS_MAPPINGS + reg.brute_mappings()


def test_default_max_mappings_leaves_a_quarter_of_the_limit() -> None:
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    assert default_max_mappings() == limit - limit // 4
