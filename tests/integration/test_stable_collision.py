"""A checksum that names a stable page of other bytes (amendment 16: the
coordinator no longer compares a stable-index hit before asking for the
merge).  The worker's proof under protection (invariant 1) refuses such a
merge, the page stays private with its bytes, and the domain merges on.

A real 64-bit collision cannot be found for a test, so the coordinator's
stable index is made to answer every checksum it does not hold with a slot
of other bytes; the worker, a real process, is not told anything."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from tests.helpers import wait_for
from tests.integration.conftest import counts
from tests.integration.hostile import Domain, spawn_worker


def test_a_stable_hit_of_other_bytes_is_refused_by_the_worker_and_loses_nothing() -> None:
    d = Domain()
    try:
        a, sha_a = spawn_worker(d.path, 32, 1)
        b, _ = spawn_worker(d.path, 32, 1)
        d.wait_merging(a.pid, 32)
        d.wait_merging(b.pid, 32)
        before = counts(d.stats())
        sc = d.server.scanner
        real_lookup, real_done = sc.sidx.lookup, sc.merge_done
        other = int(np.flatnonzero(sc.sidx.sharers > 0)[0])     # a stable page of a's bytes
        refused = [0]
        lock = threading.Lock()

        def lookup(hashes: np.ndarray) -> np.ndarray:
            out = real_lookup(hashes)
            out[out < 0] = other
            return out

        def merge_done(items: Any, result: bytes) -> Any:
            with lock:
                refused[0] += result.count(0)
            return real_done(items, result)

        sc.merge_done = merge_done
        sc.sidx.lookup = lookup
        try:
            c, sha_c = spawn_worker(d.path, 32, 2)
            wait_for(lambda: refused[0] >= 64, 30, "two visits' merges refused by the worker")
            assert c.call("result = region.merged_pages()") == 0
            assert c.call("result = digest()") == sha_c
            # Nothing merged meanwhile (once the index answers truly again,
            # c's pages merge with each other: each appears twice).
            assert counts(d.stats()) == before
        finally:
            sc.sidx.lookup = real_lookup
            sc.merge_done = real_done
        assert a.call("result = digest()") == sha_a
        assert c.call("result = digest()") == sha_c
        c2, _ = spawn_worker(d.path, 32, 2)       # c's twin: they still merge
        d.wait_merging(c.pid, 32)
        d.wait_merging(c2.pid, 32)
        assert c.call("result = digest()") == sha_c
        for w in (a, b, c, c2):
            w.close()
    finally:
        d.close()
