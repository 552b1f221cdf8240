"""``shmdedup demo``: N worker processes with mostly the same data.

An embedded coordinator and N workers (default 4); each worker fills a region
with the same data plus 10% pages of its own and 5% pages it keeps rewriting,
advises it mergeable, and checks its bytes throughout.  The demo waits for
convergence with a progress line and prints memory before and after, measured
from outside: Shmem in /proc/meminfo and the allocated blocks of the workers'
backing objects (st_blocks through /proc/<pid>/fd).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from shmdedup.pages import PAGE_SIZE

UNIQUE = 0.10
VOLATILE = 0.05


def meminfo_kib(field: str = "Shmem") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def layout(npages: int) -> tuple[int, int, int]:
    """(shared, unique, volatile) page counts of a worker's region."""
    unique = int(npages * UNIQUE)
    volatile = int(npages * VOLATILE)
    return npages - unique - volatile, unique, volatile


def fill(arr: np.ndarray, index: int, npages: int) -> None:
    """The worker's content: shared pages from one seed, unique ones from its own."""
    shared, unique, _ = layout(npages)
    pages = arr.reshape(npages, PAGE_SIZE)
    pages[:shared] = np.random.default_rng(12345).integers(0, 256, (shared, PAGE_SIZE), dtype=np.uint8)
    pages[shared:shared + unique] = np.random.default_rng(1000 + index).integers(
        0, 256, (unique, PAGE_SIZE), dtype=np.uint8)
    pages[shared + unique:] = index + 1


def _worker(index: int, npages: int, conn: Any, stop: Any) -> None:
    import shmdedup
    region = shmdedup.Region(npages * PAGE_SIZE)
    arr = region.ndarray(np.uint8)
    fill(arr, index, npages)
    shared, unique, volatile = layout(npages)
    expect = arr[:(shared + unique) * PAGE_SIZE].copy()
    region.advise(shmdedup.MERGEABLE)
    conn.send((os.getpid(), region.backing_fd))
    vol = arr.reshape(npages, PAGE_SIZE)[shared + unique:]

    def churn(pages: np.ndarray) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            pages[:, :8] = n % 251    # rewrite every volatile page, again and again
            time.sleep(0.002)

    t = threading.Thread(target=churn, args=(vol,), daemon=True)
    t.start()
    mismatches = 0
    while not stop.wait(0.05):
        mismatches += int(not np.array_equal(arr[:expect.size], expect))
    t.join()
    mismatches += int(not np.array_equal(arr[:expect.size], expect))
    conn.send(mismatches)
    del arr, vol, expect
    region.close()


def _blocks(pid: int, fd: int) -> int:
    return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512


def run_demo(workers: int = 4, mib: int = 64, as_json: bool = False, timeout: float = 120.0) -> int:
    import shmdedup
    npages = mib * 1024 * 1024 // PAGE_SIZE
    shared, unique, volatile = layout(npages)
    expect_sharing = (workers - 1) * shared
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, flush=True))
    ctx = mp.get_context("spawn")
    shmem0 = meminfo_kib()
    # Scanning starts once every worker is ready and "before" is measured:
    # otherwise the first workers' pages merge while the last ones start.
    with shmdedup.Coordinator(run=0, pages_to_scan=10000, sleep_millisecs=0) as coord:
        stop = ctx.Event()
        pipes, procs = [], []
        for i in range(workers):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(i, npages, b, stop), daemon=True)
            p.start()
            pipes.append(a)
            procs.append(p)
        try:
            backings = [a.recv() for a in pipes]
            shmem_before = meminfo_kib()
            blocks_before = sum(_blocks(pid, fd) for pid, fd in backings)
            say(f"shmdedup demo: {workers} workers x {mib} MiB "
                f"({shared} shared, {unique} unique, {volatile} volatile pages each)")
            t0 = time.monotonic()
            coord.set("run", 1)
            stats = coord.stats()
            while stats["pages_sharing"] < expect_sharing:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"no convergence within {timeout} s: {stats['pages_sharing']} "
                                       f"of {expect_sharing} pages sharing")
                if not as_json:
                    pct = 100 * stats["pages_sharing"] / max(expect_sharing, 1)
                    print(f"\r  merging: {stats['pages_sharing']:>8} / {expect_sharing} pages sharing "
                          f"({pct:5.1f}%), full_scans {stats['full_scans']}", end="", flush=True)
                # A full scan, and the merges it asked for: progress that has landed.
                coord.wait_full_scans(1, timeout=timeout)
                stats = coord.stats()
            took = time.monotonic() - t0
            coord.wait_full_scans(2, timeout=timeout)
            stats = coord.stats()
            shmem_after = meminfo_kib()
            blocks_after = sum(_blocks(pid, fd) for pid, fd in backings)
            stable = stats["stable_pages_allocated"] * PAGE_SIZE
        finally:
            stop.set()
            mismatches = [a.recv() if p.is_alive() else -1 for a, p in zip(pipes, procs)]
            for p in procs:
                p.join(30)
    mib_ = 1024 * 1024
    result = {
        "workers": workers, "mib_per_worker": mib, "seconds_to_converge": round(took, 3),
        "pages_shared": stats["pages_shared"], "pages_sharing": stats["pages_sharing"],
        "pages_unshared": stats["pages_unshared"], "pages_volatile": stats["pages_volatile"],
        "full_scans": stats["full_scans"],
        "shmem_before_mib": round((shmem_before - shmem0) / 1024, 1),
        "shmem_after_mib": round((shmem_after - shmem0) / 1024, 1),
        "backing_before_mib": round(blocks_before / mib_, 1),
        "backing_after_mib": round(blocks_after / mib_, 1),
        "stable_mib": round(stable / mib_, 1),
        "saved_mib": round((shmem_before - shmem_after) / 1024, 1),
        "byte_mismatches": sum(m for m in mismatches if m > 0),
    }
    if as_json:
        print(json.dumps(result))
    else:
        print()
        print(f"  converged in {result['seconds_to_converge']} s: pages_shared {result['pages_shared']}, "
              f"pages_sharing {result['pages_sharing']} (expected {expect_sharing}), "
              f"pages_unshared {result['pages_unshared']}, pages_volatile {result['pages_volatile']}")
        print(f"  Shmem (/proc/meminfo, demo's share): {result['shmem_before_mib']} MiB before -> "
              f"{result['shmem_after_mib']} MiB after")
        print(f"  workers' backing objects (st_blocks): {result['backing_before_mib']} MiB -> "
              f"{result['backing_after_mib']} MiB, plus {result['stable_mib']} MiB of stable pages")
        print(f"  memory saved: {result['saved_mib']} MiB; every worker read its exact bytes: "
              f"{'yes' if result['byte_mismatches'] == 0 and -1 not in mismatches else 'NO'}")
    ok = result["byte_mismatches"] == 0 and -1 not in mismatches
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo())
