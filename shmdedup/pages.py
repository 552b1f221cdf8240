"""Pages, runs of pages, and integer arguments: the shared base's one copy of each.

* ``PAGE_SIZE`` and :func:`pages_for` (bytes rounded up to whole pages).
* :func:`cut_runs`: where sorted pages split into runs of consecutive pages
  (whose slots, if given, advance with them): the mapping budget's unit, one
  mmap and one VMA per run in a worker (DESIGN, "Mapping budget"), and the
  coordinator's ``tracking.Run``;
  :func:`mask_runs`, the same for the pages a mask selects.
* :func:`check_int`: the argument check of every public entry point that
  takes a count, a size, an offset or an id: a bool is never an int, and a
  bad value is an ``ArgumentError`` (a ``ValueError``) naming the argument.
"""

from __future__ import annotations

import os
import numpy as np

from shmdedup.errors import ArgumentError

__all__ = ["PAGE_SIZE", "check_int", "cut_runs", "mask_runs", "pages_for"]

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")


def pages_for(nbytes: int) -> int:
    """Pages needed to hold nbytes (rounded up)."""
    return (nbytes + PAGE_SIZE - 1) // PAGE_SIZE


def cut_runs(pages: np.ndarray, slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)``: the runs of ``pages`` (ascending) as index ranges
    ``[starts[i], ends[i])`` in which each page is the previous one plus one,
    and so is each slot of ``slots`` (same length) that is >= 0; negative
    slots (the zero page) make runs of their own, of any length."""
    pages = np.asarray(pages)
    if not len(pages):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cut = np.diff(pages) != 1
    if slots is not None:
        slots = np.asarray(slots)
        zero = slots < 0
        cut |= (zero[1:] != zero[:-1]) | (~zero[1:] & (np.diff(slots) != 1))
    cut = np.flatnonzero(cut) + 1
    return np.concatenate(([0], cut)), np.concatenate((cut, [len(pages)]))


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)``: the runs of True of a 1-D bool mask, as index
    ranges ``[starts[i], ends[i])``: ``cut_runs(np.flatnonzero(mask))`` in
    pages, without an index per page (a mask of millions of pages costs a
    byte of temporaries per page, not sixteen)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], np.asarray(mask, bool), [False])).view(np.int8)))
    return edges[::2], edges[1::2]


def check_int(name: str, value: object, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (no maximum: unbounded),
    else ``ArgumentError`` naming ``name``.  numpy integers are ints; a bool,
    though an int subclass, is always a caller bug (``True`` as a size)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an int, not {type(value).__name__}")
    value = int(value)
    if maximum is None:
        if value < minimum:
            raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    elif not minimum <= value <= maximum:
        raise ArgumentError(f"{name} must be an int in [{minimum}, {maximum}], got {value}")
    return value
