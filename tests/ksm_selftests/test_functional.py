"""ksm_functional_tests.c, ported to regions.

Every case keeps the kernel's assertion; where the API differs the adaptation
is said at the case (docs/ksm-selftests.md lists them, and the cases that
cannot apply).  The kernel checks that a range "does not map the same page
frame twice" through /proc/self/pagemap after unmerging; so do these (the
worker reads its own pagemap: PFNs are shown to root), and, before
unmerging, that merged pages do map one frame several times, so the check
is not vacuous.

Sizes are the kernel's: 2 MiB ranges (512 pages).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import REPO_ROOT
from tests.ksm_selftests.conftest import MiB, WORKER

PAGE = os.sysconf("SC_PAGE_SIZE")
NPAGES = 2 * MiB // PAGE


def merged_range(w, val: int = 0xCF, mode: str = "madvise", npages: int = NPAGES) -> None:
    """mmap_and_merge_range in the worker (as ``r``); the merged range must
    map page frames twice (skip if PFNs are hidden: no pagemap check then)."""
    w.call("r = mmap_and_merge_range(val, npages, mode)", val=val, npages=npages, mode=mode)
    if not w.call("result = pfns_readable(r)"):
        pytest.skip("/proc/self/pagemap shows no PFNs here (needs CAP_SYS_ADMIN)")
    assert w.call("result = range_maps_duplicates(r)"), "merged pages should share frames"


def test_unmerge(ksm):
    _, w = ksm
    merged_range(w)
    w.call("r.advise(UNMERGEABLE)")
    assert not w.call("result = range_maps_duplicates(r)"), "Pages were unmerged"


def test_unmerge_zero_pages(ksm):
    """use_zero_pages=1: zero pages merge onto the zero page, counted per
    process in ksm_zero_pages.  Adapted: /proc/self/ksm_stat is updated by
    the kernel as it goes; here the count is the coordinator's, updated when
    it next passes the pages, so each check first waits for a full scan."""
    _, w = ksm
    w.call("client.set('use_zero_pages', 1)")
    merged_range(w, val=0)
    assert w.call("result = get_my_ksm_zero_pages()") == NPAGES, \
        "'ksm_zero_pages' updated after merging"
    w.call("r.advise(UNMERGEABLE, 0, npages // 2 * P); client.wait_full_scans(1)", npages=NPAGES)
    assert w.call("result = get_my_ksm_zero_pages()") == NPAGES // 2, \
        "'ksm_zero_pages' updated after unmerging"
    # Unmerge the other half by writing to it.
    w.call("""
a = r.ndarray(np.uint32, (npages, P // 4))
for p in range(npages // 2, npages):
    a[p, 0] = p * P
client.wait_full_scans(2)   # the scan under way may have passed them before the writes
""", npages=NPAGES)
    assert w.call("result = get_my_ksm_zero_pages()") == 0, "'ksm_zero_pages' updated after write fault"
    assert not w.call("result = range_maps_duplicates(r)"), "KSM zero pages were unmerged"
    w.call("client.set('use_zero_pages', 0)")


def test_unmerge_discarded(ksm):
    """Half the range's page-table entries discarded (MADV_DONTNEED on the
    region's memory: a shared mapping keeps its content), then unmerged."""
    _, w = ksm
    merged_range(w)
    w.call("madvise(r, 0, npages // 2 * P, MADV_DONTNEED)", npages=NPAGES)
    w.call("r.advise(UNMERGEABLE)")
    assert not w.call("result = range_maps_duplicates(r)"), "Pages were unmerged"
    assert w.call("result = bool((r.ndarray(np.uint8) == 0xcf).all())")


def test_prctl(ksm):
    """PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE: enable_process_merging()
    and process_merging()."""
    _, w = ksm
    assert w.call("shmdedup.enable_process_merging(True); result = shmdedup.process_merging()") \
        is True, "PR_SET_MEMORY_MERGE=1 not effective"
    assert w.call("shmdedup.enable_process_merging(False); result = shmdedup.process_merging()") \
        is False, "PR_SET_MEMORY_MERGE=0 not effective"


def _child_status(status: int) -> str:
    return {0: "ok", 255: "unexpected PR_GET_MEMORY_MERGE result in child",
            254: "Merge in child failed"}.get(status, f"exit status {status}")


def test_prctl_fork(ksm):
    """The setting is inherited by a forked child, whose new region merges
    (test_child_ksm).  Adapted: the child talks to the coordinator over a
    connection of its own."""
    _, w = ksm
    status = w.call("""
shmdedup.enable_process_merging(True)
pid = os.fork()
if pid == 0:
    code = 1
    try:
        after_fork()
        code = test_child_ksm(npages) & 0xff
    finally:
        os._exit(code)
_, st = os.waitpid(pid, 0)
result = os.waitstatus_to_exitcode(st)
""", npages=NPAGES)
    assert _child_status(status) == "ok"
    assert w.call("shmdedup.enable_process_merging(False); result = shmdedup.process_merging()") is False


def test_prctl_fork_exec(ksm):
    """The setting survives fork and exec: the child runs a new Python
    interpreter (the kernel's re-executes its own binary), which imports
    shmdedup and runs test_child_ksm.  Adapted: it travels in the
    environment, as every exec'd Python program that imports shmdedup reads
    it."""
    _, w = ksm
    child = WORKER + "\nsys.exit(test_child_ksm(int(sys.argv[1])) & 0xff)\n"
    status = w.call("""
shmdedup.enable_process_merging(True)
env = dict(os.environ, PYTHONPATH=root)
p = subprocess.run([python, "-c", child, str(npages)], env=env, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
assert p.returncode >= 0, p.stderr
result = p.returncode
""", child=child, npages=NPAGES, root=str(REPO_ROOT), python=sys.executable, timeout=300)
    assert _child_status(status) == "ok"
    w.call("shmdedup.enable_process_merging(False)")


def test_prctl_unmerge(ksm):
    """Merged through process-wide merging, then switched off: unmerged."""
    _, w = ksm
    merged_range(w, mode="prctl")
    w.call("shmdedup.enable_process_merging(False)")
    assert not w.call("result = range_maps_duplicates(r)"), "Pages were unmerged"


def test_fork_ksm_merging_page_count(ksm):
    """ksm_merging_pages is not inherited by a forked child.  (Regions are not
    inherited at all here: the child maps none of the parent's pages.)"""
    _, w = ksm
    merged_range(w)
    status = w.call("""
pid = os.fork()
if pid == 0:
    code = 255
    try:
        after_fork()
        code = min(get_my_merging_pages(), 254)
    finally:
        os._exit(code)
_, st = os.waitpid(pid, 0)
result = os.waitstatus_to_exitcode(st)
""")
    assert status == 0, f"ksm_merging_page in child: {status}"
    assert w.call("result = get_my_merging_pages()") == NPAGES
