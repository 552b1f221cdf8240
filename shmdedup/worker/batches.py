"""The coordinator's merge and unmerge batches, run on this process's regions.

The agent (``agent.py``) receives a batch as the items of a ``merge`` or
``unmerge`` message: ``(rid, first page, npages, slot)`` rows, grouped by
region.  Each region's rows run under its op lock, which
``advise(UNMERGEABLE)`` takes for its sweep after dropping the advice, so a
merge never lands on a page no longer advised (``merge_advised``).  The work
itself is the C core's (``Region.merge``, ``Region.break_range``; GIL
released).  A region closed meanwhile, or rows that do not fit it, merge
nothing: the reply says 0 for those pages, and the coordinator visits them
again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Callable

import numpy as np

from shmdedup import _native, protocol
from shmdedup.pages import cut_runs
from shmdedup.worker.region import Region

log: logging.Logger = logging.getLogger("shmdedup.agent")

# Called after each region's part of a merge batch: (region, its rows, the result bytes).
AfterMerge = Callable[[Region, np.ndarray, bytes], None]


def groups(regions: Mapping[int, Region], items: bytes) -> list[tuple[Region | None, np.ndarray]]:
    """The items' rows, cut where the region changes: (region or None if
    this process has no such region now, its (first, npages, slot) rows)."""
    rows = protocol.items_from_bytes(items)
    out = []
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j, 0] == rows[i, 0]:
            j += 1
        out.append((regions.get(int(rows[i, 0])), rows[i:j, 1:]))
        i = j
    return out


def merge_items(regions: Mapping[int, Region], view: _native.StableView | None, items: bytes,
                after: AfterMerge | None = None) -> bytes:
    """Run a merge batch; returns one byte per page (1: merged)."""
    parts = []
    for region, rows in groups(regions, items):
        npages = int(rows[:, 1].sum())
        if region is None:
            parts.append(bytes(npages))
            continue
        with region.op_lock:
            try:
                parts.append(merge_advised(view, region, rows))
            except (ValueError, BufferError) as e:
                log.debug("merge refused: %s", e)
                parts.append(bytes(npages))
        if after is not None:
            after(region, rows, parts[-1])
    return b"".join(parts)


def merge_advised(view: _native.StableView | None, region: Region, rows: np.ndarray) -> bytes:
    """Merge the (first, n, slot) runs, refusing pages no longer advised.

    The coordinator may ask before it hears of an advise(UNMERGEABLE);
    merging such a page would leave it merged against the advice for good
    (the sweep of advise() may already be past it).  The caller holds the
    region's op lock, which advise(UNMERGEABLE) takes for its sweep after
    dropping the advice (see Agent.on_advise), so the check cannot go stale.
    """
    if (rows[:, 0] < 0).any() or (rows[:, 1] < 1).any() or (rows[:, 0] + rows[:, 1] > region.npages).any():
        raise ValueError("merge request outside the region")
    if view is None:    # merges come within a session, after its welcome set it
        raise ValueError("no stable segment to merge onto")
    pages = np.concatenate([np.arange(f, f + n) for f, n, _ in rows.tolist()])
    advised = region.may_merge(pages)
    if advised.all():
        return region.merge(view, np.ascontiguousarray(rows).tobytes())
    slots = np.concatenate([np.arange(s, s + n) if s >= 0 else np.full(n, -1)
                            for _, n, s in rows.tolist()])
    keep = np.flatnonzero(advised)
    res = np.zeros(len(pages), np.uint8)
    if len(keep):
        # Runs again, of the advised pages only: page and slot both advance by one.
        p, s = pages[keep], slots[keep]
        starts, ends = cut_runs(p, s)
        sub = np.stack((p[starts], ends - starts, s[starts]), axis=1).astype("<i8")
        res[keep] = np.frombuffer(region.merge(view, sub.tobytes()), np.uint8)
    return res.tobytes()


def unmerge_items(regions: Mapping[int, Region], items: bytes) -> tuple[int, str]:
    """Run an unmerge batch: break each run back to private pages.  Returns
    (0, "") or the errno and text of the first break that failed (no memory
    for the copies); what broke before it stays broken."""
    for region, rows in groups(regions, items):
        if region is None:
            continue
        with region.op_lock:
            for first, n, _ in rows:
                try:
                    region.break_range(int(first), int(n))
                except ValueError:
                    break  # closed meanwhile: nothing left to unmerge
                except OSError as e:
                    return e.errno or 5, str(e)
    return 0, ""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
