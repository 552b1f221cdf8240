"""shmdedup/coordinator/scan/pagetable.py against dense numpy arrays: the sparse per-page
fields and advice runs must read exactly like the arrays they replace, and
cost memory only for the blocks given a value."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shmdedup.coordinator.scan.pagetable import (
    BLOCK_PAGES,
    BYTES_PER_PAGE,
    CHUNK_PAGES,
    FIELDS,
    MAX_ADVICE_RUNS,
    AdviceRuns,
    Field,
    PageTable,
)


def dense(npages: int) -> dict[str, np.ndarray]:
    return {n: np.full(npages, d, t) for n, (t, d) in FIELDS.items()}


def random_pages(rng: random.Random, npages: int) -> np.ndarray:
    kind = rng.random()
    if kind < 0.3:                                   # a run (slices of the scanner)
        a = rng.randrange(npages)
        return np.arange(a, min(npages, a + rng.randrange(1, 3 * CHUNK_PAGES)), dtype=np.int64)
    if kind < 0.6:                                   # inside one chunk, sorted
        c = rng.randrange(-(-npages // CHUNK_PAGES))
        lo, hi = c * CHUNK_PAGES, min(npages, (c + 1) * CHUNK_PAGES)
        return np.sort(np.array(rng.sample(range(lo, hi), min(hi - lo, rng.randrange(1, 50))),
                                np.int64))
    n = rng.randrange(1, 40)                         # anywhere, any order, repeats
    return np.array([rng.randrange(npages) for _ in range(n)], np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_fields_read_like_dense_arrays(seed: int) -> None:
    rng = random.Random(seed)
    npages = rng.choice([1, BLOCK_PAGES + 3, CHUNK_PAGES, 5 * CHUNK_PAGES + 77])
    table = PageTable(npages)
    fields = {n: Field(table, n) for n in FIELDS}
    ref = dense(npages)
    for _ in range(300):
        name = rng.choice(list(FIELDS))
        pages = random_pages(rng, npages)
        op = rng.random()
        if op < 0.45:
            value: object = rng.randrange(0, 200)
            if rng.random() < 0.3:
                value = FIELDS[name][1]                # the default: creates nothing
            fields[name][pages] = value
            ref[name][pages] = value
        elif op < 0.7:
            values = np.array([rng.randrange(0, 200) for _ in pages]).astype(FIELDS[name][0])
            # repeated pages: the last value wins in both
            fields[name][pages] = values
            ref[name][pages] = values
        elif op < 0.8:
            a = rng.randrange(npages)
            b = rng.randrange(a, npages + 1)
            fields[name][a:b] = 7
            ref[name][a:b] = 7
        elif op < 0.9:
            ch = table.chunk(rng.randrange(-(-npages // CHUNK_PAGES)))
            if ch is not None:                         # drop some blocks: they read as defaults
                keep = np.array([rng.random() < 0.5 for _ in range(ch.nblocks)]).repeat(BLOCK_PAGES)
                gone = ch.pages[~keep]
                table.retain(ch, keep)
                for n, (_, d) in FIELDS.items():
                    ref[n][gone[gone < npages]] = d
        for n in FIELDS:
            assert np.array_equal(fields[n][pages], ref[n][pages])
    for n in FIELDS:
        assert np.array_equal(fields[n][0:npages], ref[n]), n
        assert np.array_equal(table.get_range(n, 3, npages - 1), ref[n][3:npages - 1])
        if npages > 5:
            assert fields[n][5] == ref[n][5]
    # Every chunk holds exactly the blocks with a value other than the default.
    for ch in table.chunks():
        for b in ch.blocks():
            lo = ch.base + b * BLOCK_PAGES
            assert lo < npages


def test_memory_only_for_blocks_with_values() -> None:
    npages = 2**26                      # the default max_pages_per_worker
    table = PageTable(npages)
    status = Field(table, "status")
    assert table.nbytes == 0 and len(table) == 0
    status[np.arange(0, npages, 3 * CHUNK_PAGES + 5, dtype=np.int64)] = 0   # defaults: nothing
    assert table.nbytes == 0
    assert status[npages - 1] == 0 and Field(table, "slot")[12345] == -1
    spread = np.arange(0, npages, npages // 64, dtype=np.int64)
    status[spread] = 3
    assert len(table) == 64
    assert table.nbytes == 64 * BLOCK_PAGES * BYTES_PER_PAGE
    assert np.array_equal(status[spread], np.full(64, 3))
    assert next(table.chunks()).nblocks == 1


def test_bool_masks_are_refused() -> None:
    f = Field(PageTable(10), "status")
    with pytest.raises(TypeError):
        f[np.ones(10, bool)] = 1


@pytest.mark.parametrize("seed", range(6))
def test_advice_runs_equal_a_dense_mask(seed: int) -> None:
    rng = random.Random(seed)
    npages = rng.choice([1, 100, 10_000])
    runs = AdviceRuns(npages)
    ref = np.zeros(npages, bool)
    for _ in range(400):
        a = rng.randrange(npages)
        n = rng.randrange(1, min(npages - a, rng.choice([1, 5, 500, npages])) + 1)
        on = rng.random() < 0.6
        runs.set(a, n, on)
        ref[a:a + n] = on
        # the runs are sorted, disjoint and never touch
        assert all(s < e for s, e in runs.runs())
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(runs.runs(), runs.runs()[1:]))
        x, y = sorted(rng.randrange(npages + 1) for _ in range(2))
        assert np.array_equal(runs.mask(x, y), ref[x:y])
        p = np.array([rng.randrange(npages) for _ in range(20)], np.int64)
        assert np.array_equal(runs[p], ref[p])
        q = rng.randrange(npages)
        assert runs[q] == ref[q]
        nxt = runs.next_run(q)
        after = np.flatnonzero(ref[q:])
        assert (nxt is None) == (len(after) == 0)
        if nxt is not None:
            assert max(nxt[0], q) == q + after[0]
    assert runs.count() == int(ref.sum())
    assert runs.any() == bool(ref.any())
    assert np.array_equal(runs[0:npages], ref)


def test_advice_of_a_huge_range_is_one_run() -> None:
    runs = AdviceRuns(2**31)
    runs.set(0, 2**31, True)
    runs.set(0, 2**31, False)
    runs.set(0, 2**31, True)
    assert runs.runs() == [(0, 2**31)]
    runs.set(2**30, 1, False)
    assert runs.runs() == [(0, 2**30), (2**30 + 1, 2**31)]


def test_advice_runs_are_capped() -> None:
    runs = AdviceRuns(4 * MAX_ADVICE_RUNS)
    for i in range(MAX_ADVICE_RUNS):
        runs.set(2 * i, 1, True)
    before = runs.runs()
    with pytest.raises(ValueError, match="separate advised ranges"):
        runs.set(2 * MAX_ADVICE_RUNS + 1, 1, True)
    assert runs.runs() == before                   # nothing changed
    runs.set(0, 1, False)                          # fewer runs: fine
    runs.set(2 * MAX_ADVICE_RUNS + 1, 1, True)
    runs.set(0, 4 * MAX_ADVICE_RUNS, True)         # one run again
    assert len(runs) == 1
