"""KSM's first look: a page seen for the first time (or changed since its
last visit) merges at that visit onto an equal stable page.  Linux's
cmp_and_merge_page searches the stable tree before its checksum test; only
the unstable tree waits for a page to keep its checksum for two visits, and
here (amendment 15) only a page that changed: two new copies of the same
bytes merge at their first visit too.

The fleet case: two workers hold the same table and have merged; a third
starts later with the same bytes.  Its pages merge at the scan's first pass
over them, not one full scan later.  The coordinator is made to scan
exactly when told (``sleep_millisecs`` of an hour; a control set or a range
advised wakes one batch, and one batch covers the whole small domain), so
the late worker's pages are visited once: with the two-visit rule applied
to the stable index too they would never merge here.
"""

from __future__ import annotations

from tests.helpers import Worker, wait_for
from tests.integration.conftest import FAST, counts, wait_stats

N = 512

SETUP = r"""
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P

def region(seed):
    r = shmdedup.Region(N * P)
    r.ndarray(np.uint8, (N, P))[:] = np.random.default_rng(seed).integers(0, 256, (N, P), dtype=np.uint8)
    return r
"""


def test_a_late_workers_pages_merge_at_their_first_visit(coordinator) -> None:
    c = coordinator(**FAST)
    early = [Worker(setup=f"N = {N}\n" + SETUP) for _ in range(2)]
    for w in early:
        w.call("r = region(1); r.advise(shmdedup.MERGEABLE)")
    wait_stats(c, lambda s: s["pages_sharing"] == N, what="the early workers to merge")
    want = early[0].call("result = bytes(memoryview(r))")
    c.set("run", 0)
    c.set("sleep_millisecs", 3_600_000)     # from now on a batch runs only when woken
    before = c.stats()["full_scans"]
    late = Worker(setup=f"N = {N}\n" + SETUP)
    held = late.call("r = region(1); result = r.allocated_bytes()")
    assert held >= N * 4096
    late.call("r.advise(shmdedup.MERGEABLE)")   # wakes one batch (or the next line does)
    c.set("run", 1)
    wait_for(lambda: late.call("result = r.merged_pages()") == N, 30,
             "the late worker's pages to merge at their first visit")
    s = wait_stats(c, lambda s: counts(s) == {"pages_shared": N, "pages_sharing": 2 * N},
                   what="the coordinator to count the merges")
    # Each wake ran one batch, each batch one full scan: at most two since run=0.
    assert s["full_scans"] - before <= 2
    # Seen from outside: its copies are punched, and it reads its own bytes.
    assert late.call("result = r.allocated_bytes()") <= held - N * 4096
    assert late.call("result = bytes(memoryview(r))") == want
    for w in early + [late]:
        assert w.call("r.close(); result = 1") == 1


def test_two_new_copies_merge_at_their_first_visit(coordinator) -> None:
    """Two workers load the same bytes while the scan is stopped; one batch
    (one full scan of this small domain) merges them: before amendment 15
    that visit only recorded their checksums, and no other batch runs."""
    c = coordinator(**FAST)
    c.set("run", 0)
    c.set("sleep_millisecs", 3_600_000)     # from now on a batch runs only when woken
    before = c.stats()["full_scans"]
    ws = [Worker(setup=f"N = {N}\n" + SETUP) for _ in range(2)]
    held = [w.call("r = region(2); r.advise(shmdedup.MERGEABLE); result = r.allocated_bytes()") for w in ws]
    assert min(held) >= N * 4096
    want = ws[0].call("result = bytes(memoryview(r))")
    c.set("run", 1)                         # wakes one batch
    wait_for(lambda: all(w.call("result = r.merged_pages()") == N for w in ws), 30,
             "both workers' pages to merge at their first visit")
    # The workers publish before the coordinator reads their replies.
    s = wait_stats(c, lambda s: counts(s) == {"pages_shared": N, "pages_sharing": N},
                   what="the coordinator to count the merges")
    assert s["full_scans"] - before <= 2
    # Seen from outside: both copies are punched, and each reads its own bytes.
    for w, h in zip(ws, held):
        assert w.call("result = r.allocated_bytes()") <= h - N * 4096
        assert w.call("result = bytes(memoryview(r))") == want
        assert w.call("r.close(); result = 1") == 1
