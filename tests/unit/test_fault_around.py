"""Copy-on-write fault-around: a sequential writer breaks pages ahead.

A write fault on the page right after the previous trap break breaks twice as
many pages as that break did (1, 2, 4, ... up to ``cow_fault_around()``), with
one copy and one remap.  Checked in real worker processes (the test process
plays the coordinator, as in test_cow.py): which pages are private after each
write, their bytes, and the backing's allocated blocks from outside.  The rest
of the suite runs with fault-around off (tests/conftest.py): here each worker
switches it on.
"""

from __future__ import annotations

import signal

import pytest

import shmdedup
from shmdedup import _native
from tests.helpers import child_env, no_shm_leftovers, reaper, run_python  # noqa: F401
from tests.unit.test_cow import SAME_PAGES_THREADS, Harness, content, items, merge, run_child, runs

P = _native.PAGE_SIZE

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def merged_worker(harness: Harness, npages: int, seed: int, fault_around: int = 64):
    """A worker whose region of content(seed) is merged, in runs of 64."""
    w, _ = harness.worker(npages, seed=seed)
    slot = harness.store(content(seed, npages))
    assert merge(w, runs(0, npages, slot, 64)) == b"\x01" * npages
    w.call("from shmdedup import cow_fault_around; cow_fault_around(n)", n=fault_around)
    return w


# Writes one byte to each page of `order`, one at a time, and records how many
# pages are private after each write; then checks every byte of the region.
WRITE_EACH = """
states = lambda: np.frombuffer(r.states(), np.uint8)
expected = orig.copy()
private_after = []
for p in order:
    a[p * P + 7] ^= 0xFF
    expected[p * P + 7] ^= 0xFF
    private_after.append(int(np.count_nonzero(states() == _native.PRIVATE)))
result = dict(private_after=private_after, breaks=r.breaks, exact=bool((a == expected).all()),
              private=[int(i) for i in np.flatnonzero(states() == _native.PRIVATE)])
"""


def test_sequential_writes_break_ahead_in_doubling_windows(harness: Harness) -> None:
    npages = 512
    w = merged_worker(harness, npages, seed=41)
    out = w.call(WRITE_EACH, order=list(range(300)))
    # Breaks of 1, 2, 4, ... 64, 64, ... pages: each fault lands right after the last one.
    ends, end, width = set(), 0, 1
    while end < 300:
        end += width
        ends.add(end)
        width = min(2 * width, 64)
    expected_private = [min(e for e in ends if e > p) for p in range(300)]
    assert out["private_after"] == expected_private
    last = expected_private[-1]                 # 319: the last window reaches past page 299
    assert out["private"] == list(range(last))
    assert out["breaks"] == last
    assert out["exact"]
    assert harness.allocated(w) == last * P     # seen from outside: the broken pages only


def test_a_window_of_zero_pages_allocates_only_the_written_pages(harness: Harness) -> None:
    """A window is mapped back populated (its pages are about to be written),
    except a window of zero pages: their backing is a hole, and populating it
    would allocate every page broken ahead.  Seen from outside: the backing
    holds the written pages only."""
    npages = 256
    w, _ = harness.worker(npages, seed=43)
    w.call("a[:] = 0; orig[:] = 0")
    assert merge(w, items(*[(i, 64, -1) for i in range(0, npages, 64)])) == b"\x01" * npages
    assert harness.allocated(w) == 0
    w.call("from shmdedup import cow_fault_around; cow_fault_around(64)")
    assert w.call("for p in range(100): a[p * P + 7] = 1\nresult = r.breaks") == 127   # windows 1, 2, ... 64
    assert harness.allocated(w) == 100 * P      # before anything reads the holes
    assert w.call("result = bool((a[:100 * P].reshape(100, P)[:, 7] == 1).all()) and not a.reshape(-1, P)[:, 8:].any()")


@pytest.mark.parametrize("order", ["descending", "every other page"])
def test_writes_that_do_not_follow_the_last_break_break_one_page(harness: Harness, order: str) -> None:
    npages = 256
    w = merged_worker(harness, npages, seed=42)
    pages = list(range(200, 100, -1)) if order == "descending" else list(range(0, 200, 2))
    out = w.call(WRITE_EACH, order=pages)
    assert out["private_after"] == list(range(1, len(pages) + 1))
    assert out["private"] == sorted(pages)
    assert out["breaks"] == len(pages) and out["exact"]
    assert harness.allocated(w) == len(pages) * P


def test_fault_around_off_breaks_exactly_the_written_pages(harness: Harness) -> None:
    w = merged_worker(harness, 256, seed=43, fault_around=1)
    out = w.call(WRITE_EACH, order=list(range(150)))
    assert out["private_after"] == list(range(1, 151))
    assert out["private"] == list(range(150)) and out["breaks"] == 150 and out["exact"]


def test_window_stops_at_pages_that_are_not_merged(harness: Harness) -> None:
    """Merged, private, merged: the window never claims the private stretch,
    and writing through all of it breaks each merged page once."""
    npages = 192
    w, _ = harness.worker(npages, seed=44)
    data = content(44, npages)
    slot = harness.store(data)
    merge_items = runs(0, 64, slot, 64) + runs(128, 64, slot + 128, 64)
    assert merge(w, merge_items) == b"\x01" * 128
    w.call("from shmdedup import cow_fault_around; cow_fault_around(64)")
    out = w.call(WRITE_EACH, order=list(range(npages)))
    assert out["breaks"] == 128 and out["exact"]
    assert out["private"] == list(range(npages))
    # Pages 64-127 were private all along.  The window at page 63 asked for
    # 64 pages and got one: nothing past the private stretch (128 = 64 + 64);
    # page 128 does not follow the last break: a window of one again.
    assert out["private_after"][62] == 63 + 64
    assert out["private_after"][63] == 64 + 64
    assert out["private_after"][128:131] == [129, 131, 131]
    assert harness.allocated(w) == npages * P


def test_four_threads_writing_every_page_break_each_once(harness: Harness) -> None:
    """Four threads write every page in order, at once: windows claimed by one
    thread are waited on by the others, each page is broken once."""
    npages = 512
    w = merged_worker(harness, npages, seed=12)
    equal, breaks, merged = w.call(SAME_PAGES_THREADS)
    assert equal and breaks == npages and merged == 0


def test_cow_fault_around_arguments() -> None:
    old = shmdedup.cow_fault_around()
    try:
        assert shmdedup.cow_fault_around(8) == old
        assert shmdedup.cow_fault_around() == 8
        for bad in (0, -1, _native.FAULT_AROUND_LIMIT + 1, "4", 2.0, True):
            with pytest.raises(shmdedup.ArgumentError, match="pages"):
                shmdedup.cow_fault_around(bad)
        assert shmdedup.cow_fault_around() == 8          # a bad value changes nothing
    finally:
        shmdedup.cow_fault_around(old)


@pytest.mark.parametrize("value, expected, warns", [("", 64, False), ("16", 16, False),
                                                     ("1", 1, False), ("lots", 64, True),
                                                     ("0", 64, True), ("5000", 64, True)])
def test_environment_sets_the_default(value: str, expected: int, warns: bool) -> None:
    env = child_env({"SHMDEDUP_COW_FAULT_AROUND": value})
    r = run_python("import shmdedup; print(shmdedup.cow_fault_around())", env=env)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == expected
    assert ("SHMDEDUP_COW_FAULT_AROUND" in r.stderr) == warns, r.stderr


def test_a_window_that_does_not_fit_falls_back_to_the_faulting_page() -> None:
    """RLIMIT_FSIZE (the same path as a nearly full /dev/shm) lets a window's
    copy fail where the faulting page alone fits: the trap breaks that page
    alone and the program goes on; only a page that cannot be copied at all
    ends the process (SIGBUS, one line), as without fault-around."""
    res = run_child("""
        import resource, signal
        from shmdedup import cow_fault_around
        cow_fault_around(64)
        r, a, data, seg, sv = merged_region(64)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * P, resource.RLIM_INFINITY))
        for p in range(20):          # windows 1, 2, 4, 8, then 16 pages past the limit
            a[p * P] ^= 0xFF
            data[p * P] ^= 0xFF
        st = r.states()
        assert st == bytes(20) + bytes([_native.MERGED]) * 44, st
        assert (a == data).all() and r.breaks == 20
        assert r.allocated_bytes() == 20 * P      # the failed window's copy was punched
        print("ok", flush=True)
        a[20 * P] = 1                # not even one page fits: one line, then SIGBUS
        print("not reached", flush=True)
    """, timeout=30)
    assert not res.timed_out
    assert res.stdout == "ok\n", res.stderr
    assert res.returncode == -signal.SIGBUS, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "EFBIG" in lines[0], res.stderr
