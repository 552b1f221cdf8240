"""Pacing: the scan-time advisor (default), manual pages_to_scan, smart_scan."""

from __future__ import annotations


import numpy as np
import pytest

import shmdedup
from tests.helpers import wait_for
from shmdedup import MERGEABLE, PAGE_SIZE



@pytest.fixture
def region():
    r = shmdedup.Region(2048 * PAGE_SIZE)
    a = r.ndarray(np.uint8).reshape(-1, PAGE_SIZE)
    a[:] = np.random.default_rng(5).integers(0, 256, a.shape, dtype=np.uint8)
    del a
    yield r
    r.close()


def test_advisor_paces_by_default_and_manual_pages_to_scan_turns_it_off(region) -> None:
    with shmdedup.Coordinator(advisor_target_scan_time=1, sleep_millisecs=5) as c:
        s = c.stats()
        assert s["advisor_mode"] == 1 and s["pages_to_scan"] == 4096
        region.advise(MERGEABLE)
        # 2048 unique pages take one batch: far faster than the 1 s target, so
        # the advisor lowers pages_to_scan towards its minimum.
        c.wait_full_scans(3, timeout=30)
        s = wait_for(lambda: (lambda s: s if s["pages_to_scan"] < 4096 else None)(c.stats()), 30,
                     "the advisor to lower pages_to_scan")
        assert s["pages_to_scan"] >= s["advisor_min_pages_to_scan"]
        c.set("pages_to_scan", 1234)
        s = c.stats()
        assert s["advisor_mode"] == 0 and s["pages_to_scan"] == 1234
        c.wait_full_scans(2, timeout=30)
        assert c.stats()["pages_to_scan"] == 1234


def test_explicit_pages_to_scan_at_start_means_no_advisor() -> None:
    with shmdedup.Coordinator(pages_to_scan=777) as c:
        s = c.stats()
        assert s["advisor_mode"] == 0 and s["pages_to_scan"] == 777


def test_smart_scan_skips_unique_pages_but_twins_still_merge(region) -> None:
    with shmdedup.Coordinator(pages_to_scan=10000, sleep_millisecs=0) as c:
        region.advise(MERGEABLE)
        c.wait_full_scans(12, timeout=60)
        s = c.stats()
        assert s["pages_skipped"] > 0 and s["pages_sharing"] == 0
        # A twin of every page appears late: the skipped pages still merge.
        with shmdedup.Region(2048 * PAGE_SIZE) as twin:
            a = twin.ndarray(np.uint8)
            a[:] = np.frombuffer(region, np.uint8)
            del a
            twin.advise(MERGEABLE)
            wait_for(lambda: c.stats()["pages_sharing"] == 2048, 60, "the late twins to merge")
            assert twin.merged_pages() == region.merged_pages() == 2048
            assert bytes(memoryview(twin)) == bytes(memoryview(region))


def test_a_quiet_domain_still_merges_a_page_written_later() -> None:
    """Converged and unchanging, the advisor scans the domain in one batch a
    full scan (pacing.py); a page written afterwards, with no message to the
    coordinator (a plain store), is still found at the next visits and
    merged, as before.  The domain is bigger than MIN_BATCH_PAGES, so the
    quiet batches are bigger than the busy ones."""
    from shmdedup.coordinator.pacing import MIN_BATCH_PAGES
    n = MIN_BATCH_PAGES // 2 + 2048
    rng = np.random.default_rng(11)
    content = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
    with shmdedup.Coordinator(advisor_target_scan_time=1, sleep_millisecs=5) as c, \
            shmdedup.Region(n * PAGE_SIZE) as a, shmdedup.Region(n * PAGE_SIZE) as b, \
            shmdedup.Region(256 * PAGE_SIZE) as u:
        for r in (a, b):
            r.ndarray(np.uint8).reshape(n, PAGE_SIZE)[:] = content
        u.ndarray(np.uint8).reshape(256, PAGE_SIZE)[:] = rng.integers(0, 256, (256, PAGE_SIZE),
                                                                      dtype=np.uint8)
        for r in (a, b, u):
            r.advise(MERGEABLE)
        wait_for(lambda: c.stats()["pages_sharing"] == n, 60, "the twins to merge")
        c.wait_full_scans(3, timeout=60)                # nothing changes: quiet
        assert u.merged_pages() == 0
        held = u.allocated_bytes()
        u.ndarray(np.uint8).reshape(256, PAGE_SIZE)[7] = content[7]   # a twin appears by a store
        wait_for(lambda: u.merged_pages() == 1, 60, "the written page to merge")
        assert bytes(memoryview(u)[7 * PAGE_SIZE:8 * PAGE_SIZE]) == content[7].tobytes()
        assert held - u.allocated_bytes() >= PAGE_SIZE   # its copy punched, seen by st_blocks
        assert c.stats()["pages_sharing"] == n + 1
