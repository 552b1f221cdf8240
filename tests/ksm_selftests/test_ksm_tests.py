"""ksm_tests.c, ported to regions.

The kernel program runs one test per invocation (run_vmtests.sh calls it
with -M, -U, -Z, -N, -P, -H, -D, -C and options), after setting run=2,
sleep_millisecs=0 and pages_to_scan=page_count.  Each is a parametrised
case here, with the same assertions: ``assert_ksm_pages_count`` compares
pages_shared and pages_sharing with what max_page_sharing allows; the timing
cases pass when the work completes within the scan time limit, and print the
speed.  -t (merge type) is ``mode``: advice ("madvise") or process-wide
merging ("prctl").  The cases that cannot apply (-N, -H, -a) are listed in
docs/ksm-selftests.md.
"""

from __future__ import annotations

import time

import pytest

from tests.ksm_selftests.conftest import MiB

SCAN_LIMIT = 120        # s: the kernel's KSM_SCAN_LIMIT_SEC_DEFAULT


def assert_ksm_pages_count(s: dict, dupl_page_count: int) -> None:
    """The kernel's check: n duplicates, at most max_page_sharing sharers per
    stable page; a remainder of one page finds no partner and stays unmerged."""
    mps = s["max_page_sharing"]
    got = (s["pages_shared"], s["pages_sharing"])
    if dupl_page_count % mps in (0, 1):
        shared = dupl_page_count // mps
        want = (shared, shared * (mps - 1))
    else:
        shared = dupl_page_count // mps + 1
        want = (shared, dupl_page_count - shared)
    assert got == want, f"{dupl_page_count} duplicates, max_page_sharing {mps}: " \
                        f"(pages_shared, pages_sharing) {got}, want {want}"


def setup(c, w, page_count: int, max_page_sharing: int = 256) -> None:
    """The kernel's main(): run=2, sleep_millisecs=0, pages_to_scan=page_count."""
    c.set("run", 2)
    c.set("pages_to_scan", page_count)
    c.set("max_page_sharing", max_page_sharing)


def merge_pages(w, mode: str, npages: int, fill: str, timeout: float = SCAN_LIMIT) -> float:
    """allocate_memory + ksm_merge_pages: a region of npages (``fill`` is the
    worker code that fills array ``a``), advised or under process merging,
    run=1, two full scans.  Returns the seconds it took."""
    return w.call(f"""
r = Region(npages * P)
a = r.ndarray(np.uint8, (npages, P))
{fill}
del a
t0 = time.monotonic()
if mode == "prctl":
    shmdedup.enable_process_merging(True)
else:
    r.advise(MERGEABLE)
client.set("run", 1)
client.wait_full_scans(2, timeout=limit)
result = time.monotonic() - t0
""", npages=npages, mode=mode, limit=timeout, timeout=timeout + 60)


@pytest.mark.parametrize("mode", ["madvise", "prctl"])
@pytest.mark.parametrize("page_count, max_page_sharing", [
    (10, 256), (2, 256), (10, 4), (10, 5), (11, 10), (9, 4), (100, 10)])
def test_check_ksm_merge(ksm, mode, page_count, max_page_sharing):
    """-M [-p page_count] [-t merge type]: page_count pages of '*' merge as
    max_page_sharing allows."""
    c, w = ksm
    setup(c, w, page_count, max_page_sharing)
    took = merge_pages(w, mode, page_count, "a[:] = ord('*')")
    assert took < SCAN_LIMIT
    assert_ksm_pages_count(c.stats(), page_count)


@pytest.mark.parametrize("mode", ["madvise", "prctl"])
def test_check_ksm_unmerge(ksm, mode):
    """-U: two merged pages, one byte changed in each: KSM unmerges them by
    itself (copy-on-write), and after a full scan nothing is merged."""
    c, w = ksm
    setup(c, w, 2)
    merge_pages(w, mode, 2, "a[:] = ord('*')")
    assert_ksm_pages_count(c.stats(), 2)
    w.call("a = r.ndarray(np.uint8, (2, P)); a[0, 0] = ord('-'); a[1, 0] = ord('+'); del a")
    # Two: the full scan under way when the pages were written may have passed
    # them already; the one after it sees the breaks.
    w.call("client.wait_full_scans(2)")
    assert_ksm_pages_count(c.stats(), 0)


@pytest.mark.parametrize("use_zero_pages", [0, 1])
@pytest.mark.parametrize("mode", ["madvise", "prctl"])
def test_check_ksm_zero_page_merge(ksm, mode, use_zero_pages):
    """-Z -p 10 -z 0|1: ten written zero pages merge with each other as usual
    (use_zero_pages=0), or onto the zero page, which pages_shared and
    pages_sharing do not count (use_zero_pages=1)."""
    c, w = ksm
    page_count = 10
    setup(c, w, page_count)
    c.set("use_zero_pages", use_zero_pages)
    merge_pages(w, mode, page_count, "a[:] = 0")
    assert_ksm_pages_count(c.stats(), page_count if not use_zero_pages else 0)
    if use_zero_pages:
        assert c.stats()["ksm_zero_pages"] == page_count


def _report(what: str, mib: float, seconds: float) -> None:
    print(f"\n{what}: {mib:.0f} MiB in {seconds:.3f} s, {mib / max(seconds, 1e-9):.1f} MiB/s")


@pytest.mark.parametrize("mode", ["madvise", "prctl"])
def test_ksm_merge_time(ksm, mode):
    """-P -s size: merging a region of identical pages completes within the
    scan time limit (the kernel's run uses 100 MiB; 32 here, for a shared
    2-CPU machine)."""
    c, w = ksm
    size = 32
    npages = size * MiB // w.call("result = P")
    setup(c, w, npages)
    took = merge_pages(w, mode, npages, "a[:] = ord('*')")
    _report("merge", size, took)
    assert took < SCAN_LIMIT, "Scan time limit exceeded"
    assert_ksm_pages_count(c.stats(), npages)


@pytest.mark.parametrize("mode", ["madvise", "prctl"])
def test_ksm_unmerge_time(ksm, mode):
    """-D -s size: merge, then time advise(UNMERGEABLE) of the whole range."""
    c, w = ksm
    size = 32
    npages = size * MiB // w.call("result = P")
    setup(c, w, npages)
    merge_pages(w, mode, npages, "a[:] = ord('*')")
    took = w.call("t0 = time.monotonic(); r.advise(UNMERGEABLE); result = time.monotonic() - t0")
    _report("unmerge", size, took)
    assert took < SCAN_LIMIT
    assert w.call("result = r.merged_pages()") == 0


def test_ksm_cow_time(ksm):
    """-C: the time to write one byte into every other page of 4000, first
    unmerged, then as 2000 merged pairs (each write breaks one page)."""
    c, w = ksm
    page_count = 4000
    setup(c, w, page_count)
    unmerged = w.call("""
r = Region(npages * P)
a = r.ndarray(np.uint8, (npages, P))
a[:] = ord('*')
t0 = time.monotonic()
for i in range(0, npages - 1, 2):
    a[i, 0] = ord('-')
result = time.monotonic() - t0
""", npages=page_count)
    # 2000 pairs of duplicate pages, each pair different from the others.
    merge_pages(w, "madvise", page_count, """
for i in range(0, npages - 1, 2):
    a[i, :i // 2 + 1] = ord('+')
    a[i + 1, :i // 2 + 1] = ord('+')
""")
    assert w.call("result = r.merged_pages()") == page_count
    c.set("run", 0)     # no scan gives the broken pairs' partners back meanwhile
    merged = w.call("""
a = r.ndarray(np.uint8, (npages, P))
t0 = time.monotonic()
for i in range(0, npages - 1, 2):
    a[i, 0] = ord('-')
result = time.monotonic() - t0
""", npages=page_count)
    mib = page_count // 2 * 4096 / MiB
    _report("COW, not merged", mib, unmerged)
    _report("COW, merged", mib, merged)
    assert w.call("result = (r.merged_pages(), int(r.breaks))") == (page_count // 2, page_count // 2)
    assert w.call("result = bool((a[::2, 0] == ord('-')).all() and (a[1::2, 0] == ord('+')).all())")
