"""Concurrency stress: writers in every thread of every worker while the
coordinator merges and breaks without a pause.

Three worker processes, three threads each.  Every thread owns a disjoint set
of pages of its worker's region and keeps a shadow copy of them.  It writes to
random pages of a small window of its set that moves every 128 writes (the
other pages rest and merge again), half the time to pages of the window it
has just seen merged (each such write is a copy-on-write break racing the
coordinator), and most writes restore a page to the content it has in every
worker, so that pages keep merging again.  Some writes go through an explicit break (prepare_write, then a
plain store) and a few through advise(UNMERGEABLE) and back.  After every write
the thread compares the page with its shadow, every 2,000 writes all of its
pages, and once more at the end.  The coordinator (a thread of the test
process, pages_to_scan large, sleep 0) merges, reconciles breaks and unmerges
lonely pages all the while.

Asserted: zero corrupted bytes over at least 10^6 verified writes, over ten
thousand copy-on-write breaks (~40,000 on an idle 2-core machine), and, once every page holds its common
content again, every page merged in every worker with exact statistics (the
slot accounting survived).  Sized for 2 cores: well under 2 minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(_ROOT))

import shmdedup
from tests.helpers import Worker, no_shm_leftovers, reaper, wait_for  # noqa: F401  (fixtures)

WORKERS = 3
THREADS = 3
PAGES_PER_THREAD = 256
WRITES_PER_THREAD = 112_000          # 3 x 3 x 112,000 > 10^6

STRESS = r"""
import os, random, threading, time
import numpy as np
from shmdedup import MERGEABLE, UNMERGEABLE, PAGE_SIZE as P, Region, _native

K, T = PAGES_PER_THREAD, THREADS
N = K * T
WINDOW, WINDOW_WRITES, PAUSE = 16, 128, 0.01
# Page p holds the same bytes in every worker: pages merge across workers.
base = np.random.default_rng(2024).integers(0, 256, (N, P), dtype=np.uint8)
r = Region(N * P)
pg = r.ndarray(np.uint8, (N, P))
pg[:] = base
r.advise(MERGEABLE)

def writer(t, n, seed, out):
    rng = random.Random(seed)
    lo, hi = t * K, (t + 1) * K
    shadow = base[lo:hi].copy()
    mine = pg[lo:hi]
    writes = corrupted = on_merged = explicit = advised = checks = 0
    merged = []
    for i in range(n):
        if i % WINDOW_WRITES == 0:
            # A new window of pages to write; the others rest, and merge again.
            # A pause first, as a program would take: the agent thread needs
            # the GIL to merge (the pace, not a synchronisation).
            time.sleep(PAUSE)
            w0 = rng.randrange(lo, hi - WINDOW + 1)
            st = np.frombuffer(r.states(), np.uint8)[w0:w0 + WINDOW]
            merged = (np.flatnonzero(st == _native.MERGED) + w0).tolist()
        if merged and rng.random() < 0.5:
            p = merged.pop(rng.randrange(len(merged)))
            on_merged += 1
        else:
            p = rng.randrange(w0, w0 + WINDOW)
        q = p - lo
        x = rng.random()
        if x < 0.75:                         # back to the common content: merges again
            mine[q] = base[p]
            shadow[q] = base[p]
        elif x < 0.97:                       # a few random bytes: unique for a while
            off = rng.randrange(P - 16)
            b = np.frombuffer(rng.randbytes(rng.randrange(1, 17)), np.uint8)
            mine[q, off:off + len(b)] = b
            shadow[q, off:off + len(b)] = b
        elif x < 0.999:                      # an explicit break, then a plain store
            r.prepare_write(p * P, P)
            v = rng.randrange(256)
            mine[q, 7] = v
            shadow[q, 7] = v
            explicit += 1
        else:                                # unmerge advice and back, on one page
            r.advise(UNMERGEABLE, p * P, P)
            v = rng.randrange(256)
            mine[q, 9] = v
            shadow[q, 9] = v
            r.advise(MERGEABLE, p * P, P)
            advised += 1
        writes += 1
        if not np.array_equal(mine[q], shadow[q]):
            corrupted += int(np.count_nonzero(mine[q] != shadow[q]))
            mine[q] = shadow[q]
        if i % 2000 == 1999:
            corrupted += int(np.count_nonzero(mine != shadow))
            checks += 1
    corrupted += int(np.count_nonzero(mine != shadow))
    checks += 1
    mine[:] = base[lo:hi]                    # leave every page mergeable
    out[t] = dict(writes=writes, corrupted=corrupted, on_merged=on_merged,
                  explicit=explicit, advised=advised, full_checks=checks)

def run(n, seed):
    out = [None] * T
    threads = [threading.Thread(target=writer, args=(t, n, seed * 100 + t, out)) for t in range(T)]
    for th in threads: th.start()
    for th in threads: th.join()
    total = {k: sum(o[k] for o in out) for k in out[0]}
    total["breaks"] = r.breaks
    total["intact"] = bool(np.array_equal(pg, base))
    return total

def merged_pages():
    return r.merged_pages()
"""


@pytest.mark.stress
@pytest.mark.usefixtures("no_shm_leftovers")
def test_writers_in_every_thread_while_the_coordinator_merges_and_breaks() -> None:
    setup = (f"PAGES_PER_THREAD = {PAGES_PER_THREAD}\nTHREADS = {THREADS}\n" + STRESS)
    npages = PAGES_PER_THREAD * THREADS
    with shmdedup.Coordinator(pages_to_scan=100_000, sleep_millisecs=0) as c:
        workers = [Worker(setup=setup) for _ in range(WORKERS)]
        wait_for(lambda: all(w.call("result = merged_pages()") == npages for w in workers), 60,
                 "every page to merge before the writers start")
        scans = c.stats()["full_scans"]
        for i, w in enumerate(workers):           # all start, then all are collected
            w.conn.send(("result = run(n, seed)", {"n": WRITES_PER_THREAD, "seed": i + 1}, 0))
        results = []
        for w in workers:
            assert w.conn.poll(110), f"worker {w.pid} did not finish within 110 s"
            status, value, _ = w.conn.recv()
            assert status == "ok", value
            results.append(value)
        stats = c.stats()
        print("\n", results, "full scans during the run:", stats["full_scans"] - scans)
        assert sum(r["writes"] for r in results) >= 10**6
        assert sum(r["corrupted"] for r in results) == 0, results
        assert all(r["intact"] for r in results)
        # The coordinator really merged and the writers really broke, all along.
        assert stats["full_scans"] - scans >= 20
        assert sum(r["breaks"] for r in results) >= 10_000, results
        assert sum(r["on_merged"] for r in results) >= 10_000, results
        assert all(r["explicit"] > 0 and r["advised"] > 0 for r in results), results
        # Every page back to its common content: all merge, and the counts are exact.
        wait_for(lambda: all(w.call("result = merged_pages()") == npages for w in workers), 60,
                 "every page to merge again after the run")
        pids = {w.pid for w in workers}

        def exact() -> dict | None:
            s = c.stats()
            mine = [x for x in s["workers"] if x["pid"] in pids]
            ok = (len(mine) == WORKERS and all(x["ksm_merging_pages"] == npages and x["requests"] == 0
                                              for x in mine)
                  and s["pages_shared"] == npages and s["pages_sharing"] == (WORKERS - 1) * npages
                  and s["stable_pages_allocated"] == npages)
            return s if ok else None
        wait_for(exact, 60, "exact statistics after the run")
        for w in workers:
            assert w.close() == 0
