"""A worker the coordinator gives up on while it is alive: stopped (SIGSTOP)
past the request timeout, with requests queued on its socket.

The stable slots a worker maps must stay allocated for as long as it may map
them: a slot freed (punched) under a live mapping reads as zeros, and once
reused as somebody else's page.  The dropped worker keeps its slots until its
process exits; resumed, it runs the stale requests still queued on its
socket, reads its exact bytes and registers again.  Every worker compares its
region with what it wrote, continuously (the page-worker harness of
conftest.py).  The other ways a connection ends while the process lives (an
orderly coordinator stop, a worker closing its connection) are in
tests/integration/test_restart.py.
"""

from __future__ import annotations

import os
import signal

import shmdedup.coordinator.inflight
from tests.helpers import wait_for
from tests.integration.conftest import (
    FAST,
    counts,
    merged_counts,
    wait_stats,
    worker_stats,
)


def test_worker_dropped_while_alive_keeps_its_slots_until_it_exits(coordinator, spawn_workers,
                                                                     monkeypatch) -> None:
    """Worker a is stopped; the coordinator asks it to unmerge, gets no reply
    and drops it.  Its slots stay allocated (b shares them, and a, resumed,
    reads its exact bytes and registers again); once a is killed they are
    freed and b's pages, unshared, are given back to it."""
    monkeypatch.setattr(shmdedup.coordinator.inflight, "REQUEST_TIMEOUT", 2.0)
    npages = 512
    c = coordinator(**FAST)                    # thread mode: the patched timeout applies
    a, b = spawn_workers(2, npages, shared_seed=41)
    want = merged_counts(npages, 2)
    wait_stats(c, lambda s: counts(s) == want, 60, f"convergence to {want}")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b.write(list(range(100)), 1)        # a's copies lose their co-sharer: unmerge requests to a
        s = wait_stats(c, lambda s: a.pid not in worker_stats(s), 30, "the stopped worker to be dropped")
        assert s["stable_pages_allocated"] == npages     # nothing freed under a
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a.assert_intact()
    wait_stats(c, lambda s: a.pid in worker_stats(s), 30, "the resumed worker to register again")
    a.assert_intact()
    b.assert_intact()
    a.kill()
    # a's slots are released once it has exited: b's pages, alone on them, are
    # given back to b and every slot is freed.
    wait_stats(c, lambda s: s["stable_pages_allocated"] == 0 and counts(s) == merged_counts(0, 2), 60,
               "every slot to be freed after the dropped worker exited")
    wait_for(lambda: b.status()["merged"] == 0, 30, "b's pages to be private again")
    assert b.blocks() == npages
    b.assert_intact()
