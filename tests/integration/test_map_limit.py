"""The mapping limit: vm.max_map_count binds, the coordinator's budget holds.

Every merged run costs a worker up to two mappings (VMAs), and past
vm.max_map_count (65,530) any mmap or mprotect that needs a new one fails with
ENOMEM: in the worker's own code too (a large numpy array, a thread stack).
The coordinator keeps each worker under ``max_mappings`` (budget.py); the C
core, should a break still hit the limit, maps the whole merged stretch with
one mmap, and in the trap, when even that fails (past the limit), unmaps the
stretch and maps it again (sd_break.c).

Checked from outside: the workers' /proc/<pid>/maps (lines in the region's
address range, and in all), the allocated blocks of their backing objects
through /proc/<pid>/fd, and the coordinator's statistics; and from inside:
every byte, after writes to every merged page.
"""

from __future__ import annotations

import os
import signal

import pytest

from shmdedup.coordinator.scan.budget import PROCESS_MAPPINGS
from shmdedup.controls import default_max_mappings
from tests.helpers import Worker, run_python, vma_count
from tests.integration.conftest import PAGE, wait_stats

with open("/proc/sys/vm/max_map_count") as _f:
    MAX_MAP_COUNT = int(_f.read())

# Even pages: the same in every worker (and distinct from each other); odd
# pages: this worker's own.  Merged, that is one run per even page: two
# mappings each, so N pages need N mappings (twice the limit for N = 128 Ki).
SCATTERED = r"""
import os, threading
import numpy as np
from shmdedup import MERGEABLE, PAGE_SIZE as P, Region, _native

def build(npages, wid):
    # Only the first 4 words of a page are not zero: the expected copy is small.
    global r, a, expected
    r = Region(npages * P)
    a = r.ndarray(np.uint64, (npages, P // 8))
    expected = np.zeros((npages, 4), np.uint64)
    expected[:, 0] = np.arange(npages)
    expected[:, 1] = 0x5EED
    expected[1::2, 2] = wid + 1
    a[:, :4] = expected
    r.advise(MERGEABLE)
    return {"pid": os.getpid(), "fd": r.backing_fd, "address": r.address, "size": r.size}

def intact():
    return bool(np.array_equal(a[:, :4], expected)) and not a[:, 4:].any()

def merged():
    return int(np.count_nonzero(np.frombuffer(r.states(), np.uint8) == _native.MERGED))

def still_allocates():
    # What a program does that needs new mappings: big arrays, a thread.
    arrays = [np.ones(1 << 18) for _ in range(64)]          # 2 MiB each: mmap'd by malloc
    t = threading.Thread(target=lambda: None)
    t.start(); t.join()
    return sum(len(x) for x in arrays)

def write_every_merged_page():
    pages = np.flatnonzero(np.frombuffer(r.states(), np.uint8) == _native.MERGED)
    a[pages, 3] = 0xC0FFEE
    expected[pages, 3] = 0xC0FFEE
    return len(pages), r.breaks, intact()
"""


def region_vmas(pid: int, address: int, size: int) -> int:
    """Mappings of /proc/<pid>/maps that start inside [address, address + size)."""
    n = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            start = int(line.split("-", 1)[0], 16)
            n += address <= start < address + size
    return n


def blocks(info: dict) -> int:
    """Pages the worker's backing object holds, from outside."""
    return os.stat(f"/proc/{info['pid']}/fd/{info['fd']}").st_blocks * 512 // PAGE


def start_workers(n: int, npages: int) -> list[tuple[Worker, dict]]:
    out = []
    for wid in range(n):
        w = Worker(setup=SCATTERED)
        out.append((w, w.call("result = build(npages, wid)", npages=npages, wid=wid, timeout=120)))
    return out


def settled(c, timeout: float = 180) -> dict:
    """Wait until nothing is in flight and every worker's merged pages stay
    the same over two full scans."""
    last = None
    def same(s: dict) -> bool:
        nonlocal last
        key = tuple(sorted((w["pid"], w["ksm_merging_pages"]) for w in s["workers"]))
        idle = all(w["requests"] == 0 for w in s["workers"])
        done, last = idle and key == last, key if idle else None
        return done
    return wait_stats(c, same, timeout, "merging to settle")


def per_worker(s: dict) -> dict[int, dict]:
    return {w["pid"]: w for w in s["workers"]}


def test_default_budget_keeps_scattered_duplicates_under_max_map_count(coordinator) -> None:
    """2 workers x 128 Ki pages (512 MiB), every other page the same in both:
    merged without a budget that is 128 Ki mappings per worker, twice the
    limit.  With the default budget each worker stays under it (seen in
    /proc/<pid>/maps), memory is saved as far as the budget allows, programs
    still allocate, and writes to merged pages work."""
    npages = 128 * 1024
    c = coordinator(pages_to_scan=20000, sleep_millisecs=0)
    limit = c.stats()["max_mappings"]
    assert limit == default_max_mappings() < MAX_MAP_COUNT
    workers = start_workers(2, npages)
    wait_stats(c, lambda s: s["pages_skipped_budget"] > 0, 240, "the budget to turn merges away")
    s = settled(c)
    ws = per_worker(s)
    assert s["last_error"] == ""
    expected_merges = (limit - PROCESS_MAPPINGS) // 2       # two mappings each
    for w, info in workers:
        est = ws[info["pid"]]["mappings_estimate"]
        merged = w.call("result = merged()")
        assert merged == ws[info["pid"]]["ksm_merging_pages"]
        assert merged >= expected_merges - 2000, (merged, expected_merges)
        # From outside: under the budget and the limit, and the estimate is an
        # upper bound that is exact for the region itself.
        total = vma_count(info["pid"])
        assert total <= est <= limit < MAX_MAP_COUNT, (total, est, limit)
        in_region = region_vmas(info["pid"], info["address"], info["size"])
        assert in_region == est - PROCESS_MAPPINGS - 1, (in_region, est)   # - 1: the state bytes
        assert in_region == 2 * merged + 1 or in_region == 2 * merged, (in_region, merged)
        # Memory saved where the budget allowed: the merged pages left the backing.
        assert blocks(info) == npages - merged
        # No ENOMEM reaches the program: it still gets new mappings.
        assert w.call("result = still_allocates()", timeout=60) == 64 << 18
    counts = {w.call("result = merged()") for w, _ in workers}
    assert len(counts) == 1, counts       # pairs merge both sides or neither
    # Writes to every merged page work, and give their mappings back (run=0:
    # the pages written alike in both would merge again).
    c.set("run", 0)
    for w, info in workers:
        n, breaks, intact = w.call("result = write_every_merged_page()", timeout=120)
        assert n > 0 and intact, (n, breaks, intact)
        assert vma_count(info["pid"]) < 2000
    for w, _ in workers:
        assert w.close() == 0


def test_small_max_mappings_holds_and_raising_it_resumes_merging(coordinator) -> None:
    """max_mappings set low: each worker's region gets at most the mappings
    the control leaves after PROCESS_MAPPINGS, seen from outside; raising it
    at run time lets merging continue."""
    npages = 8192
    room = 600
    c = coordinator(pages_to_scan=20000, sleep_millisecs=0, max_mappings=PROCESS_MAPPINGS + room)
    workers = start_workers(2, npages)
    wait_stats(c, lambda s: s["pages_skipped_budget"] > 0, 120, "the budget to turn merges away")
    s = settled(c)
    ws = per_worker(s)
    first = {}
    for w, info in workers:
        in_region = region_vmas(info["pid"], info["address"], info["size"])
        assert in_region + 1 <= room, in_region                  # + 1: the state bytes
        assert ws[info["pid"]]["mappings_estimate"] <= PROCESS_MAPPINGS + room
        first[info["pid"]] = w.call("result = merged()")
        assert room // 2 - 10 <= first[info["pid"]] <= room // 2, first
        assert blocks(info) == npages - first[info["pid"]]
    skipped = s["pages_skipped_budget"]
    c.set("max_mappings", PROCESS_MAPPINGS + 3 * room)
    pids = [info["pid"] for _, info in workers]
    wait_stats(c, lambda s: min(per_worker(s)[p]["ksm_merging_pages"] for p in pids) > room // 2, 120,
               "merging to resume")
    s = settled(c)
    assert s["pages_skipped_budget"] > skipped
    for w, info in workers:
        merged = w.call("result = merged()")
        assert 3 * room // 2 - 10 <= merged <= 3 * room // 2
        assert region_vmas(info["pid"], info["address"], info["size"]) + 1 <= 3 * room
    # Lowering it unmerges nothing: it only stops further merges.
    c.set("max_mappings", PROCESS_MAPPINGS)
    c.wait_full_scans(2)
    assert all(w.call("result = merged()") >= 3 * room // 2 - 10 for w, _ in workers)
    for w, _ in workers:
        _, _, intact = w.call("result = write_every_merged_page()")
        assert intact
        assert w.close() == 0


# ---- the C core at the limit ------------------------------------------------------

# A child merges 64 pages onto consecutive slots (one mapping), then fills its
# address space with mappings up to vm.max_map_count.  A break in the middle of
# the run would split it (two more mappings): the kernel refuses, and the C core
# breaks the whole run with one mmap instead, which replaces mappings and adds
# none.
AT_THE_LIMIT = """
import ctypes, errno, os, sys
import numpy as np
from shmdedup import _native
from shmdedup.worker.region import Region, PAGE_SIZE as P
from shmdedup.coordinator.scan.stable import StableSegment

def merged_run(n, seed):
    # A region of n random pages, all merged onto consecutive stable slots.
    data = np.random.default_rng(seed).integers(0, 256, (n, P), dtype=np.uint8)
    r = Region(n * P)
    a = r.ndarray(np.uint8, (n, P))
    a[:] = data
    seg = StableSegment(chunk_pages=n)
    slot = seg.alloc(n)
    seg.write(slot, data)
    fd = seg.readonly_fd(); sv = _native.StableView(fd); os.close(fd)
    assert r.merge(sv, np.array([0, n, slot], dtype=np.int64).tobytes()) == b"\\x01" * n
    return r, a, data, (seg, sv)

N = 64
r, a, data, keep = merged_run(N, 5)

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAX = int(open("/proc/sys/vm/max_map_count").read())

def map_count():
    # Line by line: at the limit a big read would need a mapping of its own.
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            n += "[vsyscall]" not in line           # not in mm->map_count
    return n

# One reserved area; mapping every other page of it read-only splits it.  No
# Python object is kept per mapping (a growing list would need mappings too).
RESERVE = 2 * (MAX + 10) * P
base = libc.mmap(None, RESERVE, 0, 0x22, -1, 0)                   # PROT_NONE, private anonymous
k = 0
while k < MAX + 10 and libc.mmap(base + 2 * k * P, P, 1, 0x32, -1, 0) not in (None, 2**64 - 1):
    k += 1                                                         # PROT_READ, MAP_FIXED
# Exactly at the limit: splitting a mapping fails, replacing one does not.
while map_count() > MAX:
    k -= 1
    libc.munmap(base + 2 * k * P, P)
at_limit = map_count()
RESULT
libc.munmap(base, RESERVE)                                         # give the mappings back
print(at_limit - MAX, *outcome)
print(r.merged_pages(), bool(np.array_equal(a, data)), r.allocated_bytes() // P)
"""


@pytest.mark.parametrize("how", ["write", "break_range"])
def test_break_at_max_map_count_breaks_the_whole_run(how: str) -> None:
    result = {
        # Through the trap (the expected copy changes in place: no new memory).
        "write": "a[20, 5] ^= 0xff; data[20, 5] ^= 0xff; outcome = [r.breaks]",
        "break_range": "outcome = [r.break_range(20, 1)]",
    }[how]
    res = run_python(AT_THE_LIMIT.replace("RESULT", result), timeout=120)
    res.check()
    first, second = res.stdout.splitlines()
    over, got = first.split()
    assert over == "0"                       # the test really ran at the limit
    # One faulting page, or break_range asked for one: both broke all 64 (the
    # split was refused, the whole run went in one mmap; r.breaks counts the
    # pages the trap broke).
    assert got == "64", res.stdout
    assert second == "0 True 64", res.stdout
    assert res.stderr == ""



# Past the limit through the worker's own breaks: writes in random order split
# a merged run into a mapping per page until vm.max_map_count.  A failed split
# can leave the count above the limit (the kernel keeps the pieces), and then
# every mmap fails, replacing ones too: the trap unmaps the merged stretch and
# maps it again, while a reader thread keeps reading pages of the run (one that
# falls into the unmapped moment waits in the trap).  It used to end the
# process with SIGBUS ("cannot break copy-on-write ... ENOMEM").
RANDOM_PAST_THE_LIMIT = AT_THE_LIMIT.split("# One reserved area")[0] + """
import threading
N2 = 4096
r2, a2, data2, keep2 = merged_run(N2, 7)
order = np.random.default_rng(8).permutation(N2).tolist()
probe = np.random.default_rng(9).integers(0, N2, 1 << 16).tolist()
# Leave 1000 mappings below the limit: the writes need ~2 per page.
RESERVE = 2 * MAX * P
base = libc.mmap(None, RESERVE, 0, 0x22, -1, 0)
want = (MAX - 1000 - map_count()) // 2          # each page mapped in it adds two
for k in range(want):
    assert libc.mmap(base + 2 * k * P, P, 1, 0x32, -1, 0) not in (None, 2**64 - 1)
assert MAX - 1003 <= map_count() <= MAX - 998, map_count()
stop, bad, reads = threading.Event(), [0], [0]

def reader():
    while not stop.is_set():
        for p in probe:
            bad[0] += a2[p, 1:64].tobytes() != data2[p, 1:64].tobytes()
            reads[0] += 1
            if stop.is_set():
                break

t = threading.Thread(target=reader)
t.start()
peak = 0
for i, p in enumerate(order):
    a2[p, 0] ^= 0xff
    data2[p, 0] ^= 0xff
    if i % 256 == 0:
        peak = max(peak, map_count())
stop.set()
t.join()
libc.munmap(base, RESERVE)
print(peak >= MAX - 2, r2.merged_pages(), bool(np.array_equal(a2, data2)), bad[0], reads[0] > 0)
"""


def test_random_writes_past_the_limit_break_through_an_unmapped_moment() -> None:
    res = run_python(RANDOM_PAST_THE_LIMIT, timeout=300)
    assert not res.timed_out
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    # The run reached the limit; every page broke, every byte right, and the
    # reader never saw a wrong byte (nor crashed on an unmapped page).
    assert res.stdout.split() == ["True", "0", "True", "0", "True"], res.stdout
    assert res.stderr == ""


# The same fallback, and what happens when even it fails, forced with the test
# hook (_test_fail_mmaps: the next n copy-back mmaps fail with ENOMEM).
HOOK = """
import os
import numpy as np
from shmdedup import _native
from shmdedup.worker.region import Region, PAGE_SIZE as P
from shmdedup.coordinator.scan.stable import StableSegment

N = 64
data = np.random.default_rng(6).integers(0, 256, (N, P), dtype=np.uint8)
r = Region(N * P)
a = r.ndarray(np.uint8, (N, P))
a[:] = data
seg = StableSegment(chunk_pages=N)
slot = seg.alloc(N)
seg.write(slot, data)
fd = seg.readonly_fd(); sv = _native.StableView(fd); os.close(fd)
runs = np.array([(0, 32, slot), (40, 24, slot + 40)], dtype=np.int64)   # pages 32-39 stay private
assert r.merge(sv, runs.tobytes()) == b"\\x01" * 56

def state():
    s = np.frombuffer(r.states(), np.uint8)
    return [int((s == _native.MERGED).sum()), int((s == _native.PRIVATE).sum()),
            bool(np.array_equal(a, data)), r.allocated_bytes() // P]
"""


def test_hook_one_failed_mmap_breaks_the_merged_stretch() -> None:
    res = run_python(HOOK + """
_native._test_fail_mmaps(1)
print(r.break_range(10, 1), state())      # the run [0, 32) in one mmap
_native._test_fail_mmaps(1)
a[50, 0] ^= 1; data[50, 0] ^= 1          # the trap: the run [40, 64), 24 pages
print(r.breaks, state())
""")
    res.check()
    assert res.stdout.splitlines() == ["32 [24, 40, True, 40]", "24 [0, 64, True, 64]"]
    assert res.stderr == ""


def test_hook_failed_fallback_raises_enomem_and_leaves_pages_merged() -> None:
    res = run_python(HOOK + """
_native._test_fail_mmaps(2)
try:
    r.break_range(10, 1)
except OSError as e:
    print("OSError", e.errno)
print(state())                            # all merged, no copy left behind in the backing
print(r.break_range(10, 1), state())      # the hook spent: a plain split
""")
    res.check()
    assert res.stdout.splitlines() == ["OSError 12", "[56, 8, True, 8]", "1 [55, 9, True, 9]"]


def test_hook_failed_fallback_in_the_trap_maps_the_stretch_through_an_unmapped_moment() -> None:
    # The split and the whole-stretch mmap fail: the trap unmaps the stretch
    # (the run [0, 32)) and maps it again.
    res = run_python(HOOK + """
_native._test_fail_mmaps(2)
a[10, 0] ^= 1; data[10, 0] ^= 1
print(r.breaks, state())
""")
    res.check()
    assert res.stdout.splitlines() == ["32 [24, 40, True, 40]"]
    assert res.stderr == ""


def test_hook_failed_fallback_in_the_trap_ends_with_sigbus_and_one_line() -> None:
    # Even the mmap after the unmap keeps failing (1000 tries): SIGBUS.
    res = run_python(HOOK + """
_native._test_fail_mmaps(100000)
print("writing", flush=True)
a[10, 0] ^= 1
print("wrote past a failed break", flush=True)
""")
    assert not res.timed_out
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stderr)
    assert res.stdout == "writing\n"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("shmdedup: cannot break copy-on-write of merged page at 0x")
    assert "ENOMEM" in lines[0] and "vm.max_map_count" in lines[0] and "SIGBUS" in lines[0]
