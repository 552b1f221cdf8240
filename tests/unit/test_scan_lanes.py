"""The scanner's lanes (one cursor per uid, coordinator/scan/registry.py)
against real shm objects, with no coordinator: the scanner alone, its merge
requests captured.

* A uid with a few pages is seen again and again while another uid's many
  regions are still being scanned, so its fresh pages merge within a few
  batches instead of a full scan of everyone's data.
* A page visited again within one full scan keeps its unstable entry from
  the earlier visit: its twin matching that entry queues it, and it must not
  be queued a second time on its own turn (the same page twice in one merge
  request: the worker refuses one, and the page was left VOLATILE with a slot).
* A single uid scans as ksmd does: each full scan visits each page once.
* The pages of a batch are each uid's own: a uid whose pages are cheap does
  not take them all from a uid whose pages are dear.
"""

from __future__ import annotations

import os

import numpy as np

from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.tracking import RegionState

P = os.sysconf("SC_PAGE_SIZE")


class W:
    """A worker as the scanner sees it: a uid and a pid."""

    def __init__(self, uid: int) -> None:
        self.uid = self.pid = uid


def region(scanner: Scanner, worker: W, rid: int, data: bytes, fds: list[int]) -> RegionState:
    n = len(data) // P
    b = os.memfd_create("lanes", os.MFD_CLOEXEC)
    m = os.memfd_create("lanes", os.MFD_CLOEXEC)
    os.ftruncate(b, n * P)
    os.ftruncate(m, P)
    os.pwrite(b, data, 0)
    fds += [b, m]
    reg = RegionState.open(worker, rid, n, os.dup(b), os.dup(m))
    scanner.add_region(reg)
    scanner.advise(reg, 0, n, True)
    return reg


def test_a_small_uid_is_seen_again_while_another_uid_is_scanned() -> None:
    sent: list = []
    sc = Scanner(lambda w, runs: sent.append((w, runs)), lambda w, runs: None)
    fds: list[int] = []
    try:
        honest, other = W(0), W(1000)
        page = os.urandom(P)
        region(sc, honest, 1, page * 2, fds)           # two equal pages: they merge
        for rid in range(400):
            region(sc, other, rid, os.urandom(P), fds)
        for n in range(1, 200):
            sc.batch(64)
            if any(w is honest for w, _ in sent):
                break
        assert any(w is honest for w, _ in sent)
        assert sc.full_scans == 0, "merged only after everyone's full scan"
        # Each merge request names each page once.
        for w, runs in sent:
            pages = [p for reg, first, k, _ in runs for p in range(first, first + k)]
            assert len(pages) == len(set(pages)), runs
    finally:
        sc.close()
        for fd in fds:
            os.close(fd)


def test_a_page_matched_as_a_mate_is_not_queued_again() -> None:
    """Within one full scan: page 16 gets new bytes Z and enters the unstable
    index; then page 0 gets Z too.  At the next visit page 0 matches page
    16's entry and queues both; page 16's own turn must find it queued."""
    sent: list = []
    sc = Scanner(lambda w, runs: sent.append((w, runs)), lambda w, runs: None)
    sc.settings.smart_scan = False
    fds: list[int] = []
    try:
        honest, other = W(0), W(1000)
        reg = region(sc, honest, 1, os.urandom(32 * P), fds)
        for rid in range(2000):
            region(sc, other, rid, os.urandom(P), fds)
        z = os.urandom(P)

        def visits() -> None:
            for _ in range(4):
                sc.batch(64)
        visits()
        os.pwrite(reg.backing_fd, z, 16 * P)
        visits()
        assert reg.status[16] == 2               # UNSHARED: in the unstable index
        os.pwrite(reg.backing_fd, z, 0)
        visits()
        assert sc.full_scans == 0
        queued = [p for w, runs in sent if w is honest
                  for r, first, k, _ in runs for p in range(first, first + k)]
        assert sorted(queued) == [0, 16], queued  # each once
        for w, runs in list(sent):
            if w is honest:
                sc.merge_done(runs, b"\x01" * sum(k for _, _, k, _ in runs))
        st, sl = reg.status[0:32], reg.slot[0:32]
        assert ((st == 3) == (sl >= 0)).all(), (st, sl)
    finally:
        sc.close()
        for fd in fds:
            os.close(fd)


def test_one_uid_visits_each_page_once_per_full_scan() -> None:
    sc = Scanner(lambda w, runs: None, lambda w, runs: None)
    fds: list[int] = []
    try:
        w = W(0)
        for rid in range(5):
            region(sc, w, rid, os.urandom(3 * P), fds)
        for _ in range(3):
            before, scans = sc.pages_scanned, sc.full_scans
            while sc.full_scans == scans:
                sc.batch(4)
            assert sc.pages_scanned - before == 15
    finally:
        sc.close()
        for fd in fds:
            os.close(fd)


def test_each_uid_gets_its_pages_of_a_batch_however_cheap_another_uids_are() -> None:
    """A uid whose pages cost next to nothing (a converged domain's rescan)
    keeps the least CPU of all, so every step goes to it: the batch's pages
    are each lane's own, or it would take them all and leave a uid whose
    pages are dear a few a batch (its first scan took minutes)."""
    sc = Scanner(lambda w, runs: None, lambda w, runs: None)
    fds: list[int] = []
    try:
        cheap, dear = W(0), W(1000)
        region(sc, cheap, 1, os.urandom(64 * P), fds)
        region(sc, dear, 2, os.urandom(256 * P), fds)
        sc.lanes[0].spent = -1e9                         # always the least CPU
        assert sc.batch(32) == 64
        assert sc.lanes[1000].page == 32                 # the dear uid had its 32
        assert sc.lanes[0].page == 32
    finally:
        sc.close()
        for fd in fds:
            os.close(fd)
