"""stable_node_chains and stable_node_dups as Linux counts them.

Past ``max_page_sharing`` sharers a content gets another stable page; the
stable pages of one content form a chain, and Linux's ``stable_node_dups``
counts every one of them (mm/ksm.c: each dup of a chain is a stable_node,
counted when it joins the chain).  Ten equal pages with max_page_sharing=4
make 3 stable pages (4 + 4 + 2 sharers): 1 chain, 3 dups.
"""

from __future__ import annotations

import pytest

from tests.helpers import Worker
from tests.integration.conftest import FAST, wait_stats

EQUAL_PAGES = r"""
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P
r = shmdedup.Region(sum(counts) * P)
a = r.ndarray(np.uint8, (sum(counts), P))
i = 0
for k, n in enumerate(counts):      # n equal pages of content k
    a[i:i + n] = k + 1
    i += n
r.advise(shmdedup.MERGEABLE)
"""


@pytest.mark.parametrize("counts, mps, want", [
    # (pages of each content, max_page_sharing, (shared, sharing, chains, dups))
    ([10], 4, (3, 7, 1, 3)),
    ([10, 8, 3], 4, (3 + 2 + 1, 7 + 6 + 2, 2, 5)),
    ([8], 256, (1, 7, 0, 0)),
    ([12], 2, (6, 6, 1, 6)),
])
def test_stable_node_dups_counts_every_stable_page_of_a_chain(coordinator, counts, mps, want):
    c = coordinator(max_page_sharing=mps, **FAST)
    w = Worker()
    w.call(EQUAL_PAGES, counts=counts)
    keys = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
    s = wait_stats(c, lambda s: tuple(s[k] for k in keys) == want, 60,
                   f"{dict(zip(keys, want))}")
    c.wait_full_scans(2, timeout=60)          # and it stays so
    s = c.stats()
    assert tuple(s[k] for k in keys) == want
    assert s["stable_pages_allocated"] == want[0]
    assert w.call("result = r.merged_pages()") == sum(counts)
    assert w.close() == 0
