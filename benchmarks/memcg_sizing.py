#!/usr/bin/env python
"""What a coordinator costs its memory cgroup: the numbers behind docs/deploy.md
"Sizing the coordinator's memory limit".

Not a test (tests/integration/test_memcg.py checks who is charged).  Runs a
coordinator in one child memory cgroup and the workers in another, and reads
the cgroups' own counters (memory.stat ``shmem`` and ``anon``/``rss``) with the
coordinator idle, then once the workers' regions are registered and merged:

  all-same      every worker holds the same pages: they all merge
  all-unique    every worker holds pages nobody else has: nothing merges,
                the coordinator still tracks every page (unstable index)

    sudo python benchmarks/memcg_sizing.py [--workers 4] [--mib 64]

Needs root and a writable memory cgroup (v2, or v1's memory controller).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmdedup import _native  # noqa: E402
from tests.integration.isolation import (  # noqa: E402
    Coordinator,
    MemoryCgroup,
    NsWorker,
    memory_cgroup_problem,
    shared_socket_dir,
)

P = _native.PAGE_SIZE
MiB = 2**20


def settle(cg: MemoryCgroup, seconds: float = 1.0) -> dict[str, int]:
    """The cgroup's counters once they stop moving (the coordinator trims its
    heap after a full scan)."""
    last = cg.stat()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = cg.stat()
        if abs(now["shmem"] - last["shmem"]) < 16 * P and abs(cg.anon() - _anon(cg, last)) < MiB:
            return now
        last = now
    return last


def _anon(cg: MemoryCgroup, stat: dict[str, int]) -> int:
    return stat["anon" if cg.version == 2 else "rss"]


def run(case: str, workers: int, npages: int) -> dict[str, float]:
    ccg, wcg = MemoryCgroup("coordinator"), MemoryCgroup("workers")
    d = shared_socket_dir()
    path = os.path.join(d, "c.sock")
    coord = Coordinator(path, ccg.prefix)
    started: list[NsWorker] = []
    try:
        idle = settle(ccg)
        for i in range(workers):
            started.append(NsWorker(path, wcg.prefix, seed=1 if case == "all-same" else 100 + i,
                                    npages=npages))
        tracked = workers * npages
        if case == "all-same":
            coord.wait_stats(lambda s: s["pages_sharing"] == (workers - 1) * npages,
                             "every page to merge", timeout=600)
        else:
            coord.wait_stats(lambda s: s["pages_unshared"] == tracked, "every page to be indexed",
                             timeout=600)
        coord.client().wait_full_scans(2, timeout=600)
        busy = settle(ccg)
        s = coord.stats()
        wstat = wcg.stat()
        return {
            "tracked": tracked, "shared": s["pages_shared"], "sharing": s["pages_sharing"],
            "c_shmem": busy["shmem"] / MiB, "c_anon_idle": _anon(ccg, idle) / MiB,
            "c_anon": _anon(ccg, busy) / MiB,
            "anon_per_page": (_anon(ccg, busy) - _anon(ccg, idle)) / tracked,
            "w_shmem": wstat["shmem"] / MiB, "profit": s["general_profit"] / MiB,
        }
    finally:
        for w in started:
            w.close()
        coord.close()
        for cg in (ccg, wcg):
            cg.close()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mib", type=int, default=64, help="region size per worker")
    args = ap.parse_args()
    problem = memory_cgroup_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    npages = args.mib * MiB // P
    print(f"{args.workers} workers x {args.mib} MiB; coordinator's cgroup (MiB) and "
          f"its anon growth per tracked page (bytes)")
    print(f"  {'case':<11} {'tracked':>8} {'shared':>7} {'sharing':>8} {'c shmem':>8} "
          f"{'c anon idle':>11} {'c anon':>7} {'B/page':>7} {'w shmem':>8} {'profit':>7}")
    for case in ("all-same", "all-unique"):
        r = run(case, args.workers, npages)
        print(f"  {case:<11} {r['tracked']:>8} {r['shared']:>7} {r['sharing']:>8} {r['c_shmem']:>8.1f} "
              f"{r['c_anon_idle']:>11.1f} {r['c_anon']:>7.1f} {r['anon_per_page']:>7.1f} "
              f"{r['w_shmem']:>8.1f} {r['profit']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
