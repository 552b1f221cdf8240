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
    assert region_of(b) is not None and b.dtype == np.uint8 and bytes(b) == b"x" * 10000
    b[0] = ord("y")  # a private, writable copy
    assert bytes(b[:2]) == b"yx"
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
