"""enable_process_merging() follows Linux's PR_SET_MEMORY_MERGE.

* on: every existing region of the process is advised mergeable at once,
  and every new one when it is allocated (``mergeable=False`` opts out);
* off: every region is unadvised and its merged pages are broken back;
* the setting survives fork (the child's new regions follow it; the parent's
  regions are not inherited) and exec of a Python child (through
  ``$SHMDEDUP_PROCESS_MERGING``).

Each case runs in a worker process (the setting is process-wide) and checks
real merging: counters, merged pages and the backing objects' blocks.
"""

from __future__ import annotations

from tests.helpers import REPO_ROOT, Worker
from tests.integration.conftest import FAST, counts, wait_stats

SETUP = r"""
import os, subprocess, sys
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P
client = shmdedup.Client(timeout=60)

def content(seed):
    return np.random.default_rng(seed).integers(0, 256, (N, P), dtype=np.uint8)

def region(seed, **kw):
    r = shmdedup.Region(N * P, **kw)
    r.ndarray(np.uint8, (N, P))[:] = content(seed)
    return r

def advised(r):
    return [(f, n) for f, n in r.advice_runs()]

def settle():
    client.wait_full_scans(2, timeout=60)
"""


def test_switching_on_advises_existing_regions_and_every_new_one(coordinator):
    N = 256
    c = coordinator(**FAST)
    w = Worker(setup=f"N = {N}\n" + SETUP)
    w.call("""
old = region(1)                       # before: not advised
assert not shmdedup.process_merging() and advised(old) == []
shmdedup.enable_process_merging()
assert shmdedup.process_merging()
new = region(1)                       # after: advised when allocated
out = region(1, mergeable=False)      # opted out
settle()
result = None
""")
    assert w.call("result = (advised(old), advised(new), advised(out))") == ([(0, N)], [(0, N)], [])
    assert w.call("result = (old.merged_pages(), new.merged_pages(), out.merged_pages())") == (N, N, 0)
    assert counts(c.stats()) == {"pages_shared": N, "pages_sharing": N}
    # Switching it on again changes nothing (as prctl does when already set):
    # a region unadvised meanwhile stays so.
    w.call("new.advise(shmdedup.UNMERGEABLE); shmdedup.enable_process_merging(True)")
    assert w.call("result = (advised(old), advised(new))") == ([(0, N)], [])
    w.call("shmdedup.enable_process_merging(False)")
    assert w.close() == 0


def test_switching_off_unmerges_and_unadvises_every_region(coordinator):
    N = 256
    c = coordinator(**FAST)
    w = Worker(setup=f"N = {N}\n" + SETUP)
    w.call("""
explicit = region(2)
explicit.advise(shmdedup.MERGEABLE)   # advised by hand, before
shmdedup.enable_process_merging()
a, b = region(2), region(3)
twin = region(3)
settle()
result = None
""")
    rs = "(explicit, a, b, twin)"
    assert w.call(f"result = [r.merged_pages() for r in {rs}]") == [N] * 4
    assert w.call(f"result = [r.allocated_bytes() for r in {rs}]") == [0] * 4
    w.call("shmdedup.enable_process_merging(False)")
    assert w.call("result = shmdedup.process_merging()") is False
    assert w.call(f"result = [(advised(r), r.merged_pages()) for r in {rs}]") == [([], 0)] * 4
    assert w.call(f"result = [r.allocated_bytes() // P for r in {rs}]") == [N] * 4
    assert w.call(f"result = all((r.ndarray(np.uint8, (N, P)) == content(s)).all() "
                  f"for r, s in zip({rs}, (2, 2, 3, 3)))")
    wait_stats(c, lambda s: counts(s) == {"pages_shared": 0, "pages_sharing": 0}
               and s["stable_pages_allocated"] == 0, 30, "every stable page to be freed")
    assert w.call("result = advised(region(4))") == []      # new ones: not advised
    assert w.close() == 0


def test_setting_survives_fork_new_regions_of_the_child_merge(coordinator):
    """The child of a fork with merging on allocates a region: advised at
    once, and it merges with the parent's twin region.  The parent's own
    regions are not inherited (unmapped in the child)."""
    N = 256
    c = coordinator(**FAST)
    w = Worker(setup=f"N = {N}\n" + SETUP)
    status = w.call("""
shmdedup.enable_process_merging()
parent_region = region(5)
settle()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        assert shmdedup.process_merging()
        assert parent_region.closed       # not inherited
        child = region(5)
        assert advised(child) == [(0, N)]
        shmdedup.Client(timeout=60).wait_full_scans(2, timeout=60)
        code = 0 if child.merged_pages() == N else 2
    finally:
        os._exit(code)
_, st = os.waitpid(pid, 0)
result = os.waitstatus_to_exitcode(st)
""")
    assert status == 0
    w.call("shmdedup.enable_process_merging(False)")
    assert w.close() == 0


EXEC_CHILD = r"""
import numpy as np, shmdedup, sys
from shmdedup import PAGE_SIZE as P
N = int(sys.argv[1])
r = shmdedup.Region(N * P)
r.ndarray(np.uint8, (N, P))[:] = np.random.default_rng(6).integers(0, 256, (N, P), dtype=np.uint8)
if shmdedup.process_merging():     # else nothing is advised: no scan would come
    shmdedup.Client(timeout=60).wait_full_scans(2, timeout=60)
print(shmdedup.process_merging(), r.advice_runs(), r.merged_pages())
"""


def test_setting_survives_exec_of_a_python_child(coordinator):
    N = 256
    coordinator(**FAST)
    w = Worker(setup=f"N = {N}\n" + SETUP)
    run_child = f"""
env = dict(os.environ, PYTHONPATH={str(REPO_ROOT)!r})
p = subprocess.run([sys.executable, "-c", {EXEC_CHILD!r}, str(N)], env=env,
                   capture_output=True, text=True, timeout=120)
assert p.returncode == 0, p.stderr
result = p.stdout.strip()
"""
    w.call("shmdedup.enable_process_merging(); twin = region(6); settle()")
    assert w.call(run_child) == f"True [(0, {N})] {N}"
    w.call("shmdedup.enable_process_merging(False)")
    assert w.call(run_child) == "False [] 0"
    assert w.close() == 0
