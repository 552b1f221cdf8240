"""The pytest plugin end to end: pytest runs in a child process on a generated suite.

Each run is hermetic: plugin autoloading is off and the plugins are named with
``-p`` (``xdist.plugin``, ``shmdedup.tools.pytest_plugin``), so the machine's other
plugins, and whether shmdedup's entry point is installed, do not matter (with
the entry point installed, ``-p shmdedup.tools.pytest_plugin`` would register the
module twice).  The inner tests check merging from inside the workers (state
bytes, and st_blocks of their own shm objects), look for the coordinator among
the controller's children, and record facts in files the outer test reads.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ChildResult, child_env, run_python, shm_names

SUMMARY = re.compile(r"^shmdedup: (\d+) workers? shared ([\d.]+) MiB \(peak pages_sharing (\d+), "
                     r"pages_shared (\d+)\)$", re.M)

CONFTEST = '''
import json, os
import numpy as np
import pytest
from shmdedup.tools.pytest_plugin import share

MiB = 2**20

def content():
    return np.random.default_rng(5).integers(0, 2**63, MiB, dtype=np.uint64)  # 8 MiB, unique pages

@pytest.fixture(scope="session")
def table():
    return share(content())

def record(name, **facts):
    path = os.path.join(os.environ["PLUGIN_FACTS"], f"{os.getpid()}-{name}.json")
    with open(path, "w") as f:
        json.dump(dict(facts, pid=os.getpid()), f)

def coordinators_under(pid):
    """Pids of shmdedup coordinator processes among pid's children."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as c:
                        argv = c.read().split(b"\\0")
                except OSError:
                    continue
                if b"shmdedup" in argv and b"coordinator" in argv:
                    found.append(int(child))
    return found
'''

ACTIVE_TESTS = '''
import os, time
import numpy as np
import pytest
import shmdedup
from shmdedup.tools.pytest_plugin import region_of, share
from conftest import content, coordinators_under, record

@pytest.mark.parametrize("i", range(4))
def test_table_merges_across_workers(table, i, request):
    region = region_of(table)
    assert region is not None and table.dtype == np.uint64 and table.shape == (2**20,)
    assert os.environ["SHMDEDUP_SOCKET"] == request.config.workerinput["shmdedup_socket"]
    client = shmdedup.Client()
    deadline = time.monotonic() + 90
    while region.merged_pages() < region.npages:
        assert time.monotonic() < deadline, f"{region.merged_pages()} of {region.npages} pages merged"
        client.wait_full_scans(1)
    client.wait_full_scans(2)
    assert region.merged_pages() == region.npages
    assert region.allocated_bytes() == 0  # this worker's copy is punched out of its shm object
    assert np.array_equal(table, content())
    coordinator = client.stats()["coordinator_pid"]
    assert coordinators_under(os.getppid()) == [coordinator]  # one, the controller's child
    record(f"merged{i}", coordinator=coordinator)

def test_shmdedup_array_and_buffers(shmdedup_array):
    a = shmdedup_array((256, 1024), np.float32, lambda a: a.fill(1.5))
    assert region_of(a) is not None and a.shape == (256, 1024) and a.dtype == np.float32
    assert (a == 1.5).all()
    b = share(b"x" * 10000)
    assert region_of(b) is not None and b == b"x" * 10000 and b.readonly  # bytes stay immutable
    c = share(bytearray(b"x" * 10000))
    c[0] = ord("y")  # a private, writable copy
    assert region_of(c) is not None and bytes(c[:2]) == b"yx"
'''

INACTIVE_TESTS = '''
import os, threading
import numpy as np
from shmdedup.tools.pytest_plugin import region_of, share
from conftest import coordinators_under, record

def test_plugin_does_nothing(shmdedup_array, request):
    a = np.arange(10)
    assert share(a) is a
    b = shmdedup_array((4, 4), np.float32, lambda x: x.fill(2))
    assert region_of(b) is None and (b == 2).all()
    assert "SHMDEDUP_SOCKET" not in os.environ
    assert "shmdedup_socket" not in request.config.workerinput
    assert not [t.name for t in threading.enumerate() if t.name.startswith("shmdedup")]
    assert coordinators_under(os.getppid()) == []
    record("inactive")
'''

ONE_PROCESS_TESTS = '''
import os
import numpy as np
import shmdedup
from shmdedup.tools.pytest_plugin import region_of, share
from conftest import content, coordinators_under

KEEP = []  # alive until the plugin's last look at the stats, after the test

def test_one_process_shares_with_itself():
    a, b = share(content()), share(content())
    KEEP.extend((a, b))
    client = shmdedup.Client()
    for _ in range(200):
        if region_of(a).merged_pages() == region_of(a).npages == region_of(b).merged_pages():
            break
        client.wait_full_scans(1)
    client.wait_full_scans(2)
    assert region_of(a).merged_pages() == region_of(b).merged_pages() == region_of(a).npages
    assert np.array_equal(a, b)
    assert coordinators_under(os.getpid()) == [client.stats()["coordinator_pid"]]
'''


def make_suite(root: Path, tests: str, ini: str = "") -> Path:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n" + ini)
    (root / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (root / "test_inner.py").write_text(textwrap.dedent(tests))
    (root / "facts").mkdir()
    return root


def run_pytest(suite: Path, *args: str, autoload: bool = False, timeout: float = 180) -> ChildResult:
    argv = [str(suite), "-c", str(suite / "pytest.ini"), "-p", "no:cacheprovider", *args]
    if not autoload:
        argv = ["-p", "xdist.plugin", "-p", "shmdedup.tools.pytest_plugin", *argv]
    env = child_env({"PLUGIN_FACTS": str(suite / "facts")})
    for name in list(env):  # the outer run's own xdist and shmdedup settings
        if name.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST")) or name == "SHMDEDUP_SOCKET":
            del env[name]
    if not autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return run_python(f"import sys, pytest; sys.exit(pytest.main({argv!r}))", env=env, timeout=timeout)


def facts(suite: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((suite / "facts").iterdir())]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_xdist_workers_share_through_one_coordinator(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite", ACTIVE_TESTS)
    res = run_pytest(suite, "-n", "2", "--shmdedup")
    assert not res.timed_out and res.returncode == 0, res.stdout + res.stderr
    assert "5 passed" in res.stdout
    m = SUMMARY.search(res.stdout)
    assert m, res.stdout
    workers, mib, sharing = int(m.group(1)), float(m.group(2)), int(m.group(3))
    assert workers == 2
    # Both 8 MiB tables merged (2048 pages sharing), plus whatever the other test shared.
    assert sharing >= 2048 and mib >= 8.0
    recorded = facts(suite)
    assert len(recorded) == 4
    pids = {f["pid"] for f in recorded}
    coordinators = {f["coordinator"] for f in recorded}
    assert len(pids) == 2 and len(coordinators) == 1
    coordinator = coordinators.pop()
    assert coordinator not in pids and not pid_alive(coordinator)  # stopped and reaped
    assert shm_names(pids | {coordinator}) == set()


def test_without_the_option_the_plugin_does_nothing(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite", INACTIVE_TESTS)
    res = run_pytest(suite, "-n", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    assert "shmdedup:" not in res.stdout + res.stderr
    assert len(facts(suite)) == 1


def test_ini_option_activates_without_xdist(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite", ONE_PROCESS_TESTS, ini="shmdedup = true\n")
    res = run_pytest(suite)
    assert res.returncode == 0, res.stdout + res.stderr
    m = SUMMARY.search(res.stdout)
    assert m and m.group(1) == "1" and int(m.group(3)) >= 2048, res.stdout


def test_bad_control_is_a_usage_error(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite", INACTIVE_TESTS)
    res = run_pytest(suite, "--shmdedup", "--shmdedup-set", "no_such_control=1")
    assert res.returncode == 4, res.stdout + res.stderr  # pytest's ExitCode.USAGE_ERROR
    assert "--shmdedup-set" in res.stderr and "no_such_control" in res.stderr
    assert facts(suite) == []


ENTRY_POINT = any(ep.name == "shmdedup" and ep.value == "shmdedup.tools.pytest_plugin"
                  for ep in importlib.metadata.entry_points(group="pytest11"))


@pytest.mark.skipif(not ENTRY_POINT, reason="shmdedup's pytest11 entry point is not installed "
                    "(pip install -e . installs it)")
def test_installed_entry_point_loads_the_plugin(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite", ACTIVE_TESTS)
    res = run_pytest(suite, "-n", "2", "--shmdedup", autoload=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert SUMMARY.search(res.stdout), res.stdout


# ---- share() is transparent (issue 14, defect 1) -------------------------------------

TRANSPARENT_TESTS = '''
import array
import numpy as np
import pytest
from shmdedup.tools.pytest_plugin import region_of, share

def arrays():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((300, 500))
    ro = big.copy()
    ro.flags.writeable = False
    return {"c": big, "f": np.asfortranarray(big), "strided": big[::2, ::3], "transposed": big.T,
            "readonly": ro, "zero_d": np.array(2.5), "big_endian": big.astype(">i4"),
            "structured": np.zeros(10000, dtype=[("a", "<i4"), ("b", "<f8", (3,))]),
            "axes_permuted": rng.integers(0, 9, (40, 50, 60)).transpose(2, 0, 1)}

@pytest.mark.parametrize("name", list(arrays()))
def test_arrays(name, request):
    a = arrays()[name]
    s = share(a)
    assert type(s) is np.ndarray and s.dtype == a.dtype and s.shape == a.shape and np.array_equal(s, a)
    assert s.flags.writeable == a.flags.writeable
    for flag in ("c_contiguous", "f_contiguous"):
        assert getattr(s.flags, flag) == getattr(a.flags, flag) or not a.flags.contiguous
    assert np.argsort(np.abs(s.strides)).tolist() == np.argsort(np.abs(a.strides)).tolist() or a.ndim < 2
    assert (region_of(s) is not None) == bool(request.config.getoption("shmdedup"))

def test_scalars_stay_scalars():
    for x in (np.float64(1.5), np.int8(-3), np.bool_(True)):
        assert share(x) is x

def test_bytes_compare_equal_and_stay_immutable():
    data = bytes(range(256)) * 100
    s = share(data)
    assert s == data and len(s) == len(data) and bytes(s) == data and hash(s) == hash(data)
    assert np.frombuffer(s, np.uint8).sum() == np.frombuffer(data, np.uint8).sum()
    with pytest.raises(TypeError):
        s[0] = 1

def test_bytearray_and_memoryview():
    ba = share(bytearray(b"ab" * 5000))
    ba[0] = ord("z")
    assert ba[:2] == b"zb"
    mv = memoryview(array.array("q", range(3000))).toreadonly()
    s = share(mv)
    assert s == mv and s.format == mv.format and s.shape == mv.shape and s.readonly

@pytest.mark.parametrize("bad", [[1, 2], "text", np.array([None, 1]), np.ma.array([1, 2]), array.array("i", [1])],
                         ids=["list", "str", "objects", "masked", "array.array"])
def test_refused_either_way(bad):
    with pytest.raises(ValueError, match="share"):
        share(bad)

def test_shmdedup_array_rows(shmdedup_array):
    def rows(block, start):
        block[...] = np.arange(start, start + len(block))[:, None]
    a = shmdedup_array((1000, 300), np.int32, rows, rows=128)
    assert a.shape == (1000, 300) and a.dtype == np.int32 and (a == np.arange(1000)[:, None]).all()
    with pytest.raises(ValueError, match="rows"):
        shmdedup_array((10,), np.int8, rows, rows=0)
    z = shmdedup_array((), np.float32, lambda x: x.fill(2))
    assert z.shape == () and z == 2
'''


@pytest.mark.parametrize("active", [False, True], ids=["without", "with_shmdedup"])
def test_share_is_transparent(tmp_path: Path, active: bool) -> None:
    """A suite that passes without --shmdedup passes with it: share() keeps type,
    dtype, shape, memory order and the read-only flag, returns numpy scalars
    unchanged, gives bytes back as an equal read-only memoryview, and refuses
    the same things either way."""
    suite = make_suite(tmp_path / "suite", TRANSPARENT_TESTS)
    res = run_pytest(suite, "-n", "2", *(["--shmdedup"] if active else []))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "18 passed" in res.stdout, res.stdout


# ---- the summary says what was saved, and how (issue 14, defect 5) -----------------------

SCAN_ONLY_TESTS = '''
import numpy as np
import shmdedup

KEEP = []  # alive until the plugin's last look at the stats, after the test

def test_advise_and_finish_at_once():
    r = shmdedup.Region(2**20)
    # Page i holds i: the few pages the wakes visit (one each) have no twin
    # among themselves, as they would if all held the same byte.
    r.ndarray(np.uint8, (256, 4096))[:] = np.arange(256, dtype=np.uint8)[:, None]
    r.advise(shmdedup.MERGEABLE)
    KEEP.append(r)
'''

WRITE_TIME_TESTS = '''
import glob, os, time
import numpy as np
from shmdedup.tools.pytest_plugin import region_of, share
from conftest import content, record

def test_load_and_wait_for_the_other_worker(table):
    region = region_of(table)
    record("loaded", merged=region.merged_pages(), npages=region.npages)
    deadline = time.monotonic() + 60  # both workers hold their tables when either looks
    while len(glob.glob(os.path.join(os.environ["PLUGIN_FACTS"], "*-loaded.json"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert np.array_equal(table, content())
'''

# Scanning as good as off: one page per batch, then an hour's sleep.
NO_SCAN = ("--shmdedup-set", "pages_to_scan=1", "--shmdedup-set", "sleep_millisecs=3600000")
HOW = re.compile(r"^shmdedup: how: (.*)$", re.M)


def test_summary_when_workers_finish_before_two_full_scans(tmp_path: Path) -> None:
    """Pages left to the scan merge only when the scan visits them: with the
    scan as good as off, the summary says nothing was saved, and why,
    instead of "shared 0.0 MiB"."""
    suite = make_suite(tmp_path / "suite", SCAN_ONLY_TESTS)
    res = run_pytest(suite, "-n", "2", "--dist", "each", "--shmdedup", *NO_SCAN)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shmdedup: 2 workers shared nothing (pages_sharing stayed 0)" in res.stdout, res.stdout
    assert "0.0 MiB" not in res.stdout
    how = HOW.search(res.stdout)
    assert how and how.group(1).startswith("by scanning only (full_scans 0)"), res.stdout
    assert "finished before the coordinator's second full scan (full_scans 0)" in res.stdout


def test_summary_reports_merges_at_write_time(tmp_path: Path) -> None:
    """share() merges as it copies: with scanning as good as off, the two
    workers' tables are merged the moment they are built, and the summary
    says how much and how."""
    suite = make_suite(tmp_path / "suite", WRITE_TIME_TESTS)
    res = run_pytest(suite, "-n", "2", "--dist", "each", "--shmdedup", *NO_SCAN)
    assert res.returncode == 0, res.stdout + res.stderr
    loaded = facts(suite)
    assert len(loaded) == 2 and all(f["merged"] == f["npages"] == 2048 for f in loaded)
    m = SUMMARY.search(res.stdout)
    assert m and int(m.group(1)) == 2 and int(m.group(3)) == 2048 and float(m.group(2)) == 8.0, res.stdout
    how = HOW.search(res.stdout)
    assert how and how.group(1).startswith("4096 of the 4096 pages written with share()"), res.stdout
