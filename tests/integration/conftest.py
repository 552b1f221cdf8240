"""Fixtures for the integration tests: real coordinators and real worker processes.

A *page worker* is a spawned Python process (``tests.helpers.Worker``) running
:data:`HARNESS`: it allocates one Region, fills it with a known layout of
shared pages (same bytes in every worker built from the same ``shared_seed``),
unique pages (random per worker) and volatile pages (rewritten by a thread in
a loop), advises it mergeable, and keeps an expected copy.  A verifier thread
compares the region with the copy, chunk by chunk, over and over, so every
test also checks that every worker reads its exact bytes while merging runs.

From outside, the tests look at the workers' backing objects
(``/proc/<pid>/fd/<backing_fd>`` st_blocks), their smaps_rollup, and
/proc/meminfo, and at the coordinator's statistics.  Nothing sleeps to
synchronise: waits are on ``full_scans`` advancing or on a condition with a
timeout.

Every test gets a leak check (autouse): no name containing ``shmdedup`` may
stay in /dev/shm, and no fd may stay open in the test process.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(_ROOT))

import shmdedup
from shmdedup.errors import ControlError
from tests.helpers import (  # noqa: F401  (fixtures re-exported for the test modules)
    Worker,
    meminfo_kb,
    no_shm_leftovers,
    reaper,
    smaps_rollup_kb,
    wait_for,
)

PAGE = shmdedup.PAGE_SIZE

# The first spawn of a process starts multiprocessing's resource tracker, whose
# pipe then stays open for good: start it now, or the fd leak check of
# whichever test spawns first reports it.
resource_tracker.ensure_running()

# Statistics every coordinator reports (KSM's names), and its controls.
STAT_NAMES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
              "pages_scanned", "full_scans", "ksm_zero_pages", "general_profit",
              "rmap_items", "stable_pages_allocated", "last_error", "pages_skipped_budget")
CONTROL_NAMES = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing",
                 "max_kernel_pages", "use_zero_pages", "max_mappings")
WORKER_STAT_NAMES = ("pid", "ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages",
                     "ksm_process_profit", "mappings_estimate", "requests")

# Fast convergence: ksmd with a big batch and no sleep.
FAST = {"pages_to_scan": 10000, "sleep_millisecs": 0}

# ---- the worker side -----------------------------------------------------

HARNESS = r'''
import os, threading
import numpy as np
import shmdedup
from shmdedup import MERGEABLE, PAGE_SIZE, UNMERGEABLE, Region

CHUNK = 256  # pages compared per lock hold


class Harness:
    """One region with a known layout, an expected copy, a verifier thread and
    (when there are volatile pages) a rewriter thread."""

    def __init__(self, npages, shared_seed=1, layout_seed=1, unique=0, volatile=0,
                 advise=True, verify_pause=0.02):
        self.npages = npages
        perm = np.random.default_rng(layout_seed).permutation(npages)
        self.unique_idx = np.sort(perm[:unique])
        self.volatile_idx = np.sort(perm[unique:unique + volatile])
        self.shared_idx = np.sort(perm[unique + volatile:])
        # Shared pages: the same bytes in every worker with this seed, all
        # distinct from each other.  Unique and volatile pages: OS entropy, so
        # equal to nothing in this worker or any other.
        exp = np.frombuffer(np.random.default_rng(shared_seed).bytes(npages * PAGE_SIZE), np.uint8)
        self.exp = exp.reshape(npages, PAGE_SIZE).copy()
        k = unique + volatile
        if k:
            own = np.random.default_rng()
            self.exp[perm[:k]] = np.frombuffer(own.bytes(k * PAGE_SIZE), np.uint8).reshape(k, PAGE_SIZE)
        self.lock = threading.Lock()        # held while region and copy disagree
        self.count_lock = threading.Lock()
        self.passes = self.mismatches = self.rewrites = 0
        self.bad_pages = []
        self.region = Region(npages * PAGE_SIZE)
        self.a = self.region.ndarray(np.uint8, (npages, PAGE_SIZE))
        self.a[:] = self.exp
        if advise:
            self.region.advise(MERGEABLE)
        self.stop_verify = threading.Event()
        self.stop_rewrite = threading.Event()
        self.verify_pause = verify_pause
        self.threads = [threading.Thread(target=self._verify_loop, daemon=True)]
        if volatile:
            self.threads.append(threading.Thread(target=self._rewrite_loop, daemon=True))
        for t in self.threads:
            t.start()

    def info(self):
        return {"pid": os.getpid(), "backing_fd": self.region.backing_fd, "npages": self.npages,
                "shared": len(self.shared_idx), "unique": len(self.unique_idx),
                "volatile": len(self.volatile_idx)}

    def verify(self):
        """One full comparison of the region with the copy; pages that differ."""
        bad = []
        for c0 in range(0, self.npages, CHUNK):
            c1 = min(c0 + CHUNK, self.npages)
            with self.lock:
                if not np.array_equal(self.a[c0:c1], self.exp[c0:c1]):
                    rows = (self.a[c0:c1] != self.exp[c0:c1]).any(axis=1)
                    bad.extend(int(p) + c0 for p in np.flatnonzero(rows))
        with self.count_lock:
            self.passes += 1
            self.mismatches += len(bad)
            self.bad_pages = (self.bad_pages + bad)[:20]
        return len(bad)

    def _verify_loop(self):
        while not self.stop_verify.is_set():
            self.verify()
            self.stop_verify.wait(self.verify_pause)

    def _rewrite_loop(self):
        n = 0
        while not self.stop_rewrite.is_set():
            n += 1
            stamp = np.frombuffer(n.to_bytes(8, "little"), np.uint8)
            with self.lock:
                self.a[self.volatile_idx, :8] = stamp
                self.exp[self.volatile_idx, :8] = stamp
            self.rewrites += 1
            self.stop_rewrite.wait(0.001)

    def status(self):
        with self.count_lock:
            return {"passes": self.passes, "mismatches": self.mismatches,
                    "bad_pages": list(self.bad_pages), "rewrites": self.rewrites,
                    "merged": self.region.merged_pages(),
                    "allocated_pages": self.region.allocated_bytes() // PAGE_SIZE}

    def write(self, pages, delta=1, offset=0):
        """Change one byte in each page (delta -1 undoes delta 1)."""
        pages = np.asarray(pages, dtype=np.int64)
        with self.lock:
            vals = ((self.exp[pages, offset].astype(np.int64) + delta) % 256).astype(np.uint8)
            self.a[pages, offset] = vals
            self.exp[pages, offset] = vals

    def private_pages(self):
        s = np.frombuffer(self.region.states(), np.uint8)
        return [int(p) for p in np.flatnonzero(s == shmdedup._native.PRIVATE)]

    def fill(self, pages, value):
        """Set every byte of the pages to value."""
        pages = np.asarray(pages, dtype=np.int64)
        with self.lock:
            self.a[pages] = value
            self.exp[pages] = value

    def advise(self, mergeable, first, n):
        self.region.advise(MERGEABLE if mergeable else UNMERGEABLE, first * PAGE_SIZE, n * PAGE_SIZE)

    def stop_threads(self):
        self.stop_rewrite.set()
        self.stop_verify.set()
        for t in self.threads:
            t.join()
        self.threads = []

    def close(self):
        if self.region.closed:
            return 0
        self.stop_threads()
        bad = self.verify()
        del self.a
        self.region.close()
        return bad
'''


class PageWorker:
    """The test side of one page worker process."""

    def __init__(self, worker: Worker, info: dict[str, Any]) -> None:
        self.w = worker
        self.pid: int = info["pid"]
        self.backing_fd: int = info["backing_fd"]
        self.npages: int = info["npages"]
        self.shared: int = info["shared"]
        self.unique: int = info["unique"]
        self.volatile: int = info["volatile"]

    def __repr__(self) -> str:
        return f"<PageWorker pid={self.pid} npages={self.npages}>"

    def call(self, expr: str, timeout: float = 120, **values: Any) -> Any:
        return self.w.call(f"result = {expr}", timeout=timeout, **values)

    def status(self) -> dict[str, Any]:
        return self.call("h.status()")

    def verify(self) -> int:
        """Run one synchronous full comparison in the worker; pages that differ."""
        return self.call("h.verify()")

    def shared_pages(self) -> list[int]:
        return self.call("[int(p) for p in h.shared_idx]")

    def write(self, pages: list[int], delta: int = 1) -> None:
        self.call("h.write(pages, delta)", pages=list(pages), delta=delta)

    def private_pages(self) -> list[int]:
        """Pages whose state byte says PRIVATE (neither merged nor in transit)."""
        return self.call("h.private_pages()")

    def fill(self, pages: Any, value: int) -> None:
        self.call("h.fill(pages, value)", pages=list(pages), value=value)

    def advise(self, mergeable: bool, first: int, n: int) -> None:
        self.call("h.advise(m, first, n)", m=mergeable, first=first, n=n)

    def blocks(self) -> int:
        """Pages the backing object holds, seen from outside (st_blocks through /proc)."""
        return os.stat(f"/proc/{self.pid}/fd/{self.backing_fd}").st_blocks * 512 // PAGE

    def smaps(self) -> dict[str, int]:
        return smaps_rollup_kb(self.pid)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        self.w.proc.kill()
        self.w.proc.join(30)
        assert self.w.proc.exitcode is not None, f"worker {self.pid} survived SIGKILL"

    def close(self) -> int:
        """Stop the threads, verify a last time, close the region; every page
        that ever differed (background passes and the last one)."""
        return self.call("(h.close(), h.mismatches)[1]")

    def assert_intact(self) -> None:
        """Zero mismatches now and in every background pass so far."""
        now = self.verify()
        st = self.status()
        assert now == 0 and st["mismatches"] == 0, f"worker {self.pid} read wrong bytes: {st}"


@pytest.fixture
def spawn_workers(reaper: None) -> Iterator[Callable[..., list[PageWorker]]]:  # noqa: F811
    """``spawn_workers(n, npages, **spec)``: n page workers, started and filled
    (spec: shared_seed, layout_seed, unique, volatile, advise).  The region
    registers with whatever coordinator ``$SHMDEDUP_SOCKET`` names when the
    worker starts.  At teardown each one verifies and closes its region, then
    exits (or is killed) and is reaped; wrong bytes fail the test."""
    started: list[PageWorker] = []

    def spawn(n: int, npages: int, **spec: Any) -> list[PageWorker]:
        out = []
        for _ in range(n):
            w = Worker(setup=HARNESS)
            info = w.call("h = Harness(npages, **spec); result = h.info()", timeout=120,
                          npages=npages, spec=spec)
            pw = PageWorker(w, info)
            started.append(pw)
            out.append(pw)
        return out

    yield spawn
    bad = {}
    for pw in started:
        if pw.w.proc.is_alive():
            try:
                bad[pw.pid] = pw.close()
            except Exception as e:  # noqa: BLE001  report, then still reap the rest
                bad[pw.pid] = f"close failed: {e}"
        pw.w.close()
    for pw in started:
        assert pw.w.exitcode is not None, f"worker {pw.pid} was not reaped"
    assert all(v == 0 for v in bad.values()), f"workers read wrong bytes at close: {bad}"


@pytest.fixture
def coordinator() -> Iterator[Callable[..., shmdedup.Coordinator]]:
    """``coordinator(**kw)``: a started ``shmdedup.Coordinator`` (thread mode
    unless process=True), stopped at teardown (its process reaped)."""
    started: list[shmdedup.Coordinator] = []

    def make(**kw: Any) -> shmdedup.Coordinator:
        c = shmdedup.Coordinator(**kw)
        started.append(c)
        c.start()
        # The embedded client waits 10 s for a reply; a 2-vCPU box loaded by
        # parallel tests can take longer to schedule a coordinator process.
        c._client = shmdedup.Client(c.socket_path, timeout=60)
        return c

    yield make
    for c in reversed(started):
        proc = c._proc
        c.stop()
        if proc is not None:
            assert proc.returncode is not None, f"coordinator {proc.pid} was not reaped"


@pytest.fixture
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A short private directory for socket paths (sun_path holds 107 bytes)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="sd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _memory_lock(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests marked ``xdist_group("serial")`` measure /proc/meminfo, which is
    system-wide: they run alone among this run's integration tests, across
    xdist workers and whatever the --dist mode (an exclusive flock in the
    run's shared temp directory; every other test holds it shared)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every xdist worker of this run
    marker = request.node.get_closest_marker("xdist_group")
    exclusive = marker is not None and marker.args[:1] == ("serial",)
    fd = os.open(root / "memory.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


# ---- waiting on the coordinator -------------------------------------------

def wait_stats(c: Any, pred: Callable[[dict[str, Any]], bool], timeout: float = 60,
               what: str = "statistics") -> dict[str, Any]:
    """Wait until ``pred(c.stats())``, checking again at every full scan (or
    every second while nothing scans); returns those stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = c.stats()
        if pred(s):
            return s
        left = deadline - time.monotonic()
        if left <= 0:
            brief = {k: s.get(k) for k in STAT_NAMES + ("run",)}
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {brief}")
        try:
            c.wait_full_scans(1, timeout=min(left, 1.0))
        except ControlError:
            pass  # no full scan within the second (idle or run != 1): check again


def merged_counts(shared: int, sharers: int) -> dict[str, int]:
    """pages_shared / pages_sharing when ``sharers`` workers hold the same ``shared`` pages."""
    return {"pages_shared": shared, "pages_sharing": (sharers - 1) * shared}


def counts(s: dict[str, Any]) -> dict[str, int]:
    return {"pages_shared": s["pages_shared"], "pages_sharing": s["pages_sharing"]}


def worker_stats(s: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {w["pid"]: w for w in s["workers"]}


def registered(c: Any, workers: list[PageWorker], timeout: float = 60) -> dict[str, Any]:
    """Wait until every worker's whole region is registered with c."""
    def ok(s: dict[str, Any]) -> bool:
        ws = worker_stats(s)
        return all(w.pid in ws and ws[w.pid]["pages"] == w.npages for w in workers)
    return wait_stats(c, ok, timeout, f"workers {[w.pid for w in workers]} to register")


# ---- leak check for every test -----------------------------------------------

def shmdedup_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "shmdedup" in n}


@pytest.fixture(autouse=True)
def _nothing_left_in_dev_shm(no_shm_leftovers: None) -> Iterator[None]:  # noqa: F811
    """No 'shmdedup' name in /dev/shm after the test (any process's: a
    coordinator process or a killed worker counts too).  Objects live under
    a name only between shm_open and shm_unlink, so a name that is there
    for a moment in a parallel test is not a leak: wait for it to go."""
    before = shmdedup_names()
    yield
    wait_for(lambda: not (shmdedup_names() - before), timeout=5,
             what=f"'shmdedup' names to leave /dev/shm: {sorted(shmdedup_names() - before)}")
