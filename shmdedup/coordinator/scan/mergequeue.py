"""Merges queued in one batch: what the scan and merge_now hand the coordinator.

:class:`MergeQueue` is shared by the matcher (``matching.py``) and the inliner
(``inline.py``), which queue merges through :meth:`MergeQueue.add`, and the
scanner, which takes back a batch's merges that will not be sent
(:meth:`MergeQueue.release`).  A batch's merges are a ``QueuedByWorker``
dict, (region, pages, slots) per worker, that ``tracking._coalesce`` turns
into runs at the end of the batch.

Invariant 6 (DESIGN.md): a queued merge holds a ``pending`` count on its
slot, so the slot is not freed while the request is in flight; releasing a
merge drops the count and frees a slot left with no sharer and nothing
pending.  Merges past a worker's mapping budget (``budget.py``) are not
queued; their pages are visited again later.
"""

from __future__ import annotations

import numpy as np

from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.coordinator.scan.indexes import StableIndex
from shmdedup.coordinator.scan.tracking import PENDING, VOLATILE, Queued, QueuedByWorker, RegionState


class MergeQueue:
    """Queue merges onto stable slots (or the zero page), holding their slots."""

    def __init__(self, sidx: StableIndex, budget: MappingBudget) -> None:
        self.sidx: StableIndex = sidx
        self.budget: MappingBudget = budget

    def add(self, merges: QueuedByWorker, reg: RegionState, pages: np.ndarray, slots: np.ndarray,
            checked: bool = False) -> None:
        """Queue merges of ``pages`` of ``reg`` onto ``slots`` (-1: the zero
        page) in ``merges``: their status becomes PENDING and each slot gets a
        pending count.  Unless ``checked`` (the caller admitted them already),
        pages past the worker's mapping budget are left VOLATILE instead."""
        if not len(pages):
            return
        if not checked:
            pages, slots, over = self.budget.admit(reg, pages, slots)
            reg.status[over] = VOLATILE     # past the mapping budget: visited again later
            if not len(pages):
                return
        pages = np.asarray(pages, np.int64)
        reg.table.assign(pages, {"status": PENDING, "age": 0, "skip": 0})
        slots = np.asarray(slots, np.int64)
        real = slots[slots >= 0]
        pending = self.sidx.pending
        if len(real) and int(real[-1]) - int(real[0]) == len(real) - 1 and (
                len(real) == 1 or (real[1:] > real[:-1]).all()):
            pending[int(real[0]):int(real[-1]) + 1] += 1     # a run of slots (new stable pages)
        elif len(real) > 1 and (real[1:] > real[:-1]).all():
            pending[real] += 1               # distinct slots (the usual case): no ufunc.at
        elif len(real):
            np.add.at(pending, real, 1)
        merges.setdefault(reg.worker, []).append((reg, pages, slots))

    def release(self, items: list[Queued]) -> None:
        """Merges queued that will not be sent: release the slots they hold,
        and visit their pages again."""
        for reg, pages, slots in items:
            real = slots[slots >= 0]
            np.subtract.at(self.sidx.pending, real, 1)
            self.sidx.free_unused(real)
            if not reg.closed:
                reg.status[pages] = VOLATILE


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
