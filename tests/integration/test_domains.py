"""Domains and side channels (docs/security.md): pages merge only within one
coordinator's domain; inside a domain every worker can read every merged page;
``merge_zero_pages_only`` merges nothing but zero pages, with no stable slot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import Worker, no_shm_leftovers, reaper, wait_for  # noqa: F401
from tests.integration.hostile import PAGE, Domain

NPAGES = 32

UNIQUE_WORKER = """
import os
import numpy as np
import shmdedup
from shmdedup.worker import agent
agent.set_socket(SOCKET)
P = shmdedup.worker.region.PAGE_SIZE
region = shmdedup.Region(NPAGES * P)
arr = region.ndarray(np.uint8)
arr[:] = np.random.default_rng(SEED).integers(0, 256, NPAGES * P, dtype=np.uint8)
region.advise(shmdedup.MERGEABLE)
"""


def unique_worker(path: str, seed: int) -> Worker:
    """A worker whose pages are all different from each other (seeded)."""
    w = Worker()
    w.run(UNIQUE_WORKER, SOCKET=path, NPAGES=NPAGES, SEED=seed)
    return w


def allocated(w: Worker) -> int:
    """st_blocks of the worker's backing object, seen from outside."""
    fd = w.call("result = region.backing_fd")
    return os.stat(f"/proc/{w.pid}/fd/{fd}").st_blocks * 512


@pytest.fixture
def two_domains(no_shm_leftovers: None) -> Iterator[tuple[Domain, Domain]]:
    a, b = Domain(), Domain()
    yield a, b
    a.close()
    b.close()


def test_no_merging_across_domains(two_domains: tuple[Domain, Domain]) -> None:
    a, b = two_domains
    x, y = unique_worker(a.path, 5), unique_worker(b.path, 5)  # identical content
    wait_for(lambda: a.worker_stats(x.pid) and b.worker_stats(y.pid), what="both registered")
    a.wait_full_scans(3)
    b.wait_full_scans(3)
    for d, w in ((a, x), (b, y)):
        st = d.stats()
        assert st["pages_sharing"] == 0 and st["pages_shared"] == 0, st
        assert w.call("result = region.merged_pages()") == 0
        assert allocated(w) == NPAGES * PAGE
    # the same content does merge inside a domain: a third worker joins a
    z = unique_worker(a.path, 5)
    a.wait_merging(z.pid, NPAGES)
    a.wait_merging(x.pid, NPAGES)
    assert wait_for(lambda: allocated(x) == 0 or allocated(z) == 0, 30, what="punched copies")
    assert y.call("result = region.merged_pages()") == 0 and allocated(y) == NPAGES * PAGE
    assert b.stats()["pages_sharing"] == 0


def test_a_domain_is_one_confidentiality_unit(no_shm_leftovers: None) -> None:
    """Every worker holds a read-only descriptor of the whole stable segment, so
    any worker of a domain can read every merged page of the others (this is
    why workers that must not see each other's data belong in different domains)."""
    d = Domain()
    try:
        owner = unique_worker(d.path, 5)
        twin = unique_worker(d.path, 5)
        d.wait_merging(owner.pid, NPAGES)
        secret = owner.call("result = bytes(arr[:P])")
        spy = unique_worker(d.path, 6)  # different content, nothing of its own merged
        wait_for(lambda: spy.call("result = agent.get_agent().view is not None"), 30,
                 what="the spy's welcome")
        seen = spy.call("""
            links = {}
            for f in os.listdir('/proc/self/fd'):
                try:
                    links[int(f)] = os.readlink('/proc/self/fd/' + f)
                except OSError:
                    pass  # listdir's own fd, closed already
            fd = next(f for f, link in links.items() if 'shmdedup-stable' in link)
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
            result = [data[i:i + P] for i in range(0, size, P)]
        """)
        assert secret in seen
        assert twin.call("result = region.merged_pages()") == NPAGES
    finally:
        d.close()


def test_merge_zero_pages_only(no_shm_leftovers: None) -> None:
    d = Domain(merge_zero_pages_only=1)
    try:
        w = Worker()
        w.run(UNIQUE_WORKER, SOCKET=d.path, NPAGES=NPAGES, SEED=1)
        # first half: written zeros (allocated); second half: one page repeated.
        # Written unadvised: a page seen for the first time may merge at once.
        w.call("""
            region.advise(shmdedup.UNMERGEABLE)
            pages = arr.reshape(NPAGES, P)
            pages[:NPAGES // 2] = 0
            pages[NPAGES // 2:] = 7
        """)
        assert allocated(w) == NPAGES * PAGE
        w.call("region.advise(shmdedup.MERGEABLE)")
        d.wait_merging(w.pid, NPAGES // 2)
        d.wait_full_scans(3)
        st = d.stats()
        assert st["ksm_zero_pages"] == NPAGES // 2
        assert st["pages_shared"] == st["pages_sharing"] == st["stable_pages_allocated"] == 0
        assert w.call("result = region.merged_pages()") == NPAGES // 2
        assert allocated(w) == NPAGES // 2 * PAGE  # the zero pages' copies were punched
        assert w.call("result = int(arr[:NPAGES // 2 * P].any()), int((arr[NPAGES // 2 * P:] == 7).all())") \
            == (0, 1)
        # switched off: the duplicates merge into a stable page
        d.client().set("merge_zero_pages_only", 0)
        d.wait_merging(w.pid, NPAGES)
        assert d.stats()["pages_shared"] == 1
        w.close()
    finally:
        d.close()
