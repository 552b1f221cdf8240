"""advise(UNMERGEABLE) of the last advised range: the coordinator reconciles
before it goes idle.

With nothing advised any more there is nothing to scan, but the pages just
broken still hold references to stable pages: the coordinator walks its
records (visiting no page) until the stable pages nobody shares are freed and
the counters say so, then goes quiet.  Checked from outside: the blocks of the
coordinator process's stable object (fstat through /proc/<pid>/fd) and of the
worker's backing object, plus the counters.
"""

from __future__ import annotations

import os

import pytest

from shmdedup.errors import ControlError
from tests.helpers import Worker, wait_for
from tests.integration.conftest import FAST, PAGE, counts, wait_stats

TWO_COPIES = r"""
import os
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P
half = np.random.default_rng(seed).integers(0, 256, (M, P), dtype=np.uint8)
r = shmdedup.Region(2 * M * P)
a = r.ndarray(np.uint8, (2, M, P))
a[:] = half
r.advise(shmdedup.MERGEABLE)
result = (os.getpid(), r.backing_fd)
"""


def stable_object_blocks(coord_pid: int) -> int:
    """Pages the coordinator's stable object holds (st_blocks), from outside."""
    fd_dir = f"/proc/{coord_pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if "shmdedup-stable" in os.readlink(f"{fd_dir}/{fd}"):
                return os.stat(f"{fd_dir}/{fd}").st_blocks * 512 // PAGE
        except OSError:
            continue
    raise AssertionError(f"no stable object among the fds of {coord_pid}")


def test_unadvising_the_last_range_frees_stable_pages_and_updates_counters(coordinator):
    M = 1024
    c = coordinator(process=True, **FAST)
    w = Worker()
    pid, backing = w.call(TWO_COPIES, M=M, seed=301)
    wait_stats(c, lambda s: counts(s) == {"pages_shared": M, "pages_sharing": M}, 60, "merging")
    assert w.call("result = r.merged_pages()") == 2 * M
    assert stable_object_blocks(c.pid) == M
    assert os.stat(f"/proc/{pid}/fd/{backing}").st_blocks == 0

    w.call("r.advise(shmdedup.UNMERGEABLE)")
    assert w.call("result = r.merged_pages()") == 0
    assert os.stat(f"/proc/{pid}/fd/{backing}").st_blocks * 512 // PAGE == 2 * M
    # Nothing is advised now, yet the copies go and the counters follow.
    wait_for(lambda: stable_object_blocks(c.pid) == 0, 30,
             "the stable object to give its pages back")
    s = wait_stats(c, lambda s: counts(s) == {"pages_shared": 0, "pages_sharing": 0}
                   and s["stable_pages_allocated"] == 0, 30, "the counters to follow")
    assert s["workers"][0]["ksm_merging_pages"] == 0
    assert w.call("result = bool((a == half).all())")
    # Then quiet: no full scan comes while nothing is advised (this wait is
    # meant to time out).
    with pytest.raises(ControlError, match="timed out"):
        c.wait_full_scans(1, timeout=1)
    assert w.close() == 0


def test_two_sharers_unadvised_while_stopped_are_reconciled_when_run_resumes(coordinator):
    """a and b share M pages and both drop their advice while run=0: at
    run=1 nothing is advised, and every slot still goes."""
    M = 512
    c = coordinator(process=True, **FAST)
    a, b = Worker(), Worker()
    for w in (a, b):
        w.call(TWO_COPIES.replace("2 * M", "M").replace("(2, M, P)", "(1, M, P)"), M=M, seed=302)
    wait_stats(c, lambda s: counts(s) == {"pages_shared": M, "pages_sharing": M}, 60, "merging")
    c.set("run", 0)
    b.call("r.advise(shmdedup.UNMERGEABLE)")
    a.call("r.advise(shmdedup.UNMERGEABLE)")
    assert stable_object_blocks(c.pid) == M
    c.set("run", 1)
    wait_for(lambda: stable_object_blocks(c.pid) == 0, 30, "every stable page to be freed")
    wait_stats(c, lambda s: counts(s) == {"pages_shared": 0, "pages_sharing": 0}
               and s["stable_pages_allocated"] == 0, 30, "the counters to follow")
    for w in (a, b):
        assert w.call("result = r.merged_pages()") == 0
        assert w.call("result = bool((a == half).all())")
        assert w.close() == 0
