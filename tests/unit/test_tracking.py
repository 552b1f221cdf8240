"""The scanner's array helpers in shmdedup.coordinator.scan.tracking, against numpy as the oracle."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmdedup.coordinator.scan import tracking
from shmdedup.coordinator.scan.tracking import RegionState, Run, _coalesce, _repeated, _unique
from shmdedup.pages import PAGE_SIZE

values = st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 8), max_size=60)


@given(values)
def test_unique_is_np_unique(xs: list[int]) -> None:
    a = np.array(xs, np.uint64)
    got = _unique(a)
    assert got.dtype == a.dtype
    assert np.array_equal(got, np.unique(a))


@given(st.lists(st.integers(-5, 5), max_size=60))
def test_unique_signed(xs: list[int]) -> None:
    a = np.array(xs, np.int64)
    assert np.array_equal(_unique(a), np.unique(a))


@given(values)
def test_repeated_marks_values_seen_more_than_once(xs: list[int]) -> None:
    a = np.array(xs, np.uint64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    assert np.array_equal(_repeated(a), (counts[inv] > 1).reshape(-1))


def test_coalesce_makes_named_runs() -> None:
    """Queued pages of two regions, out of order, become Runs: pages and
    slots advancing together, zero-page runs (slot -1) apart."""
    a, b = object(), object()
    items = [(a, [5, 6], [11, 12]), (b, [0], [-1]), (a, [3, 4, 7], [-1, -1, 13])]
    runs = _coalesce([(r, np.array(p, np.int64), np.array(s, np.int64)) for r, p, s in items])
    assert runs == [Run(a, 3, 2, -1), Run(a, 5, 3, 11), Run(b, 0, 1, -1)]
    assert all(type(r) is Run for r in runs) and runs[1].n == 3


@pytest.mark.parametrize("cachestat", [True, False])
def test_next_data_finds_the_first_page_with_data(cachestat: bool, monkeypatch) -> None:
    """RegionState.next_data: page p itself when it holds data (asked of
    cachestat, no seek), else the next page with data (SEEK_DATA), None past
    the last; the same answers on a kernel without cachestat."""
    monkeypatch.setattr(tracking, "_cachestat", cachestat)
    P = PAGE_SIZE
    back, meta = os.memfd_create("b"), os.memfd_create("m")
    os.ftruncate(back, 16 * P)
    os.ftruncate(meta, 16)
    reg = RegionState.open(None, 1, 16, back, meta)
    try:
        os.pwrite(back, b"x", 5 * P)
        os.pwrite(back, b"y", 9 * P + 7)
        assert [reg.next_data(p) for p in (0, 5, 6, 9, 10, 15, 16, 99)] == [5, 5, 9, 9, None, None, None, None]
        assert tracking._cachestat is cachestat
    finally:
        reg.close()
