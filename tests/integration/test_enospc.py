"""No memory to break a page: a full tmpfs, and an unmerge cut short by a signal.

DESIGN "Failure semantics": when the shared-memory filesystem is full, a write
to a merged page must never hand back wrong bytes (the trap prints one line
and ends the process with SIGBUS), an explicit unmerge raises OSError and
leaves every page merged or private and correct, run=2 reports the error and
falls back to run=0, and the coordinator itself keeps serving.

Each scenario runs in a child in its own mount namespace with a 16 MiB tmpfs
over /dev/shm (``unshare -m``: needs root or user namespaces; skipped
otherwise), so filling it touches nothing outside.  Inside, the child runs an
embedded coordinator (a thread) and a worker process (tests.helpers.Worker)
whose region holds 512 random pages twice (1024 pages: the two halves merge
onto 512 stable pages), and reports what it saw as JSON on its last stdout
line; the worker's stderr is the child's.  The tmpfs goes away with the
namespace.

The interrupted unmerge (d) needs no full tmpfs: a child merges a region of
65536 pages and is sent SIGINT from a thread while advise(UNMERGEABLE) breaks
them (break_range checks for signals every 256 pages).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT, child_env, run_python

TMPFS_SIZE = "16m"
NPAGES = 1024            # two copies of 512 random pages
FREE_PAGES = 300         # room left in the tmpfs for (b) and (c): one 256-page chunk breaks, the next cannot


def _namespaces_work() -> str:
    """'' if a child can mount its own tmpfs over /dev/shm, else why not."""
    if not shutil.which("unshare"):
        return "no unshare(1)"
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size={TMPFS_SIZE} tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    return "" if r.returncode == 0 else f"cannot mount a private tmpfs: {r.stderr.strip()}"


_NO_NAMESPACE = _namespaces_work()
needs_namespace = pytest.mark.skipif(bool(_NO_NAMESPACE), reason=_NO_NAMESPACE or "ok")

# The worker: 512 random pages twice, and a way to check them from inside.
WORKER = r"""
import errno, os
import numpy as np
import shmdedup
from shmdedup import MERGEABLE, UNMERGEABLE, PAGE_SIZE as P, Region, _native

half = np.random.default_rng(7).integers(0, 256, (NPAGES // 2, P), dtype=np.uint8)
expected = np.concatenate((half, half))
r = Region(NPAGES * P)
a = r.ndarray(np.uint8, (NPAGES, P))
a[:] = expected
r.advise(MERGEABLE)

def layout():
    s = np.frombuffer(r.states(), np.uint8)
    return {"private": int(np.count_nonzero(s == _native.PRIVATE)),
            "merged": int(np.count_nonzero(s == _native.MERGED)),
            "intact": bool(np.array_equal(a, expected)),
            "allocated_pages": r.allocated_bytes() // P}
"""

# Runs inside the namespace: coordinator thread, worker, tmpfs filler, scenario.
RUNNER = r"""
import errno, json, os, sys, time
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P
from shmdedup.errors import ControlError
from tests.helpers import Worker, wait_for

out = {}
FILLER = "/dev/shm/filler"

def free_pages():
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize // P

def fill(leave):
    # Fill the tmpfs with another file, then give back `leave` pages of it.
    fd = os.open(FILLER, os.O_RDWR | os.O_CREAT, 0o600)
    chunk = b"\xa5" * (256 * P)
    off = 0
    while True:
        try:
            n = os.pwrite(fd, chunk, off)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            break
        off += n
    try:                       # the last partial page, if any
        while os.pwrite(fd, b"\xa5", off) == 1:
            off += 1
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    out["free_when_full"] = free_pages()
    if leave:
        off -= off % P
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert libc.fallocate(fd, 3, off - leave * P, leave * P) == 0   # PUNCH_HOLE | KEEP_SIZE
    out["free_after_fill"] = free_pages()
    return fd

def unfill(fd):
    os.close(fd)
    os.unlink(FILLER)

def stats():
    return c.stats()

def wait_stats(pred, what, timeout=60):
    def check():
        s = stats()
        return s if pred(s) else None
    return wait_for(check, timeout, what)

with shmdedup.Coordinator(pages_to_scan=4096, sleep_millisecs=0) as c:
    w = Worker(setup=f"NPAGES = {NPAGES}\n" + WORKER)
    wait_stats(lambda s: s["pages_sharing"] == NPAGES // 2, "the two halves to merge")
    wait_for(lambda: w.call("result = layout()")["merged"] == NPAGES, 30, "every page merged")
    out["merged_layout"] = w.call("result = layout()")
    SCENARIO
    out["coordinator_alive"] = isinstance(stats()["full_scans"], int)
    if w.proc.is_alive():
        w.close()
    else:
        w.close()
        out["worker_exitcode"] = w.exitcode
out["our_names_left"] = sorted(n for n in os.listdir("/dev/shm") if "shmdedup" in n)
print(json.dumps(out))
"""

SCENARIOS = {
    # (a) A write to a merged page with no room to copy it: SIGBUS, one line.
    "trap": """
        fd = fill(0)
        try:
            w.run("a[5, 17] ^= 0xff; print('wrote past a failed break', flush=True)", timeout=30)
            out["write"] = "returned"
        except AssertionError as e:
            out["write"] = str(e).splitlines()[0]
        w.proc.join(30)
        out["worker_exitcode"] = w.proc.exitcode
        # The coordinator drops the dead worker and keeps serving.
        wait_stats(lambda s: s["workers"] == [], "the dead worker to be dropped")
        unfill(fd)
    """,
    # (b) Explicit unmerges with room for one chunk of 256 pages: OSError, and
    # every page merged or private and correct.
    "unmerge": f"""
        c.set("run", 0)                # the unmerge alone may use the room left
        fd = fill({FREE_PAGES})
        out["advise"] = w.call('''
            try:
                r.advise(UNMERGEABLE)
                result = "no error"
            except OSError as e:
                result = [e.errno, str(e)]
        ''')
        out["after_advise"] = w.call("result = layout()")
        out["free_after_advise"] = free_pages()
        out["prepare_write"] = w.call('''
            try:
                r.prepare_write((NPAGES - 64) * P, 64 * P)
                result = "no error"
            except OSError as e:
                result = [e.errno, str(e)]
        ''')
        out["after_prepare"] = w.call("result = layout()")
        out["free_after_prepare"] = free_pages()
        # Private pages take writes as ever; with room again the unmerge completes.
        out["private_write"] = w.call("a[3, 9] = 0x5a; expected[3, 9] = 0x5a; result = layout()['intact']")
        unfill(fd)
        w.call("r.advise(UNMERGEABLE)")
        out["after_room"] = w.call("result = layout()")
    """,
    # (c) run=2 with room for one chunk: the error is reported, run falls back
    # to 0, last_error names the cause; with room again run=2 and run=1 work.
    "run2": f"""
        fd = fill({FREE_PAGES})
        try:
            c.set("run", 2)
            out["set_run_2"] = "no error"
        except ControlError as e:
            out["set_run_2"] = str(e)
        s = stats()
        out["run"], out["last_error"] = s["run"], s["last_error"]
        out["after_run2"] = w.call("result = layout()")
        unfill(fd)
        c.set("run", 2)
        out["after_room"] = w.call("result = layout()")
        out["run_after_room"] = stats()["run"]
        c.set("run", 1)
        wait_stats(lambda s: s["pages_sharing"] == NPAGES // 2, "merging again after run=1")
        out["remerged"] = w.call("result = layout()")
    """,
    # (e) The coordinator cannot write new stable pages: it keeps scanning and
    # serving, merges nothing, and merges once there is room.
    "stable": """
        c.set("run", 2)                # back to private pages (and fresh stable pages later)
        c.set("run", 0)
        fd = fill(0)
        c.set("run", 1)
        before = stats()["full_scans"]
        c.wait_full_scans(3, timeout=60)
        s = stats()
        out["scans_while_full"] = s["full_scans"] - before
        out["sharing_while_full"] = s["pages_sharing"]
        out["stable_allocated_while_full"] = s["stable_pages_allocated"]
        out["while_full"] = w.call("result = layout()")
        unfill(fd)
        wait_stats(lambda s: s["pages_sharing"] == NPAGES // 2, "merging once there is room")
        out["after_room"] = w.call("result = layout()")
    """,
    # (f) merge_now when no new stable page can be created: ShmError
    # (ENOSPC) after merging what could be (a page equal to an existing stable
    # page needs no new one); the others stay private with their bytes; with
    # room again the same call makes them stable.
    "merge_now": """
        c.set("sleep_millisecs", 3_600_000)   # the scan out of the way
        w.call('''
            r2 = Region(64 * P)
            b = r2.ndarray(np.uint8, (64, P))
            fresh = np.random.default_rng(11).integers(0, 256, (64, P), dtype=np.uint8)
            fresh[0] = expected[0]       # the bytes of a stable page
            b[:] = fresh
            def layout2():
                s = np.frombuffer(r2.states(), np.uint8)
                return {"merged": int(np.count_nonzero(s == _native.MERGED)),
                        "private": int(np.count_nonzero(s == _native.PRIVATE)),
                        "intact": bool(np.array_equal(b, fresh))}
        ''')
        before = stats()["stable_pages_allocated"]
        fd = fill(0)
        out["merge_now"] = w.call('''
            try:
                result = ["returned", r2.merge_now()]
            except OSError as e:
                result = [e.errno, str(e), getattr(e, "merged", None), isinstance(e, shmdedup.ShmError)]
        ''')
        out["after_merge_now"] = w.call("result = layout2()")
        out["new_stable_while_full"] = stats()["stable_pages_allocated"] - before
        unfill(fd)
        out["after_room"] = w.call("result = r2.merge_now()")
        out["after_room_layout"] = w.call("result = layout2()")
    """,
}


def run_scenario(name: str) -> tuple[dict, subprocess.CompletedProcess]:
    body = textwrap.indent(textwrap.dedent(SCENARIOS[name]).strip(), "    ")
    prelude = f"NPAGES = {NPAGES}\nWORKER = {WORKER!r}\n"
    code = prelude + RUNNER.replace("    SCENARIO", body)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           f'mount -t tmpfs -o size={TMPFS_SIZE} tmpfs /dev/shm && exec "$0" -c "$1"',
           sys.executable, code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=child_env(),
                          cwd=str(REPO_ROOT), check=False)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, \
        f"scenario {name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = json.loads(lines[-1])
    assert out["merged_layout"] == {"private": 0, "merged": NPAGES, "intact": True, "allocated_pages": 0}
    assert out["coordinator_alive"]
    assert out["our_names_left"] == []
    return out, proc


def _consistent(layout: dict) -> bool:
    """Every page merged or private, and every byte as written."""
    return layout["private"] + layout["merged"] == NPAGES and layout["intact"]


@needs_namespace
def test_write_to_merged_page_with_tmpfs_full_ends_with_sigbus_and_one_line() -> None:
    out, proc = run_scenario("trap")
    assert out["free_when_full"] == 0
    assert "died" in out["write"], out
    assert out["worker_exitcode"] == -signal.SIGBUS, out
    assert "wrote past a failed break" not in proc.stdout       # it never returned to Python
    ours = [line for line in proc.stderr.splitlines() if line.startswith("shmdedup: ")]
    assert len(ours) == 1, proc.stderr
    assert ours[0].startswith("shmdedup: cannot break copy-on-write of merged page at 0x")
    assert "ENOSPC" in ours[0] and "SIGBUS" in ours[0], ours[0]


@needs_namespace
def test_explicit_unmerge_with_tmpfs_full_raises_and_leaves_pages_consistent() -> None:
    out, _ = run_scenario("unmerge")
    assert out["free_after_fill"] == FREE_PAGES
    err, text = out["advise"]
    assert err == 28 and "No space left" in text, out["advise"]     # ENOSPC
    after = out["after_advise"]
    assert _consistent(after), after
    # The first chunk of 256 pages broke, the second could not: it is merged
    # still, and its partial copy was given back (nothing leaked in the tmpfs).
    assert after["private"] == 256 and after["allocated_pages"] == 256, after
    assert out["free_after_advise"] == FREE_PAGES - 256
    err, text = out["prepare_write"]
    assert err == 28, out["prepare_write"]
    assert out["after_prepare"] == after and out["free_after_prepare"] == FREE_PAGES - 256
    assert out["private_write"] is True
    assert out["after_room"] == {"private": NPAGES, "merged": 0, "intact": True, "allocated_pages": NPAGES}


@needs_namespace
def test_run_2_with_tmpfs_full_reports_and_falls_back_to_run_0() -> None:
    out, _ = run_scenario("run2")
    assert "No space left on device" in out["set_run_2"], out["set_run_2"]
    assert out["run"] == 0
    assert "No space left on device" in out["last_error"], out["last_error"]
    assert _consistent(out["after_run2"]) and out["after_run2"]["merged"] > 0, out["after_run2"]
    assert out["after_room"] == {"private": NPAGES, "merged": 0, "intact": True, "allocated_pages": NPAGES}
    assert out["run_after_room"] == 2
    assert out["remerged"]["merged"] == NPAGES and out["remerged"]["intact"]


@needs_namespace
def test_coordinator_keeps_scanning_when_stable_pages_cannot_be_written() -> None:
    out, proc = run_scenario("stable")
    assert out["free_after_fill"] == 0
    assert out["scans_while_full"] >= 3
    assert out["sharing_while_full"] == 0 and out["stable_allocated_while_full"] == 0, out
    assert out["while_full"] == {"private": NPAGES, "merged": 0, "intact": True, "allocated_pages": NPAGES}
    assert out["after_room"]["merged"] == NPAGES and out["after_room"]["intact"]
    assert "cannot write new stable pages" in proc.stderr


# ---- (d) an unmerge interrupted by a signal ----------------------------------------

INTERRUPTED = """
import os, signal, threading, time
import numpy as np
from shmdedup import UNMERGEABLE, _native
from shmdedup.worker.region import Region, PAGE_SIZE as P
from shmdedup.coordinator.scan.stable import StableSegment

N = 65536                                   # ~0.5 s of breaks: 256 chunks
# Distinct pages, of which only the first 16 bytes are not zero: a small
# expected copy (the region's bytes outside it must stay zero).
data = np.zeros((N, 2), np.uint64)
data[:, 0] = np.arange(N)
data[:, 1] = np.random.default_rng(3).integers(0, 2**63, N, dtype=np.uint64)
r = Region(N * P)
a = r.ndarray(np.uint64, (N, P // 8))
a[:, :2] = data
seg = StableSegment(chunk_pages=N)
slot = seg.alloc(N)
for off in range(0, N, 4096):
    seg.write(slot + off, memoryview(r)[off * P:(off + 4096) * P])

def intact():
    return bool(np.array_equal(a[:, :2], data)) and not a[:, 2:].any()
fd = seg.readonly_fd(); sv = _native.StableView(fd); os.close(fd)
runs = np.array([(f, 64, slot + f) for f in range(0, N, 64)], dtype=np.int64)
assert r.merge(sv, runs.tobytes()) == b"\\x01" * N

seen = {}
def interrupt():
    # SIGINT once the unmerge is under way (some pages private, most not).
    while True:
        private = int(np.count_nonzero(np.frombuffer(r.states(), np.uint8) == _native.PRIVATE))
        if private:
            seen["private_at_signal"] = private
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.0005)

t = threading.Thread(target=interrupt)
t.start()
try:
    r.advise(UNMERGEABLE)
    outcome = "completed"
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
t.join()
s = np.frombuffer(r.states(), np.uint8)
private = int(np.count_nonzero(s == _native.PRIVATE))
merged = int(np.count_nonzero(s == _native.MERGED))
print(outcome, seen["private_at_signal"], private, merged, N,
      intact(), r.allocated_bytes() // P, _native.merged_pages())
# The rest breaks on a second call, and writes work everywhere.
assert r.break_range(0, N) == merged
a[:, 0] ^= 1
data[:, 0] ^= 1
print("after", intact(), r.merged_pages(), r.breaks)
"""


def test_unmerge_interrupted_by_sigint_leaves_every_page_merged_or_private() -> None:
    res = run_python(INTERRUPTED, timeout=120)
    res.check()
    first, after = res.stdout.splitlines()
    outcome, at_signal, private, merged, n, intact, allocated, counted = first.split()
    private, merged, n = int(private), int(merged), int(n)
    assert outcome == "KeyboardInterrupt", res.stdout
    assert 0 < int(at_signal) <= private < n, res.stdout     # stopped in the middle
    assert private + merged == n and intact == "True", res.stdout
    assert int(allocated) == private and int(counted) == merged, res.stdout
    assert private % 256 == 0, res.stdout                     # whole chunks
    assert after == "after True 0 0", res.stdout


@needs_namespace
def test_merge_now_with_tmpfs_full_raises_enospc_and_keeps_pages_private() -> None:
    out, _ = run_scenario("merge_now")
    err, text, merged, is_shm_error = out["merge_now"]
    assert err == 28 and is_shm_error, out["merge_now"]                 # ENOSPC
    assert "no new stable page could be created" in text and "1 of 64 pages merged" in text, text
    assert merged == 1
    assert out["after_merge_now"] == {"merged": 1, "private": 63, "intact": True}
    assert out["new_stable_while_full"] == 0
    assert out["after_room"] == 63
    assert out["after_room_layout"] == {"merged": 64, "private": 0, "intact": True}
