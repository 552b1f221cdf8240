"""The scan's settings (coordinator/scan/settings.py): one object, shared by
reference by the scanner, its matcher and inliner, the stable index and the
mapping budget, so that a control the coordinator sets between two batches
is what every part reads next.  Against real shm objects (memfds), with no
coordinator: the scanner alone, its merge requests captured.
"""

from __future__ import annotations

import os

from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.scan.settings import ScanSettings
from shmdedup.coordinator.scan.tracking import RegionState, Run
from shmdedup.controls import CONTROLS

P = os.sysconf("SC_PAGE_SIZE")


class W:
    def __init__(self, uid: int) -> None:
        self.uid = self.pid = uid


def region(sc: Scanner, worker: W, rid: int, data: bytes, fds: list[int]) -> RegionState:
    n = len(data) // P
    b = os.memfd_create("settings", os.MFD_CLOEXEC)
    m = os.memfd_create("settings", os.MFD_CLOEXEC)
    os.ftruncate(b, n * P)
    os.ftruncate(m, P)
    os.pwrite(b, data, 0)
    fds += [b, m]
    reg = RegionState.open(worker, rid, n, os.dup(b), os.dup(m))
    sc.add_region(reg)
    sc.advise(reg, 0, n, True)
    return reg


def scan_twice(sc: Scanner) -> None:
    """Two full scans: every steady page has been matched."""
    for _ in range(2):
        scans = sc.full_scans
        while sc.full_scans == scans:
            sc.batch(10_000)


def test_defaults_are_the_controls_defaults() -> None:
    s = ScanSettings()
    assert (s.smart_scan, s.max_page_sharing, s.max_kernel_pages, s.use_zero_pages, s.zero_pages_only,
            s.max_mappings, s.inline_keep) == (
        bool(CONTROLS["smart_scan"][0]), CONTROLS["max_page_sharing"][0], CONTROLS["max_kernel_pages"][0],
        bool(CONTROLS["use_zero_pages"][0]), bool(CONTROLS["merge_zero_pages_only"][0]),
        CONTROLS["max_mappings"][0], CONTROLS["inline_keep_millisecs"][0] / 1000)


def test_every_part_reads_the_one_settings_object() -> None:
    sc = Scanner(lambda w, runs: None, lambda w, runs: None)
    try:
        s = sc.settings
        assert sc.matcher.settings is s and sc.inliner.settings is s
        assert sc.sidx.settings is s and sc.budget.settings is s
        s.max_kernel_pages = 3
        s.max_mappings = 5
        assert sc.sidx.room(10) == 3 and sc.budget.max_mappings == 5
    finally:
        sc.close()


def test_settings_changed_between_batches_steer_the_scan_and_merge_now() -> None:
    """max_kernel_pages set on the settings caps the stable pages the scan
    makes; use_zero_pages sends zero pages to the zero page (slot -1);
    merge_zero_pages_only, set afterwards, keeps merge_now from making a
    stable page for data it has never seen."""
    sent: list[tuple[object, list[Run]]] = []
    sc = Scanner(lambda w, runs: sent.append((w, runs)), lambda w, runs: None)
    fds: list[int] = []
    try:
        sc.settings.smart_scan = False
        sc.settings.max_kernel_pages = 2
        sc.settings.use_zero_pages = True
        data = b"".join(os.urandom(P) for _ in range(4)) + bytes(2 * P)
        a, b = W(0), W(0)
        region(sc, a, 1, data, fds)
        region(sc, b, 2, data, fds)
        scan_twice(sc)
        runs = [r for _, rs in sent for r in rs]
        assert all(type(r) is Run for r in runs)
        slots = {r.slot + i for r in runs if r.slot >= 0 for i in range(r.n)}
        assert len(slots) == 2, runs                       # max_kernel_pages
        zero = sorted(p for r in runs if r.slot < 0 for p in range(r.first, r.first + r.n))
        assert zero == [4, 4, 5, 5], runs                  # use_zero_pages, both regions
        assert sc.sidx.pages_in_use == 2
        # merge_now, under merge_zero_pages_only: no new stable page.
        sc.settings.max_kernel_pages = 0
        sc.settings.zero_pages_only = True
        fresh = region(sc, W(0), 3, os.urandom(3 * P), fds)
        res = sc.merge_inline(fresh, 0, 3)
        assert res.created == 0 and not res.runs
        sc.settings.zero_pages_only = False
        res = sc.merge_inline(fresh, 0, 3)
        assert res.created == 3 and sum(r.n for r in res.runs) == 3
    finally:
        sc.close()
        for fd in fds:
            os.close(fd)
