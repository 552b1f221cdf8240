"""The scanner's steady rescan (coordinator/scan/scanner.py) against real
shm objects, with no coordinator: the scanner alone, and a stand-in for the
workers' agents that does what they do to the objects the scanner reads
(state bytes MERGED and the backing punched on a merge, the bytes back and
PRIVATE on an unmerge; a write breaks a page: new bytes, PRIVATE).

* Once everything is merged, a full scan asks no chunk which of its pages
  hold data (no cachestat, no seeks): merged pages are reconciled from their
  state bytes alone.  A page broken meanwhile is still seen, its twin given
  back (unmerged), and the data of the broken page is asked for again.
* Once nothing changes, no chunk's mappings are recounted (a statistics
  call used to recount every region), and yet the mapping budget's estimate
  stays equal to a recount from scratch: after a break in a
  merged chunk, and after pages merged by someone else (a stand-in for a
  previous coordinator's) appear and are broken again between two visits.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shmdedup import _native, _shm
from shmdedup.coordinator.scan.budget import MappingBudget
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import MERGED, UNMERGING, RegionState

P = os.sysconf("SC_PAGE_SIZE")
N = 3 * 2048 + 100              # three whole chunks and a short one


class W:
    def __init__(self, uid: int, pid: int) -> None:
        self.uid, self.pid = uid, pid


class Fleet:
    """A scanner, its regions (memfd objects) and the agents' part."""

    def __init__(self) -> None:
        self.merges: list[Any] = []
        self.unmerges: list[Any] = []
        self.sc = Scanner(lambda w, runs: self.merges.append(runs),
                          lambda w, runs: self.unmerges.append(runs))
        self.fds: list[int] = []
        self.data: dict[int, bytes] = {}
        self.regs: list[RegionState] = []

    def region(self, worker: W, data: bytes) -> RegionState:
        n = len(data) // P
        b = os.memfd_create("steady", os.MFD_CLOEXEC)
        m = os.memfd_create("steady", os.MFD_CLOEXEC)
        os.ftruncate(b, n * P)
        os.ftruncate(m, n)
        os.pwrite(b, data, 0)
        self.fds += [b, m]
        reg = RegionState.open(worker, len(self.regs), n, os.dup(b), os.dup(m))
        self.sc.add_region(reg)
        self.sc.advise(reg, 0, n, True)
        self.data[id(reg)] = data
        self.regs.append(reg)
        return reg

    def agents(self) -> None:
        while self.merges or self.unmerges:
            while self.merges:
                runs = self.merges.pop()
                for r in runs:
                    state = _native.MERGED if r.slot >= 0 else _native.ZERO
                    os.pwrite(r.region.meta_fd, bytes([state]) * r.n, r.first)
                    _shm.punch_hole(r.region.backing_fd, r.first * P, r.n * P)
                self.sc.merge_done(runs, b"\x01" * sum(r.n for r in runs))
            while self.unmerges:
                runs = self.unmerges.pop()
                for r in runs:
                    old = self.data[id(r.region)][r.first * P:(r.first + r.n) * P]
                    os.pwrite(r.region.backing_fd, old, r.first * P)
                    os.pwrite(r.region.meta_fd, bytes([_native.PRIVATE]) * r.n, r.first)
                self.sc.unmerge_done(runs)

    def full_scans(self, k: int) -> None:
        end = self.sc.full_scans + k
        while self.sc.full_scans < end:
            self.sc.batch(3000, 0.05)       # batches that end inside chunks
            self.agents()

    def converge(self) -> None:
        last = -1
        for _ in range(40):
            self.full_scans(1)
            now = self.sc.stats()["pages_sharing"]
            if now == last:
                return
            last = now
        raise AssertionError("no convergence")

    def write(self, reg: RegionState, page: int, data: bytes) -> None:
        """The worker writes a page: a break if it was merged."""
        os.pwrite(reg.backing_fd, data, page * P)
        os.pwrite(reg.meta_fd, bytes([_native.PRIVATE]), page)
        d = self.data[id(reg)]
        self.data[id(reg)] = d[:page * P] + data + d[(page + 1) * P:]

    def fresh_estimate(self, worker: W) -> int:
        """The worker's mappings counted from scratch."""
        b = MappingBudget(self.sc.settings)
        for reg in self.regs:
            if reg.worker is worker:
                b.add(reg)
        return b.estimate(worker)

    def close(self) -> None:
        self.sc.close()
        for fd in self.fds:
            os.close(fd)


def test_merged_chunks_are_rescanned_without_asking_for_data(fleet: Fleet, monkeypatch: Any) -> None:
    data = os.urandom(N * P)
    a = fleet.region(W(0, 1), data)
    b = fleet.region(W(0, 2), data)
    fleet.converge()
    assert fleet.sc.stats()["pages_sharing"] == N
    asked: list[tuple[int, int]] = []
    real = RegionState.present

    def present(self: RegionState, p0: int, p1: int) -> np.ndarray:
        asked.append((p0, p1))
        return real(self, p0, p1)
    monkeypatch.setattr(RegionState, "present", present)
    scanned = fleet.sc.pages_scanned
    fleet.full_scans(2)
    assert asked == []
    assert fleet.sc.pages_scanned - scanned == 2 * 2 * N      # every merged page visited

    # A write breaks page 5 of a: reconciled at the next visit; b's page 5
    # is left alone on its slot and given back; the broken page is read.
    fleet.write(a, 5, os.urandom(P))
    fleet.full_scans(1)
    assert asked, "the broken page's data was not looked at"
    assert a.status[5] != MERGED and a.slot[5] == -1
    assert b.status[5] in (UNMERGING, 1, 2)
    fleet.full_scans(2)
    st = fleet.sc.stats()
    assert st["pages_sharing"] == N - 1 and st["pages_shared"] == N - 1
    assert b.slot[5] == -1 and b.states[5] == _native.PRIVATE
    assert int(np.count_nonzero(fleet.sc.sharers > 0)) == N - 1


def test_budget_estimate_stays_exact_when_calm_chunks_are_not_recounted(fleet: Fleet,
                                                                       monkeypatch: Any) -> None:
    w = W(0, 1)
    data = os.urandom(N * P)
    a = fleet.region(w, data)
    fleet.region(W(0, 2), data)
    c = fleet.region(w, os.urandom(N * P))          # unique: never merged
    fleet.converge()
    fleet.full_scans(2)
    assert fleet.sc.budget.estimate(w) == fleet.fresh_estimate(w)

    # Nothing changes: no chunk is recounted, not even those that batches
    # end inside (visited in pieces).
    touched: list[int] = []
    real = MappingBudget.touch

    def touch(self: MappingBudget, reg: Any, first: int, n: int) -> None:
        touched.append(first)
        real(self, reg, first, n)
    monkeypatch.setattr(MappingBudget, "touch", touch)
    fleet.full_scans(2)
    assert touched == []

    # Breaks inside merged runs: each splits a stretch.
    for p in (100, 2048 + 7, 3 * 2048 + 50):
        fleet.write(a, p, os.urandom(P))
    fleet.full_scans(1)
    assert fleet.sc.budget.estimate(w) == fleet.fresh_estimate(w)
    fleet.full_scans(3)
    assert fleet.sc.budget.estimate(w) == fleet.fresh_estimate(w)

    # Pages of the unique region show merged by someone else (a previous
    # coordinator's pages), are counted, then break again between visits.
    os.pwrite(c.meta_fd, bytes([_native.MERGED]) * 40, 2048 + 300)
    fleet.full_scans(1)
    before = fleet.sc.budget.estimate(w)
    assert before == fleet.fresh_estimate(w)
    os.pwrite(c.meta_fd, bytes([_native.PRIVATE]) * 40, 2048 + 300)
    fleet.full_scans(2)
    assert fleet.sc.budget.estimate(w) == fleet.fresh_estimate(w) == before - 2
