"""The kernel tests' page-frame check across processes.

ksm_functional_tests.c checks, inside one process, that an unmerged range
maps no page frame twice.  Merging here is between processes as much as
within one: merged pages of two workers with the same content map the same
page frame (the stable page), and once unmerged no frame is mapped by both,
nor twice by either.  Each worker reads its own /proc/self/pagemap (PFNs are
shown to root; without them the test is skipped, as the kernel's check is
then vacuous).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import Worker
from tests.ksm_selftests.conftest import WORKER

NPAGES = 256

FILL = """
r = Region(npages * P)
r.ndarray(np.uint8, (npages, P))[:] = np.random.default_rng(7).integers(
    0, 256, (npages, P), dtype=np.uint8)
r.advise(MERGEABLE)
"""


def frames(w: Worker) -> np.ndarray:
    return np.array(w.call("touch(r); result = [int(x) for x in pfns(r)]"), np.uint64)


def test_merged_pages_of_two_workers_map_the_same_frames_and_unmerged_ones_do_not(coordinator, reaper):
    c = coordinator(sleep_millisecs=0, pages_to_scan=10000)
    a, b = Worker(setup=WORKER), Worker(setup=WORKER)
    for w in (a, b):
        w.call(FILL, npages=NPAGES)
    for w in (a, b):        # each waits for two full scans after its own advice
        w.call("client.wait_full_scans(2)")
    assert [w.call("result = r.merged_pages()") for w in (a, b)] == [NPAGES, NPAGES]
    fa, fb = frames(a), frames(b)
    if not fa.any():
        pytest.skip("/proc/self/pagemap shows no PFNs here (needs CAP_SYS_ADMIN)")
    assert (fa != 0).all() and (fb != 0).all()
    assert (fa == fb).all(), "a merged page of a and its twin in b map different frames"
    assert len(np.unique(fa)) == NPAGES, "distinct contents must map distinct frames"
    s = c.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == (NPAGES, NPAGES)

    c.set("run", 2)
    fa, fb = frames(a), frames(b)
    assert not np.intersect1d(fa[fa != 0], fb[fb != 0]).size, "a frame still mapped by both"
    for w in (a, b):
        assert not w.call("result = range_maps_duplicates(r)")
        assert w.call("result = r.merged_pages()") == 0
    for w in (a, b):
        assert w.close() == 0
