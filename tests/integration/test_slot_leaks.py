"""A stable slot is freed once nobody maps it (DESIGN invariant 6), even when
the answer to a merge arrives after its region was unregistered.

The race, made deterministic: the worker holds the region's operation lock,
so its agent blocks with a merge request in hand; the worker unregisters the
region (what ``Region.close`` does first), then lets the merge run.  The
coordinator gets "merged" for a region it no longer tracks: the slots that
merged there must be freed (before the fix they leaked: allocated, with no
sharer and nothing pending).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import shmdedup
from tests.cluster import start_worker
from tests.helpers import no_shm_leftovers, reaper, wait_for  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")

CLOSE_UNDER_MERGE = """
import random, sys, time
from shmdedup.worker import agent as _agent
from shmdedup.worker import region as _region

def agent_in_merge(ag):
    frame = sys._current_frames().get(ag._thread.ident)
    return frame is not None and frame.f_code.co_name == "merge_items"

def wait(cond, what):
    deadline = time.monotonic() + 30
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.001)

ag = _agent.get_agent()
rng = random.Random(5)
pairs = [rng.randbytes(P) for _ in range(8)]
r = Region(16 * P)
with memoryview(r) as m:
    m[:] = b"".join(p + p for p in pairs)     # pages 2k and 2k+1 alike: slots only r shares
r.op_lock.acquire()
r.advise(MERGEABLE)
wait(lambda: agent_in_merge(ag), "the agent to block with the merge request")
batches = ag.batches
_region._listener.on_close(r)   # unregister first, as close() does
r.op_lock.release()
wait(lambda: ag.batches > batches, "the agent to answer the merge")
merged = r.merged_pages()
r.close()
result = merged
"""


def test_merge_answered_after_unregister_frees_its_slots() -> None:
    tmp = tempfile.mkdtemp(prefix="shmdedup-leak-")
    path = os.path.join(tmp, "c.sock")
    coord = shmdedup.Coordinator(path, export_env=False, sleep_millisecs=0).start()
    w = start_worker(path)
    try:
        client = coord.client()
        assert w.call(CLOSE_UNDER_MERGE) == 16  # the merge ran after the unregister
        wait_for(lambda: all(x["regions"] == 0 for x in client.stats()["workers"]), 10,
                 "the region to be unregistered")
        wait_for(lambda: client.stats()["stable_pages_allocated"] == 0, 10,
                 "the slots merged into the closed region to be freed")
        assert client.stats()["pages_shared"] == 0
    finally:
        w.close()
        coord.stop()
        shutil.rmtree(tmp, ignore_errors=True)
