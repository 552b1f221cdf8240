"""Merging and copy-on-write, checked from outside, in real processes.

The test process plays the coordinator: it owns a StableSegment, writes the
content into slots, hands each worker a read-only fd of it (SCM_RIGHTS) and
tells it what to merge.  Workers are spawned Python processes (tests.helpers.
Worker); anything that may crash runs in a child and is judged by its exit
status and stderr.  Memory is measured from outside: st_blocks of each backing
(through an fd the worker sends), /proc/meminfo Shmem, /proc/<pid>/smaps_rollup.
"""

from __future__ import annotations

import hashlib
import os
import signal
import textwrap

import numpy as np
import pytest

from shmdedup import _native
from shmdedup.coordinator.scan.stable import StableSegment
from tests.helpers import (  # noqa: F401
    Worker,
    allocated_bytes,
    child_env,
    meminfo_kb,
    no_shm_leftovers,
    reaper,
    run_python,
    smaps_rollup_kb,
)

P = _native.PAGE_SIZE
MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")

# Runs in every worker: a region filled with content(seed), and a few helpers.
WORKER_SETUP = """
import hashlib, os, threading
import numpy as np
from shmdedup import _native
from shmdedup.worker.region import Region, MERGEABLE, UNMERGEABLE, PAGE_SIZE as P

def content(seed, npages):
    return np.random.default_rng(seed).integers(0, 2**63, npages * P // 8, dtype=np.uint64).view(np.uint8)

def digest(buf):
    return hashlib.sha256(buf).hexdigest()

def new_region(npages, seed):
    global r, a, orig
    r = Region(npages * P)
    a = r.ndarray()
    orig = content(seed, npages)
    a[:] = orig
    send_fd(os.dup(r.backing_fd))   # so the harness can fstat it from outside
    return digest(a)
"""


def content(seed: int, npages: int) -> np.ndarray:
    """Random pages, the same in the harness and in every worker for one seed."""
    return np.random.default_rng(seed).integers(0, 2**63, npages * P // 8, dtype=np.uint64).view(np.uint8)


def digest(buf: object) -> str:
    return hashlib.sha256(buf).hexdigest()


def items(*triples: tuple[int, int, int]) -> bytes:
    return np.array(triples, dtype=np.int64).reshape(-1, 3).tobytes()


def runs(first: int, npages: int, slot: int, run: int) -> bytes:
    """Items merging [first, first+npages) onto [slot, ...) in runs of `run` pages."""
    return items(*[(first + i, min(run, npages - i), slot + i) for i in range(0, npages, run)])


class Harness:
    """The coordinator's part: the stable segment, fds out, merges in."""

    def __init__(self) -> None:
        self.segment = StableSegment(chunk_pages=1024)
        self.workers: list[Worker] = []
        self.backing: dict[int, int] = {}  # worker pid -> fd of its backing

    def close(self) -> None:
        for w in self.workers:
            w.close()
        for fd in self.backing.values():
            os.close(fd)
        self.segment.close()

    def store(self, data: np.ndarray | bytes) -> int:
        """Write pages into fresh stable slots; return the first slot."""
        n = len(data) // P
        slot = self.segment.alloc(n)
        assert slot is not None
        view = memoryview(data).cast("B")
        for off in range(0, n, 4096):  # keep each pwrite modest
            self.segment.write(slot + off, view[off * P:min(n, off + 4096) * P])
        return slot

    def worker(self, npages: int = 0, seed: int = 1) -> tuple[Worker, str]:
        """A worker holding the stable view (and a region of content(seed) if npages)."""
        w = Worker(setup=WORKER_SETUP)
        self.workers.append(w)
        ro = self.segment.readonly_fd()
        try:
            w.run("sv = _native.StableView(fds[0]); os.close(fds[0])", send_fds=(ro,))
        finally:
            os.close(ro)
        sha = ""
        if npages:
            sha, fds = w.run(f"result = new_region({npages}, {seed})")
            self.backing[w.pid] = fds[0]
        return w, sha

    def allocated(self, w: Worker) -> int:
        return allocated_bytes(self.backing[w.pid])


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def merge(w: Worker, merge_items: bytes) -> bytes:
    return w.call("result = r.merge(sv, it)", it=merge_items)


# ---- merging, measured from outside ------------------------------------------------

def test_two_workers_merge_measured_from_outside(harness: Harness) -> None:
    npages = 32768  # 128 MiB each: well above what concurrent tests add to /proc/meminfo
    size_kb = npages * P // 1024
    data = content(7, npages)
    a, sha_a = harness.worker(npages, seed=7)
    b, sha_b = harness.worker(npages, seed=7)
    assert sha_a == sha_b == digest(data)
    slot = harness.store(data)
    merge_items = runs(0, npages, slot, 64)
    for w in (a, b):
        assert harness.allocated(w) == npages * P
    pss_before = {w.pid: smaps_rollup_kb(w.pid).get("Pss_Shmem") for w in (a, b)}

    # /proc/meminfo is system-wide: other tests come and go.  Measure the merge
    # (and, on a noisy reading, unmerge and measure again) up to 5 times.
    deltas = []
    for _ in range(5):
        shmem_before = meminfo_kb("Shmem")
        results = [merge(w, merge_items) for w in (a, b)]
        shmem_after = meminfo_kb("Shmem")
        assert results == [b"\x01" * npages] * 2
        deltas.append(shmem_before - shmem_after)
        if abs(deltas[-1] - 2 * size_kb) <= size_kb // 2:  # 25%
            break
        for w in (a, b):
            assert w.call("result = r.break_range(0, r.npages)") == npages
    assert any(abs(d - 2 * size_kb) <= size_kb // 2 for d in deltas), \
        f"Shmem fell by {deltas} KiB per attempt, expected ~{2 * size_kb}"

    for w in (a, b):
        assert harness.allocated(w) == 0  # every backing page punched
        assert w.call("result = (r.merged_pages(), _native.merged_pages(), r.breaks)") == (npages, npages, 0)
        assert w.call("result = r.states()") == bytes([_native.MERGED]) * npages
    # Both still read their exact bytes (through the stable slots).
    assert a.call("result = digest(a)") == b.call("result = digest(a)") == sha_a
    # The stable copy is the only one: each worker now pays half of it in Pss
    # (every stable page is mapped by both workers' regions and stable views).
    print(f"Shmem fell by {deltas} KiB (expected {2 * size_kb})")
    if all(pss_before.values()):
        for w in (a, b):
            after = smaps_rollup_kb(w.pid)["Pss_Shmem"]
            print(f"worker {w.pid}: Pss_Shmem {pss_before[w.pid]} -> {after} KiB")
            assert abs((pss_before[w.pid] - after) - size_kb // 2) <= size_kb // 16, (pss_before[w.pid], after)


def test_merge_stretches_refuse_differing_pages(harness: Harness) -> None:
    w, sha = harness.worker(16, seed=3)
    data = bytearray(content(3, 16).tobytes())
    data[5 * P + 1234] ^= 0x01  # slot 5 differs by one bit
    slot = harness.store(bytes(data))
    res = merge(w, items((0, 8, slot), (8, 8, slot + 8)))
    assert res == bytes([1, 1, 1, 1, 1, 0, 1, 1] + [1] * 8)
    states = w.call("result = r.states()")
    assert states == bytes([_native.MERGED] * 5 + [_native.PRIVATE] + [_native.MERGED] * 10)
    assert harness.allocated(w) == P  # only the refused page is still private
    assert w.call("result = digest(a)") == sha
    # Merged pages are skipped, not merged twice; the refused one is refused again.
    assert merge(w, items((0, 16, slot))) == bytes(16)
    assert w.call("result = r.merged_pages()") == 15


def test_merge_argument_checks(harness: Harness) -> None:
    w, _ = harness.worker(8, seed=4)
    slot = harness.store(content(4, 8))
    end = harness.segment.size_bytes // P  # the first slot past the stable object
    for bad in [items((0, 9, slot)), items((-1, 1, slot)), items((0, 0, slot)), items((7, 2, slot)),
                items((0, 2, end - 1)), items((0, 1, -2)), b"\0" * 23]:
        assert w.call("""
            try:
                r.merge(sv, it)
                result = "merged"
            except ValueError as e:
                result = "ValueError"
        """, it=bad) == "ValueError", bad
    assert w.call("result = r.merged_pages()") == 0
    assert merge(w, b"") == b""
    # A slot inside the object but never written reads as zeros: refused, not an error.
    assert merge(w, items((0, 1, end - 1))) == b"\x00"


# ---- the proof under protection (invariant 1) ----------------------------------------

def test_race_hook_write_under_protection_is_refused(harness: Harness) -> None:
    w, sha = harness.worker(32, seed=5)
    data = content(5, 32)
    slot = harness.store(data)
    singles = runs(0, 16, slot, 1)           # pages 0-15 as 16 one-page runs
    pair_of_runs = items((16, 8, slot + 16), (24, 8, slot + 24))
    w.call("_native._test_race_hook(True)")
    try:
        # The hook changes each run's first byte in the backing after the pages
        # are write-protected and before the compare: the proof sees it.
        assert merge(w, singles) == bytes(16)
        # In longer runs only that first page is refused; the rest were proven equal.
        assert merge(w, pair_of_runs) == (b"\x00" + b"\x01" * 7) * 2
    finally:
        w.call("_native._test_race_hook(False)")
    states = w.call("result = r.states()")
    assert states == bytes(16) + (bytes([_native.PRIVATE]) + bytes([_native.MERGED]) * 7) * 2
    assert harness.allocated(w) == 18 * P
    # Every changed byte is kept: the write under protection was not lost.
    expected = data.copy()
    for page in list(range(16)) + [16, 24]:
        expected[page * P] ^= 0xFF
    assert w.call("result = digest(a)") == digest(expected) != sha
    # Without the hook the changed pages now differ from their slots: refused again.
    assert merge(w, runs(0, 32, slot, 32)) == bytes(32)
    assert w.call("result = (digest(a), r.merged_pages())") == (digest(expected), 14)
    # And the region is still writable everywhere.
    w.call("a[:] = 0x5A")
    assert w.call("result = (bool((a == 0x5A).all()), r.merged_pages(), r.breaks)") == (True, 0, 14)


# ---- copy-on-write from Python and numpy, 4 threads ---------------------------------

COW_THREADS = """
Q = r.npages // 4          # each thread writes only in its quarter
ops = [[] for _ in range(4)]   # (byte offset, bytes) per thread, in order
for k in range(0, Q - 1, 4):   # memoryview slices across a page edge (pages k, k+1)
    off = k * P + P - 3
    ops[0].append((off, bytes([k & 0xFF, 1, 2, 3, 4, 5, 6])))
for k in range(0, Q, 3):       # numpy scalar stores
    ops[1].append(((Q + k) * P + (k * 37) % P, bytes([(k * 7) & 0xFF])))
for k in range(0, Q - 2, 5):   # ndarray.fill over three pages
    off = (2 * Q + k) * P + 100
    ops[2].append((off, bytes([k & 0xFF]) * (2 * P)))
for k in range(0, Q - 32, 48): # np.copyto of 32 pages (releases the GIL)
    off = (3 * Q + k) * P
    ops[3].append((off, os.urandom(32 * P)))

expected = bytearray(orig.tobytes())
touched = set()
for per_thread in ops:
    for off, data in per_thread:
        expected[off:off + len(data)] = data
        touched.update(range(off // P, (off + len(data) - 1) // P + 1))

m = memoryview(r)
def t0():
    barrier.wait()
    for off, data in ops[0]:
        m[off:off + len(data)] = data
def t1():
    barrier.wait()
    for off, data in ops[1]:
        a[off] = data[0]
def t2():
    barrier.wait()
    for off, data in ops[2]:
        a[off:off + len(data)].fill(data[0])
def t3():
    barrier.wait()
    for off, data in ops[3]:
        np.copyto(a[off:off + len(data)], np.frombuffer(data, dtype=np.uint8))
barrier = threading.Barrier(4)
threads = [threading.Thread(target=f) for f in (t0, t1, t2, t3)]
for t in threads: t.start()
for t in threads: t.join()
m.release()
states = r.states()
result = dict(
    equal=bytes(a) == bytes(expected),
    touched=len(touched),
    breaks=r.breaks,
    private_exactly_touched={i for i in range(r.npages) if states[i] == _native.PRIVATE} == touched,
    others_merged=all(states[i] == _native.MERGED for i in range(r.npages) if i not in touched),
    digest=digest(a),
)
"""


def test_cow_writes_from_four_threads(harness: Harness) -> None:
    npages = 1024
    data = content(11, npages)
    a, sha = harness.worker(npages, seed=11)
    b, _ = harness.worker(npages, seed=11)
    slot = harness.store(data)
    for w in (a, b):
        assert merge(w, runs(0, npages, slot, 64)) == b"\x01" * npages
    out = a.call(COW_THREADS)
    assert out["equal"], "a worker does not read back exactly what it wrote"
    assert out["touched"] > 400
    assert out["breaks"] == out["touched"]  # one break per page written
    assert out["private_exactly_touched"] and out["others_merged"]
    assert harness.allocated(a) == out["touched"] * P  # the broken pages, and only they
    # The other process, mapping the same stable slots, sees none of it.
    assert b.call("result = (digest(a), r.breaks, r.merged_pages())") == (sha, 0, npages)
    assert harness.allocated(b) == 0
    assert harness.segment.read(slot, npages) == data.tobytes()  # stable slots untouched


SAME_PAGES_THREADS = """
cols = a.reshape(r.npages, P)
srcs = [np.full((r.npages, 64), t + 1, dtype=np.uint8) for t in range(4)]
def writer(t):
    barrier.wait()
    np.copyto(cols[:, t * 1024:t * 1024 + 64], srcs[t])   # strided: every page, GIL released
barrier = threading.Barrier(4)
threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
expected = orig.reshape(r.npages, P).copy()
for t in range(4):
    expected[:, t * 1024:t * 1024 + 64] = t + 1
result = (bool((cols == expected).all()), r.breaks, r.merged_pages())
"""


def test_cow_same_pages_from_four_threads_break_once(harness: Harness) -> None:
    npages = 512
    w, _ = harness.worker(npages, seed=12)
    slot = harness.store(content(12, npages))
    assert merge(w, runs(0, npages, slot, npages)) == b"\x01" * npages
    equal, breaks, merged = w.call(SAME_PAGES_THREADS)
    assert equal
    assert breaks == npages  # four writers per page, one break
    assert merged == 0


# ---- zero pages, UNMERGEABLE ----------------------------------------------------------

def test_zero_page_merge(harness: Harness) -> None:
    w, _ = harness.worker()
    fds = w.run("""
        r = Region(64 * P); a = r.ndarray()
        a[:] = 0                      # allocated, all zero
        a[40 * P + 9] = 1             # ... but one page
        send_fd(os.dup(r.backing_fd))
    """)[1]
    harness.backing[w.pid] = fds[0]
    assert harness.allocated(w) == 64 * P
    res = merge(w, items((0, 64, -1)))
    assert res == b"\x01" * 40 + b"\x00" + b"\x01" * 23
    states = w.call("result = r.states()")
    assert states == bytes([_native.ZERO] * 40 + [_native.PRIVATE] + [_native.ZERO] * 23)
    assert harness.allocated(w) == P
    assert w.call("result = (int(a.sum()), r.merged_pages(), _native.merged_pages())") == (1, 63, 63)
    # Writing breaks one page; the rest stay on the zero page.
    w.call("a[3 * P + 5] = 7; m = memoryview(r); m[9 * P - 1:9 * P + 1] = b'\\x08\\x09'; m.release()")
    assert w.call("""
        want = np.zeros(64 * P, dtype=np.uint8)
        want[40 * P + 9] = 1; want[3 * P + 5] = 7; want[9 * P - 1] = 8; want[9 * P] = 9
        result = (bool((a == want).all()), r.breaks, r.merged_pages())
    """) == (True, 3, 60)
    assert harness.allocated(w) == 4 * P
    # An explicit break of zero pages only remaps: their backing is a hole...
    assert w.call("result = (r.break_range(0, 64), r.merged_pages(), r.states())") == (60, 0, bytes(64))
    assert harness.allocated(w) == 4 * P
    # ... that reads as zeros (and, read through the mapping, gets allocated: a private page).
    assert w.call("result = int(a.sum())") == 1 + 7 + 8 + 9
    assert harness.allocated(w) == 64 * P


def test_unmergeable_advice_breaks_merged_pages(harness: Harness) -> None:
    w, sha = harness.worker(32, seed=13)
    slot = harness.store(content(13, 32))
    w.call("r.advise(MERGEABLE)")
    assert merge(w, items((0, 32, slot))) == b"\x01" * 32
    assert harness.allocated(w) == 0
    w.call("r.advise(UNMERGEABLE, 8 * P, 8 * P)")
    states = w.call("result = r.states()")
    assert states == bytes([_native.MERGED] * 8 + [_native.PRIVATE] * 8 + [_native.MERGED] * 16)
    assert harness.allocated(w) == 8 * P
    assert w.call("result = (digest(a), r.breaks, r.advice_runs())") == (sha, 0, [(0, 8), (16, 16)])
    # The whole region, and again (nothing left to break).
    w.call("r.advise(UNMERGEABLE)")
    assert w.call("result = (r.merged_pages(), r.break_range(0, r.npages), digest(a))") == (0, 0, sha)
    assert harness.allocated(w) == 32 * P


def test_break_range_and_close_with_merged_pages(harness: Harness) -> None:
    w, sha = harness.worker(64, seed=14)
    slot = harness.store(content(14, 64))
    assert merge(w, runs(0, 64, slot, 8)) == b"\x01" * 64
    # Break from the middle of one run to the middle of another.
    assert w.call("result = r.break_range(4, 10)") == 10
    assert w.call("result = (r.merged_pages(), _native.merged_pages(), digest(a))") == (54, 54, sha)
    # Closing a region with merged pages unmaps them and settles the counter.
    assert w.call("del a; r.close(); result = (_native.merged_pages(), r.closed)") == (0, True)


# ---- I/O into merged pages -------------------------------------------------------------

def test_read_into_merged_page_efault_then_helpers(harness: Harness, tmp_path) -> None:
    w, _ = harness.worker(16, seed=15)
    slot = harness.store(content(15, 16))
    assert merge(w, items((0, 16, slot))) == b"\x01" * 16
    path = tmp_path / "payload"
    path.write_bytes(b"PAYLOAD!" * 1024)
    out = w.call("""
        import errno, io
        res = {}
        fd = os.open(path, os.O_RDONLY)
        m = memoryview(r)
        try:
            os.readv(fd, [m[2 * P:2 * P + 100]])
        except OSError as e:
            res["readv"] = e.errno
        with open(path, "rb", buffering=0) as f:
            try:
                f.readinto(m[3 * P:3 * P + 100])
            except OSError as e:
                res["readinto"] = e.errno
        m.release()
        res["unchanged"] = digest(a) == digest(orig)
        res["still_merged"] = r.merged_pages()
        # The helpers break first, then read.
        os.lseek(fd, 0, os.SEEK_SET)
        res["helper_fd"] = r.readinto(fd, 2 * P + 10, 100)
        with open(path, "rb", buffering=0) as f:
            res["helper_file"] = r.readinto(f, 3 * P - 4, 8)   # across a page edge
        # prepare_write, then a plain read works.
        res["prepared"] = r.prepare_write(5 * P, 1)
        m = memoryview(r)
        os.lseek(fd, 0, os.SEEK_SET)
        res["plain_after_prepare"] = os.readv(fd, [m[5 * P:5 * P + 16]])
        m.release()
        os.close(fd)
        want = orig.copy()
        payload = np.frombuffer(b"PAYLOAD!" * 1024, dtype=np.uint8)
        want[2 * P + 10:2 * P + 110] = payload[:100]
        want[3 * P - 4:3 * P + 4] = payload[:8]
        want[5 * P:5 * P + 16] = payload[:16]
        res["content"] = bool((a == want).all())
        res["breaks"] = r.breaks
        res["merged"] = r.merged_pages()
        result = res
    """, path=str(path))
    assert out["readv"] == out["readinto"] == 14  # EFAULT
    assert out["unchanged"] and out["still_merged"] == 16
    assert out["helper_fd"] == 100 and out["helper_file"] == 8
    assert out["prepared"] == 1 and out["plain_after_prepare"] == 16
    assert out["content"]
    assert out["breaks"] == 0  # explicit breaks, not trap breaks
    assert out["merged"] == 16 - 3  # broken: page 2, pages 2-3 (the edge), page 5


def test_recv_into_merged_page_efault_keeps_data(harness: Harness) -> None:
    w, _ = harness.worker(8, seed=16)
    slot = harness.store(content(16, 8))
    assert merge(w, items((0, 8, slot))) == b"\x01" * 8
    out = w.call("""
        import socket
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s1.sendall(b"0123456789abcdef")
        m = memoryview(r)
        res = {}
        try:
            s2.recv_into(m[P:P + 16])
        except OSError as e:
            res["errno"] = e.errno
        m.release()
        res["unchanged"] = digest(a) == digest(orig)
        res["got"] = r.recv_into(s2, P + P // 2, 16)   # the data waited in the socket
        res["bytes"] = bytes(a[P + P // 2:P + P // 2 + 16])
        res["states"] = r.states()
        s1.close(); s2.close()
        result = res
    """)
    assert out["errno"] == 14  # EFAULT
    assert out["unchanged"]
    assert out["got"] == 16 and out["bytes"] == b"0123456789abcdef"
    assert out["states"] == bytes([_native.MERGED] + [_native.PRIVATE] + [_native.MERGED] * 6)


# ---- the trap and faulthandler (children: they may crash) -----------------------------

CHILD_PRELUDE = """
import faulthandler, os, sys
import numpy as np
from shmdedup import _native
from shmdedup.worker.region import Region, PAGE_SIZE as P
from shmdedup.coordinator.scan.stable import StableSegment

def merged_region(npages, seed=1):
    data = np.random.default_rng(seed).integers(0, 256, npages * P, dtype=np.uint8)
    r = Region(npages * P)
    a = r.ndarray()
    a[:] = data
    seg = StableSegment(chunk_pages=npages)
    slot = seg.alloc(npages)
    seg.write(slot, data)
    fd = seg.readonly_fd()
    sv = _native.StableView(fd)
    os.close(fd)
    assert r.merge(sv, np.array([0, npages, slot], dtype=np.int64).tobytes()) == b"\\x01" * npages
    return r, a, data, seg, sv
"""


def run_child(body: str, *, faulthandler: bool = False, timeout: float = 60.0):
    flags = ("-X", "faulthandler") if faulthandler else ()
    return run_python(CHILD_PRELUDE + textwrap.dedent(body), flags=flags, timeout=timeout, env=child_env())


def test_cow_faults_are_silent_under_faulthandler() -> None:
    res = run_child("""
        assert faulthandler.is_enabled()
        r, a, data, seg, sv = merged_region(64)
        assert _native.trap_in_front()        # Region installed it after faulthandler
        a[::P] = 0xEE                          # 64 COW faults
        m = memoryview(r); m[P - 1:P + 1] = b"xy"; m.release()
        data[::P] = 0xEE; data[P - 1] = ord("x"); data[P] = ord("y")
        assert (a == data).all() and r.breaks == 64
        print("ok")
    """, faulthandler=True)
    res.check()
    assert res.stdout == "ok\n"
    assert res.stderr == ""


@pytest.mark.parametrize("with_merged", [False, True])
def test_genuine_segfault_still_reaches_faulthandler(with_merged: bool) -> None:
    res = run_child(f"""
        if {with_merged}:
            r, a, data, seg, sv = merged_region(8)
        else:
            r = Region(P)
        assert _native.trap_in_front()
        _native._test_segfault()
    """, faulthandler=True)
    assert not res.timed_out
    assert res.returncode == -signal.SIGSEGV, res.stderr
    assert "Fatal Python error: Segmentation fault" in res.stderr
    assert "most recent call first" in res.stderr and 'File "<string>", line' in res.stderr  # the traceback


@pytest.mark.parametrize("case", ["null", "readonly-elsewhere", "private-page-protected"])
def test_genuine_segfault_without_faulthandler_dies(case: str) -> None:
    body = {
        "null": "_native._test_segfault()",
        # A protection fault outside every region is chained, not retried.
        "readonly-elsewhere": """
            import ctypes, mmap
            ro = mmap.mmap(-1, P, prot=mmap.PROT_READ)
            ctypes.memset(np.frombuffer(ro, dtype=np.uint8).ctypes.data, 1, 1)
        """,
        # A private page of a region, write-protected by someone else: the trap
        # retries a bounded number of times, then chains (no endless loop).
        "private-page-protected": """
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            r2 = Region(4 * P)
            assert libc.mprotect(r2.address + P, P, 1) == 0   # PROT_READ
            ctypes.memset(r2.address + P, 1, 1)
        """,
    }[case]
    res = run_child("r, a, data, seg, sv = merged_region(8)\n" + textwrap.dedent(body), timeout=30)
    assert not res.timed_out, "the trap looped on a fault that is not a merged page"
    assert res.returncode == -signal.SIGSEGV, (res.returncode, res.stderr)
    assert "Fatal Python error" not in res.stderr


def test_faulthandler_enabled_after_merge_cow_still_correct() -> None:
    res = run_child("""
        r, a, data, seg, sv = merged_region(16)
        faulthandler.enable()                  # now faulthandler is in front of the trap
        print("in_front_after_enable", _native.trap_in_front())
        sys.stdout.flush()
        a[3 * P + 1] = 0x42                    # a COW write: faulthandler sees it first
        data[3 * P + 1] = 0x42
        assert (a == data).all(), "wrong bytes after a COW fault behind faulthandler"
        print("in_front_after_fault", _native.trap_in_front())
        print("reinstalled", _native.trap_install())
        print("in_front", _native.trap_in_front())
        sys.stdout.flush()
        a[7 * P] = 0x43                        # the trap is in front again
        data[7 * P] = 0x43
        assert (a == data).all() and r.breaks == 2
        print("ok")
    """, faulthandler=False)
    res.check()
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert lines["in_front_after_enable"] == "False"
    assert lines["in_front"] == "True"
    assert res.stdout.endswith("ok\n")
    # Recorded, not asserted: faulthandler prints its "Fatal Python error"
    # traceback for the first COW fault it sees before handing it back.
    print("\nstderr of the child (faulthandler in front during a COW fault):\n" + res.stderr)


def test_genuine_segfault_with_faulthandler_in_front_after_merge() -> None:
    res = run_child("""
        r, a, data, seg, sv = merged_region(8)
        faulthandler.enable()
        _native._test_segfault()
    """, timeout=30)
    assert not res.timed_out
    assert res.returncode == -signal.SIGSEGV, res.stderr
    assert "Fatal Python error: Segmentation fault" in res.stderr


# ---- running out: of file size, of mappings ----------------------------------------------

def test_break_failures_leave_pages_merged_or_kill_with_sigbus() -> None:
    # RLIMIT_FSIZE makes pwrite into the backing fail (EFBIG) past a limit: the
    # same path as a full /dev/shm (ENOSPC), without filling the machine.
    res = run_child("""
        import errno, resource, signal
        r, a, data, seg, sv = merged_region(64)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * P, resource.RLIM_INFINITY))
        assert r.break_range(0, 8) == 8               # below the limit: fine
        try:
            r.break_range(10, 20)                      # crosses the limit
            raise AssertionError("break_range past RLIMIT_FSIZE did not fail")
        except OSError as e:
            assert e.errno == errno.EFBIG, e
        st = r.states()
        assert st == bytes(8) + bytes([_native.MERGED]) * 56, st   # merged or private, nothing between
        assert (a == data).all()
        assert r.merged_pages() == _native.merged_pages() == 56
        assert r.allocated_bytes() == 8 * P            # the failed copy was punched again
        a[12 * P] = 1                                  # a COW break below the limit still works
        print("ok", flush=True)
        a[40 * P] = 1                                  # past it: one line, then SIGBUS
        print("not reached", flush=True)
    """, faulthandler=True, timeout=30)
    assert not res.timed_out
    assert res.stdout == "ok\n"
    assert res.returncode == -signal.SIGBUS, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr                 # one clear line, no faulthandler dump
    assert lines[0].startswith("shmdedup: cannot break copy-on-write of merged page at 0x")
    assert "EFBIG" in lines[0] and "SIGBUS" in lines[0]


MAPPING_LIMIT_SETUP = """
import mmap                      # now: importing needs mappings too
npages = LIMIT + 1000            # enough even pages to use up every mapping
r = Region(npages * P)
a = r.ndarray()
a[:] = 0x11
a[:3 * P] = np.arange(3 * P) % 251
run = a[:3 * P].copy()
seg = StableSegment(chunk_pages=1024)
slot = seg.alloc(4)
seg.write(slot, run.tobytes() + b"\\x11" * P)
fd = seg.readonly_fd(); sv = _native.StableView(fd); os.close(fd)
assert r.merge(sv, np.array([0, 3, slot], dtype=np.int64).tobytes()) == b"\\x01" * 3
# Scattered single pages onto one slot: two more mappings each, until none are left.
singles = np.array([(i, 1, slot + 3) for i in range(10, npages, 2)], dtype=np.int64)
res = r.merge(sv, singles.tobytes())
assert res.count(0) > 0, "never reached vm.max_map_count"   # refused, not failed
del singles, res
merged = r.merged_pages()
allocated = r.allocated_bytes()
# Use up the last mappings (freed temporaries gave some back): one-page
# anonymous maps through libc (Python objects may need mappings of their own),
# alternately protected so that none coalesce; then give HEADROOM back (each
# munmap leaves a hole: one mapping fewer).
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
fillers = [0] * 4096
nfill = 0
while nfill < len(fillers):
    p_ = libc.mmap(None, P, 1 | 2 * (nfill % 2), 0x22, -1, 0)   # MAP_PRIVATE | MAP_ANONYMOUS
    if p_ in (None, 2**64 - 1):
        break
    fillers[nfill] = p_
    nfill += 1
assert HEADROOM <= nfill < len(fillers), nfill
for i in range(nfill - HEADROOM, nfill):
    libc.munmap(fillers[i], P)
def release_fillers():
    for i in range(nfill - HEADROOM):
        libc.munmap(fillers[i], P)
"""


def mapping_limit() -> int:
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    if limit > 300_000:
        pytest.skip(f"vm.max_map_count is {limit}: too many mappings to exhaust quickly")
    return limit


@pytest.mark.parametrize("how", ["trap", "break_range"])
def test_break_in_a_run_at_the_mapping_limit_breaks_the_whole_run(how: str) -> None:
    # Splitting the middle page out of a 3-page run needs two more mappings;
    # with fewer left the core breaks the whole run with one mmap, which adds
    # none.  Measured on kernel 6.18, counting from where a new one-page mmap
    # fails: that whole-run mmap still needs 1 spare mapping (MAP_FIXED sets up
    # the new mapping before it unmaps the old), the split needs 2, so the
    # test leaves exactly 1.  Other kernels may split instead: also correct.
    limit = mapping_limit()
    setup = MAPPING_LIMIT_SETUP.replace("LIMIT", str(limit)).replace("HEADROOM", "1")
    res = run_child(setup + f"""
if "{how}" == "trap":
    a[P + 5] = 0xAB
    run[P + 5] = 0xAB
    broken = None
else:
    broken = r.break_range(1, 1)
states = r.states()[:3]
release_fillers()                # mappings back: Python may allocate again
assert bytes(a[:3 * P]) == run.tobytes() and bytes(a[3 * P:12 * P]) == b"\\x11" * 9 * P
assert states[1] == _native.PRIVATE, states
whole = states == bytes(3)
assert whole or states == bytes([_native.MERGED, _native.PRIVATE, _native.MERGED]), states
n = 3 if whole else 1
assert r.merged_pages() == _native.merged_pages() == merged - n
assert (r.breaks, broken) == ((n, None) if "{how}" == "trap" else (0, n)), (r.breaks, broken)
assert r.allocated_bytes() == allocated + n * P
print("whole run" if whole else "split")
""", timeout=120)
    res.check()
    assert res.stdout in ("whole run\n", "split\n")
    if os.uname().release.startswith("6.18"):
        assert res.stdout == "whole run\n"  # measured here: the fallback is what ran


@pytest.mark.parametrize("how", ["trap", "break_range"])
def test_break_with_no_mapping_left(how: str) -> None:
    # Nothing can be remapped: an explicit break raises OSError(ENOMEM) with
    # every page still merged or private, correct, and no backing memory kept
    # (the whole-run retry copied the neighbours too: punched again); a COW
    # fault ends the process with SIGBUS and one line.  Never wrong bytes.
    limit = mapping_limit()
    setup = MAPPING_LIMIT_SETUP.replace("LIMIT", str(limit)).replace("HEADROOM", "0")
    res = run_child(setup + f"""
import errno
if "{how}" == "trap":
    sys.stdout.write("writing\\n"); sys.stdout.flush()
    a[P + 5] = 0xAB
    err = None
else:
    try:
        r.break_range(1, 1)
        err = 0
    except OSError as e:
        err = e.errno
states = r.states()[:3]
release_fillers()
if err == errno.ENOMEM:
    assert states == bytes([_native.MERGED]) * 3, states
    assert bytes(a[:3 * P]) == run.tobytes()
    assert r.merged_pages() == _native.merged_pages() == merged
    assert r.allocated_bytes() == allocated, (r.allocated_bytes() - allocated) // P
print("refused" if err else "broke")
""", timeout=120)
    assert not res.timed_out
    if how == "trap" and res.returncode != 0:
        assert res.returncode == -signal.SIGBUS, res.stderr
        assert res.stdout == "writing\n"
        assert res.stderr.startswith("shmdedup: cannot break copy-on-write of merged page at 0x")
        assert "ENOMEM" in res.stderr and len(res.stderr.splitlines()) == 1
    else:
        res.check()
        assert res.stdout.endswith("refused\n" if how == "break_range" else "broke\n")


# ---- fork ---------------------------------------------------------------------------------

def test_fork_child_gets_regionclosederror_parent_untouched() -> None:
    res = run_child("""
        import hashlib, multiprocessing as mp
        from shmdedup.errors import RegionClosedError
        r, a, data, seg, sv = merged_region(16)
        r.break_range(8, 8)                    # half merged, half private
        before = (hashlib.sha256(a).hexdigest(), r.states())

        def touch_region(q):
            errors = []
            for name, f in [("memoryview", lambda: memoryview(r)), ("ndarray", lambda: r.ndarray()),
                            ("advise", lambda: r.advise(12)), ("prepare_write", lambda: r.prepare_write()),
                            ("states", lambda: r.states()), ("merge", lambda: r.merge(sv, b"")),
                            ("merged_pages", lambda: r.merged_pages())]:
                try:
                    f()
                    errors.append((name, "no error"))
                except RegionClosedError as e:
                    errors.append((name, "RegionClosedError"))
                except Exception as e:
                    errors.append((name, repr(e)))
            errors.append(("closed", r.closed))
            r.close()                          # drops the child's fds only
            q.put(errors)

        def write_through_old_view():
            a[0] = 1                           # the mapping is gone in the child: SIGSEGV

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=touch_region, args=(q,))
        p.start()
        errors = q.get(timeout=30)
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        bad = [e for e in errors if e[1] not in ("RegionClosedError", True)]
        assert not bad, bad
        p = ctx.Process(target=write_through_old_view)
        p.start()
        p.join(30)
        assert p.exitcode == -11, p.exitcode   # died rather than diverge silently
        assert (hashlib.sha256(a).hexdigest(), r.states()) == before
        assert (a == data).all() and r.merged_pages() == 8 and not r.closed
        a[0] = 9                               # the parent's COW still works
        assert r.breaks == 1
        print("ok")
    """, timeout=60)
    res.check()
    assert res.stdout == "ok\n"
