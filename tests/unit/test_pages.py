"""shmdedup.pages: the run cutter against a plain loop, and the integer check's edges."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmdedup.errors import ArgumentError, Error
from shmdedup.pages import PAGE_SIZE, check_int, cut_runs, mask_runs, pages_for


def _runs_by_loop(pages: list[int], slots: list[int] | None) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(len(pages)):
        joins = i > 0 and pages[i] == pages[i - 1] + 1
        if joins and slots is not None:
            a, b = slots[i - 1], slots[i]
            joins = (a < 0 and b < 0) or (a >= 0 and b == a + 1)
        if joins:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


@st.composite
def pages_and_slots(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    pages = sorted(draw(st.sets(st.integers(0, 40), max_size=30)))
    slots = draw(st.lists(st.integers(-1, 6), min_size=len(pages), max_size=len(pages)))
    return pages, slots


@given(pages_and_slots(), st.booleans())
def test_cut_runs_is_the_loop(ps: tuple[list[int], list[int]], with_slots: bool) -> None:
    pages, slots = ps
    starts, ends = cut_runs(np.array(pages, np.int64), np.array(slots, np.int64) if with_slots else None)
    assert list(zip(starts.tolist(), ends.tolist())) == _runs_by_loop(pages, slots if with_slots else None)


def test_cut_runs_known_answers() -> None:
    starts, ends = cut_runs(np.array([3, 4, 5, 7, 8, 9, 10]), np.array([10, 11, 20, -1, -1, 5, 6]))
    assert starts.tolist() == [0, 2, 3, 5] and ends.tolist() == [2, 3, 5, 7]
    starts, ends = cut_runs(np.array([], np.int64))
    assert starts.tolist() == ends.tolist() == []


def test_pages_for() -> None:
    assert [pages_for(n) for n in (0, 1, PAGE_SIZE, PAGE_SIZE + 1)] == [0, 1, 1, 2]


@pytest.mark.parametrize("value, lo, hi", [
    (True, 0, None), (False, 0, None), (1.0, 0, None), ("1", 0, None), (None, 0, None),
    (-1, 0, None), (0, 1, None), (11, 0, 10), (-1, 0, 10), (2**63, 0, 2**63 - 1),
])
def test_check_int_refuses(value: object, lo: int, hi: int | None) -> None:
    with pytest.raises(ArgumentError, match="^n must be") as e:
        check_int("n", value, lo, hi)
    assert isinstance(e.value, ValueError) and isinstance(e.value, Error)


@pytest.mark.parametrize("value, lo, hi", [(0, 0, None), (10, 0, 10), (np.int64(5), 5, 5), (2**70, 0, None)])
def test_check_int_accepts(value: object, lo: int, hi: int | None) -> None:
    got = check_int("n", value, lo, hi)
    assert got == value and type(got) is int


@given(st.lists(st.booleans(), max_size=50))
def test_mask_runs_are_the_runs_of_its_pages(bits: list[bool]) -> None:
    mask = np.array(bits, bool)
    pages = np.flatnonzero(mask)
    starts, ends = cut_runs(pages)
    got = mask_runs(mask)
    assert got[0].tolist() == pages[starts].tolist()
    assert got[1].tolist() == (pages[ends - 1] + 1).tolist()
