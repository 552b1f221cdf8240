"""``shmdedup demo``: N worker processes with mostly the same data, merged two ways.

Each way runs an embedded coordinator and N workers (default 4) that start
building their data at the same moment: the same pages in every worker, 10%
pages of its own and 5% pages it keeps rewriting; every worker checks its
bytes throughout.

- **scanning**: a worker writes its whole region, then advises it mergeable;
  the coordinator's scan merges the copies afterwards, as KSM does;
- **at write time**: a worker computes its data block by block with
  ``shmdedup.fill``, and each block is merged as soon as it is written; the
  pages it keeps rewriting live in a second region that is only advised
  (scanning stays for data that keeps changing).

For each way the demo prints the peak while the workers build their data and
the end state, side by side, measured from outside every 10 ms: the allocated
blocks of the shm objects (st_blocks through /proc/<pid>/fd: the workers'
regions and the coordinator's stable pages, exactly) and Shmem in
/proc/meminfo (system-wide, less its value before: other processes move it).
"""

from __future__ import annotations

import hashlib
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
BLOCK = 256  # pages computed at a time (1 MiB): the unit of content and of checking
WAYS = ("scan", "write_time")


def meminfo_kib(field: str = "Shmem") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def layout(npages: int) -> tuple[int, int, int]:
    """(shared, unique, volatile) page counts of a worker's data."""
    unique = int(npages * UNIQUE)
    volatile = int(npages * VOLATILE)
    return npages - unique - volatile, unique, volatile


def content(index: int, first: int, n: int, npages: int) -> np.ndarray:
    """Pages [first, first + n) of worker index's final data (shared, then
    unique pages), as (n, PAGE_SIZE) bytes: each BLOCK of pages from its own seed,
    the shared ones the same in every worker."""
    shared, _, _ = layout(npages)
    out = np.empty((n, PAGE_SIZE), np.uint8)
    page = first
    while page < first + n:
        b = page // BLOCK
        own = page >= shared
        lo, hi = (shared, npages) if own else (0, shared)
        start = max(lo, b * BLOCK)
        end = min(hi, (b + 1) * BLOCK)
        seed = (1000 + index, b) if own else (12345, b)
        block = np.random.default_rng(seed).integers(0, 256, (end - start, PAGE_SIZE), dtype=np.uint8)
        take = min(end, first + n) - page
        out[page - first:page - first + take] = block[page - start:page - start + take]
        page += take
    return out


def mark(vol: np.ndarray, index: int) -> None:
    """The pages a worker keeps rewriting: each unlike any other page anywhere
    (worker and page number in it), so that a pause in the rewriting never
    lets them merge."""
    vol[...] = index + 1
    vol[:, 8:16] = np.arange(len(vol), dtype="<u8").view(np.uint8).reshape(-1, 8)
    vol[:, 16] = index


def _worker(index: int, npages: int, way: str, conn: Any, go: Any, stop: Any) -> None:
    import shmdedup
    shared, unique, volatile = layout(npages)
    final = shared + unique
    digests: list[bytes] = []

    def build(rows: np.ndarray, start: int) -> None:
        rows[...] = content(index, start, len(rows), npages)
        digests.append(hashlib.blake2b(rows.data).digest())

    conn.send(os.getpid())
    go.wait()
    if way == "scan":
        region = shmdedup.Region(npages * PAGE_SIZE)
        pages = region.ndarray(np.uint8, (npages, PAGE_SIZE))
        for start in range(0, final, BLOCK):
            build(pages[start:min(start + BLOCK, final)], start)
        vol = pages[final:]
        mark(vol, index)
        region.advise(shmdedup.MERGEABLE)
        regions = [region]
    else:
        pages = shmdedup.fill((final, PAGE_SIZE), np.uint8, build, rows=BLOCK, chunk_bytes=BLOCK * PAGE_SIZE)
        scratch = shmdedup.Region(max(volatile, 1) * PAGE_SIZE)
        vol = scratch.ndarray(np.uint8, (max(volatile, 1), PAGE_SIZE))[:volatile]
        mark(vol, index)
        scratch.advise(shmdedup.MERGEABLE)
        built = shmdedup.region_of(pages)
        assert built is not None
        regions = [built, scratch]
    conn.send("built")

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            vol[:, :8] = n % 251    # rewrite every volatile page, again and again
            time.sleep(0.002)

    def intact() -> bool:
        return all(hashlib.blake2b(pages[s:min(s + BLOCK, final)].data).digest() == d
                   for s, d in zip(range(0, final, BLOCK), digests))

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    mismatches = 0
    while not stop.wait(0.05):
        mismatches += int(not intact())
    t.join()
    mismatches += int(not intact())
    conn.send(mismatches)
    del pages, vol
    for r in regions:
        r.close()


def shm_bytes(pids: list[int], kinds: tuple[str, ...] = ("region", "stable")) -> int:
    """Memory the shmdedup objects of these kinds held by these processes take
    (st_blocks of each object once, found through /proc/<pid>/fd): the
    workers' regions and the coordinator's stable pages, exactly, where Shmem
    counts every process of the machine."""
    seen, total = set(), 0
    marks = tuple(f"shmdedup-{k}-" for k in kinds)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if not any(m in os.readlink(f"/proc/{pid}/fd/{fd}") for m in marks):
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _last_word(conn: Any) -> int:
    """A worker's mismatch count, or -1 if it died without sending one."""
    try:
        if conn.poll(30):
            return int(conn.recv())
    except (EOFError, OSError):
        pass
    return -1


class _Sampler:
    """Peaks of Shmem (above a baseline), of the workers' region objects and of
those with the (embedded) coordinator's stable pages, every 10 ms."""

    def __init__(self, shmem0: int, pids: list[int]) -> None:
        self.shmem0 = shmem0
        self.pids = pids
        self.peak_shmem_kib = self.peak_objects = self.peak_all = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        self.peak_shmem_kib = max(self.peak_shmem_kib, meminfo_kib() - self.shmem0)
        self.peak_objects = max(self.peak_objects, shm_bytes(self.pids, ("region",)))
        self.peak_all = max(self.peak_all, shm_bytes(self.pids + [os.getpid()]))

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run_way(way: str, workers: int, npages: int, timeout: float,
            progress: Any = None) -> dict[str, Any]:
    """One way, start to end: the peak while building, the end state."""
    import shmdedup
    shared, unique, volatile = layout(npages)
    expect_sharing = (workers - 1) * shared
    ctx = mp.get_context("spawn")
    mib = 1024 * 1024
    sampler: _Sampler | None = None
    with shmdedup.Coordinator(pages_to_scan=10000, sleep_millisecs=0) as coord:
        go, stop = ctx.Event(), ctx.Event()
        pipes, procs = [], []
        for i in range(workers):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(i, npages, way, b, go, stop), daemon=True)
            p.start()
            pipes.append(a)
            procs.append(p)
        try:
            pids = [a.recv() for a in pipes]   # every worker started (imports done)
            sampler = _Sampler(meminfo_kib(), pids)
            t0 = time.monotonic()
            go.set()
            for a in pipes:
                a.recv()
            built = time.monotonic() - t0
            stats = coord.stats()
            while stats["pages_sharing"] < expect_sharing:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{way}: no convergence within {timeout} s: {stats['pages_sharing']} "
                                       f"of {expect_sharing} pages sharing")
                if progress:
                    progress(f"{way}: {stats['pages_sharing']:>8} / {expect_sharing} pages sharing, "
                             f"full_scans {stats['full_scans']}")
                # A full scan, and the merges it asked for: progress that has landed.
                coord.wait_full_scans(1, timeout=timeout)
                stats = coord.stats()
            took = time.monotonic() - t0
            coord.wait_full_scans(2, timeout=timeout)
            stats = coord.stats()
            shmem_end = meminfo_kib() - sampler.shmem0
            objects_end = shm_bytes(pids, ("region",))
            all_end = shm_bytes(pids + [os.getpid()])
        finally:
            if sampler is not None:
                sampler.stop()  # the peak is over the whole run, its end state included
            stop.set()
            mismatches = [_last_word(a) for a in pipes]
            for p in procs:
                p.join(30)
    assert sampler is not None
    return {
        "seconds_to_build": round(built, 3), "seconds_to_merge": round(took, 3),
        "peak_shmem_mib": round(sampler.peak_shmem_kib / 1024, 1),
        "peak_shm_objects_mib": round(sampler.peak_all / mib, 1),
        "end_shm_objects_mib": round(all_end / mib, 1),
        "peak_objects_mib": round(sampler.peak_objects / mib, 1),
        "end_shmem_mib": round(shmem_end / 1024, 1),
        "end_objects_mib": round(objects_end / mib, 1),
        "stable_mib": round(stats["stable_pages_allocated"] * PAGE_SIZE / mib, 1),
        "pages_shared": stats["pages_shared"], "pages_sharing": stats["pages_sharing"],
        "pages_unshared": stats["pages_unshared"], "pages_volatile": stats["pages_volatile"],
        "full_scans": stats["full_scans"], "pages_merged_inline": stats.get("pages_merged_inline", 0),
        "byte_mismatches": sum(m for m in mismatches if m > 0),
        "all_workers_checked": -1 not in mismatches,
    }


def run_demo(workers: int = 4, mib: int = 64, as_json: bool = False, timeout: float = 120.0) -> int:
    npages = mib * 1024 * 1024 // PAGE_SIZE
    shared, unique, volatile = layout(npages)
    def say(line: str) -> None:
        if not as_json:
            print(line, flush=True)

    say(f"shmdedup demo: {workers} workers x {mib} MiB each: {shared} pages the same in every worker, "
        f"{unique} of its own, {volatile} it keeps rewriting; two ways to merge them")
    progress = None if as_json or not sys.stdout.isatty() else (
        lambda line: print(f"\r  {line:<70}", end="", flush=True))
    result: dict[str, Any] = {"workers": workers, "mib_per_worker": mib, "pages_per_worker": npages}
    for way in WAYS:
        result[way] = run_way(way, workers, npages, timeout, progress)
    ok = all(result[w]["byte_mismatches"] == 0 and result[w]["all_workers_checked"] for w in WAYS)
    if as_json:
        print(json.dumps(result))
        return 0 if ok else 1
    s, w = result["scan"], result["write_time"]
    rows = [
        ("peak while building: shm objects", "peak_shm_objects_mib", " MiB"),
        ("  of which the workers' own", "peak_objects_mib", " MiB"),
        ("  Shmem rise (system-wide)", "peak_shmem_mib", " MiB"),
        ("seconds until every copy merged", "seconds_to_merge", " s"),
        ("at the end: shm objects", "end_shm_objects_mib", " MiB"),
        ("  of which the workers' own", "end_objects_mib", " MiB"),
        ("  stable pages", "stable_mib", " MiB"),
        ("  Shmem rise (system-wide)", "end_shmem_mib", " MiB"),
        ("  pages_shared", "pages_shared", ""),
        ("  pages_sharing", "pages_sharing", ""),
        ("  merged at write time (pages)", "pages_merged_inline", ""),
    ]
    if progress:
        print("\r" + " " * 78, end="\r")
    print(f"  {'':36}{'scanning':>14}{'at write time':>16}")
    for label, key, unit in rows:
        print(f"  {label:36}{str(s[key]) + unit:>14}{str(w[key]) + unit:>16}")
    print(f"  every worker read its exact bytes throughout: {'yes' if ok else 'NO'}")
    print("  Scanning merges copies that already exist: every worker holds its whole copy first. Merging "
          "at write time\n  declares each block final as it is written: the copies never exist. Pages "
          "made stable at write time that\n  nobody else shares are kept inline_keep_millisecs (in case "
          "another process loads them), then given back.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo())


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
