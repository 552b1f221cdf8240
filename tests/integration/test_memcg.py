"""Which memory cgroup pays for merged pages (docs/deploy.md, "Sizing").

The coordinator writes every stable page itself (pwrite into its stable
object), so the kernel charges stable pages to the coordinator's memory cgroup;
the workers' cgroups are uncharged as their private copies are punched, and
charged again for each page a copy-on-write break gives back to them.  The
charge stays with the coordinator's cgroup when the coordinator dies: the
stable object lives on through the workers' mappings until the last one goes.

Measured with the cgroups' own counters (memory.stat ``shmem``), a coordinator
in one child cgroup and two workers in another.  Needs root and a writable
memory cgroup (v2, or v1's memory controller); skips otherwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from shmdedup import _native
from tests.helpers import no_shm_leftovers, reaper, wait_for  # noqa: F401
from tests.integration.isolation import (
    Coordinator,
    MemoryCgroup,
    NsWorker,
    memory_cgroup_problem,
    shared_socket_dir,
)

P = _native.PAGE_SIZE
N = 4096            # 16 MiB per worker
SLACK = 64 * P      # state-byte objects and the like
pytestmark = [pytest.mark.usefixtures("no_shm_leftovers"),
              pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")]


@pytest.fixture
def cgroups() -> Iterator[tuple[MemoryCgroup, MemoryCgroup]]:
    problem = memory_cgroup_problem()
    if problem:
        pytest.skip(problem)
    made = [MemoryCgroup("coordinator"), MemoryCgroup("workers")]
    yield made[0], made[1]
    for cg in made:
        cg.close()


@pytest.fixture
def socket_path() -> Iterator[str]:
    d = shared_socket_dir()
    yield os.path.join(d, "c.sock")
    shutil.rmtree(d, ignore_errors=True)


def test_stable_pages_are_charged_to_the_coordinators_cgroup(
        cgroups: tuple[MemoryCgroup, MemoryCgroup], socket_path: str) -> None:
    ccg, wcg = cgroups
    coord = Coordinator(socket_path, ccg.prefix)
    workers = [NsWorker(socket_path, wcg.prefix, seed=5, npages=N, advise=False) for _ in range(2)]
    a, b = workers
    try:
        assert coord.host_pid in ccg.procs() and {a.pid, b.pid} <= set(wcg.procs())
        # Two private copies, charged to the workers' cgroup.
        assert 2 * N * P <= wcg.shmem() <= 2 * N * P + SLACK
        assert ccg.shmem() <= SLACK

        for w in workers:
            w.ask("advise")
        coord.wait_stats(lambda s: s["pages_shared"] == N and s["pages_sharing"] == N,
                         "every page to merge")
        wait_for(lambda: all(w.status()["merged"] == N for w in workers), 30, "both to be merged")
        # One copy, the coordinator's; the workers' copies are gone.
        assert wcg.shmem() <= SLACK, wcg.stat()
        assert N * P <= ccg.shmem() <= N * P + SLACK, ccg.stat()

        # A copy-on-write break is charged to the writer's cgroup.
        w_before = wcg.shmem()
        a.ask("write", pages=list(range(256)))
        assert wcg.shmem() >= w_before + 256 * P

        # The coordinator dies: its cgroup keeps paying for the stable object,
        # which the workers still map; nothing is freed or charged elsewhere.
        held = ccg.shmem()
        coord.kill()
        assert ccg.procs() == []
        # (A few pages of its own small objects may go with it.)
        assert held - 16 * P <= ccg.shmem() <= held
        assert a.status()["digest"] != a.digest and b.status()["digest"] == b.digest

        # The last mapping goes with the workers: so does the charge.
        for w in workers:
            w.exit()
        wait_for(lambda: ccg.shmem() <= SLACK, 30, "the stable object's charge to go")
    finally:
        for w in workers:
            w.close()
        coord.close()


def test_limit_below_the_stable_pages_oom_kills_the_coordinator_unless_capped(
        cgroups: tuple[MemoryCgroup, MemoryCgroup], socket_path: str) -> None:
    ccg, wcg = cgroups
    npages = 16384                               # 64 MiB of stable pages wanted
    cap = 2048                                   # 8 MiB
    started: list = []
    try:
        coord = Coordinator(socket_path, ccg.prefix)
        started.append(coord)
        ccg.set_limit(ccg.current() + 24 * 2**20)
        workers = [NsWorker(socket_path, wcg.prefix, seed=6, npages=npages) for _ in range(2)]
        started += workers
        wait_for(lambda: coord.proc.poll() is not None, 120, "the coordinator to hit its limit")
        assert coord.proc.returncode == -9 and ccg.oom_kills() == 1, coord.log()
        for w in workers:
            assert w.status()["digest"] == w.digest      # nothing lost
            w.close()
        coord.close()

        coord = Coordinator(socket_path, ccg.prefix, args=["--set", f"max_kernel_pages={cap}"])
        started.append(coord)
        workers = [NsWorker(socket_path, wcg.prefix, seed=6, npages=npages) for _ in range(2)]
        started += workers
        coord.wait_stats(lambda s: s["pages_shared"] == cap and s["pages_sharing"] == cap,
                         "the capped number of stable pages", timeout=120)
        coord.client().wait_full_scans(2, timeout=120)
        assert coord.proc.poll() is None and ccg.oom_kills() == 1
        assert ccg.shmem() <= cap * P + SLACK
        for w in workers:
            assert w.status()["digest"] == w.digest
    finally:
        for p in reversed(started):
            p.close()
