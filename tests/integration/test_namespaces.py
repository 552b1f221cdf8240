"""Coordinator and workers in different namespaces (docs/deploy.md), both ways.

Containers put a coordinator and its workers in different pid, mount, ipc and
user namespaces.  None of them stops merging: regions, their state bytes and
the stable object travel as descriptors over the socket (SCM_RIGHTS), so a
private /dev/shm or IPC namespace does not matter; only the socket path must
be reachable.  What changes is what ``SO_PEERCRED`` tells the coordinator:

* a worker in a pid namespace of its own is seen with its pid in the
  coordinator's namespace (its pidfd works); a coordinator in a pid namespace
  sees workers outside it as pid 0, and has no pidfd for them;
* a user namespace maps uids: root in a user namespace owned by uid 65534 is
  uid 65534 to a coordinator outside, and a uid that the coordinator's own user
  namespace does not map is the overflow uid (65534).

The last test is the Kubernetes recipe (deploy/k8s) in miniature: a
coordinator "pod" in the host's pid namespace (hostPID) and worker "pods" in
namespaces of their own (pid, mount, ipc, net, uts) that reach the socket
through a read-only mount of its directory (a hostPath volume).

Each case checks merging from outside (st_blocks of the workers' objects and
of the coordinator's stable object) and with the counters, copy-on-write, and
that a worker's exit frees its slots.  Needs root and util-linux ``unshare``;
skips where namespaces cannot be created.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.helpers import no_shm_leftovers, reaper, wait_for  # noqa: F401
from tests.integration.isolation import (
    NAMESPACES,
    PID_NS,
    UNSHARE,
    USER_NS,
    Coordinator,
    NsWorker,
    ns_pids,
    ns_prefix,
    shared_socket_dir,
    unshare_problem,
)

N = 64
pytestmark = [pytest.mark.usefixtures("no_shm_leftovers"),
              pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid changes need root")]

KINDS = {"pid": ["pid"], "mount": ["mnt"], "ipc": ["ipc"], "user": ["user"],
         "all": ["pid", "mnt", "ipc", "user"]}


@pytest.fixture
def socket_path() -> Iterator[str]:
    d = shared_socket_dir()
    yield os.path.join(d, "c.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[list]:
    """Coordinators and workers to close (reap) at the end, workers first."""
    started: list = []
    yield started
    for p in sorted(started, key=lambda p: isinstance(p, Coordinator)):
        p.close()


def needs(*flags: str) -> None:
    problem = unshare_problem(tuple(flags))
    if problem:
        pytest.skip(problem)


def stable_blocks(coord: Coordinator) -> int:
    """Pages the coordinator's stable object holds, seen from outside."""
    pid = coord.host_pid
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "shmdedup-stable" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512 // os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def all_merged(workers: list[NsWorker]) -> bool:
    return all(w.status()["merged"] == w.npages for w in workers)


@pytest.mark.parametrize("side", ["coordinator", "workers"])
@pytest.mark.parametrize("ns", list(NAMESPACES))
def test_merging_across_namespaces(ns: str, side: str, socket_path: str, procs: list) -> None:
    needs(*NAMESPACES[ns][0])
    inside = ns_prefix(ns)
    coord = Coordinator(socket_path, inside if side == "coordinator" else ())
    procs.append(coord)
    # Two workers with the same pages; in the "workers" case each one in
    # namespaces of its own (not shared with the other either).
    a, b = (NsWorker(socket_path, inside if side == "workers" else (), seed=1, npages=N)
            for _ in range(2))
    procs += [a, b]
    for kind in KINDS[ns]:
        me = os.readlink(f"/proc/{coord.host_pid}/ns/{kind}")
        assert me != os.readlink(f"/proc/{a.pid}/ns/{kind}"), f"{kind} namespace not separate"
    if side == "workers" and "pid" in KINDS[ns]:
        assert len(ns_pids(a.pid)) == 2 and a.pid_inside == 1

    s = coord.wait_stats(lambda s: s["pages_shared"] == N and s["pages_sharing"] == N,
                         "every page to merge")
    wait_for(lambda: all_merged([a, b]), 30, "both workers to see every page merged")
    assert a.blocks() == b.blocks() == 0          # their private copies are punched
    assert stable_blocks(coord) == N              # one copy, the coordinator's
    assert a.status()["digest"] == b.status()["digest"] == a.digest

    # What SO_PEERCRED told the coordinator about the workers' pids.
    seen = sorted(w["pid"] for w in s["workers"])
    if side == "coordinator" and "pid" in KINDS[ns]:
        assert seen == [0, 0]                     # outside its pid namespace
    else:
        assert seen == sorted([a.pid, b.pid])     # pids as the coordinator's namespace numbers them

    # Copy-on-write across the boundary: a's write breaks its page only.
    written = a.ask("write", pages=[0])["digest"]
    assert a.status()["merged"] == N - 1 and b.status()["digest"] == b.digest
    # b was left alone on page 0: it saves nothing, so it is unmerged.
    coord.wait_stats(lambda s: s["pages_shared"] == N - 1 and s["pages_sharing"] == N - 1,
                     "page 0 to leave the stable index")

    # A worker's exit frees its slots: a is left alone on every one, they are
    # unmerged, and the stable object holds nothing any more.
    b.exit()
    coord.wait_stats(lambda s: s["stable_pages_allocated"] == 0 and s["pages_shared"] == 0
                     and len(s["workers"]) == 1, "b's slots to be freed")
    wait_for(lambda: a.status()["merged"] == 0, 30, "a's pages to be unmerged")
    assert a.status()["digest"] == written
    assert a.blocks() == N
    wait_for(lambda: stable_blocks(coord) == 0, 30, "the stable object to be punched")


@pytest.mark.parametrize("coordinator_ns", ["none", "pid"])
def test_live_worker_losing_its_connection_keeps_its_slots(coordinator_ns: str, socket_path: str,
                                                           procs: list) -> None:
    """A worker whose connection drops while it lives still maps its slots:
    the coordinator must keep them until the process exits (a pidfd tells it).
    A coordinator in a pid namespace of its own has no pid for workers
    outside (SO_PEERCRED says 0), so pidfd_open cannot watch them: the pidfd
    comes from the connection (SO_PEERPIDFD).  Without it, the slots went
    with the connection and a read zeros while alive."""
    if coordinator_ns == "pid":
        needs(*PID_NS)
    coord = Coordinator(socket_path, ns_prefix("pid") if coordinator_ns == "pid" else ())
    procs.append(coord)
    a, b = NsWorker(socket_path, seed=2, npages=N), NsWorker(socket_path, seed=2, npages=N)
    procs += [a, b]
    coord.wait_stats(lambda s: s["pages_sharing"] == N, "every page to merge")
    wait_for(lambda: all_merged([a, b]), 30, "both workers to see every page merged")
    a.ask("disconnect")                   # alive, still mapping the slots
    coord.wait_stats(lambda s: len(s["workers"]) == 1, "a's connection to go")
    b.exit()                              # the last sharer the coordinator knows of
    s = coord.wait_stats(lambda s: s["workers"] == [], "b's exit to be seen")
    # a still maps every slot: none may be freed (a freed slot is punched).
    assert a.status()["digest"] == a.digest, "a live worker's merged pages changed"
    assert s["stable_pages_allocated"] == N and stable_blocks(coord) == N


# ---- uids through user namespaces ----------------------------------------------

def test_root_in_a_user_namespace_is_its_owner_to_the_coordinator(socket_path: str, procs: list) -> None:
    """A worker that is root in a user namespace owned by uid 65534 (a rootless
    container) is uid 65534 to a coordinator outside: rejected by default,
    served with --allow-uid, and never allowed to set controls."""
    needs("--user")
    refused = Coordinator(socket_path, args=["--socket-mode", "666"])
    procs.append(refused)
    w = NsWorker(socket_path, seed=3, npages=N, uid=65534, userns=True)
    procs.append(w)
    assert w.uid_inside == 0
    wait_for(lambda: "uid 65534 gid 65534 is not allowed" in refused.log(), 30,
             "the coordinator to reject uid 65534")
    assert refused.stats()["workers"] == []
    w.close()
    refused.close()

    coord = Coordinator(socket_path, args=["--socket-mode", "666", "--allow-uid", "65534"])
    procs.append(coord)
    mine = NsWorker(socket_path, seed=3, npages=N)                     # root, outside
    theirs = NsWorker(socket_path, seed=3, npages=N, uid=65534, userns=True)
    procs += [mine, theirs]
    coord.wait_stats(lambda s: s["pages_sharing"] == N, "root's and uid 65534's pages to merge")
    wait_for(lambda: all_merged([mine, theirs]), 30, "both workers to see every page merged")
    assert theirs.blocks() == 0 and theirs.status()["digest"] == theirs.digest
    assert theirs.ask("set", name="run", value=0)["set"] == "uid 65534 may not set controls (only uid 0)"


@pytest.mark.parametrize("coordinator_ns", ["none", "pid"])
def test_another_uid_sees_its_own_workers_only(coordinator_ns: str, socket_path: str,
                                               procs: list) -> None:
    """stats() to another uid holds its own workers' lines and quota usage
    only, like /proc/<pid>/ksm_stat.  A coordinator in a pid namespace of its
    own sees every worker outside as pid 0: they are told apart by uid (by
    pid, uid 65534 was shown root's worker too)."""
    if coordinator_ns == "pid":
        needs(*PID_NS)
    coord = Coordinator(socket_path, ns_prefix("pid") if coordinator_ns == "pid" else (),
                        args=["--socket-mode", "666", "--allow-uid", "65534"])
    procs.append(coord)
    mine = NsWorker(socket_path, seed=5, npages=N)                     # root
    theirs = NsWorker(socket_path, seed=6, npages=N, uid=65534)
    procs += [mine, theirs]
    s = coord.wait_stats(lambda s: len(s["workers"]) == 2, "both workers to connect")
    pid = 0 if coordinator_ns == "pid" else theirs.pid
    assert sorted(w["pid"] for w in s["workers"]) == sorted([pid, 0 if pid == 0 else mine.pid])
    assert theirs.ask("stats") == {"workers": [pid], "uids": [65534]}
    assert sorted(mine.ask("stats")["uids"]) == [0, 65534]         # the owner sees everyone


def test_coordinator_in_a_user_namespace_sees_uids_through_its_map(socket_path: str, procs: list) -> None:
    """A coordinator whose user namespace maps its uid 1000 to root outside
    sees root's workers as uid 1000, its own: they merge, and may set
    controls.  A uid its namespace does not map is the overflow uid 65534, so
    an allow-list must name that (and then admits every unmapped uid)."""
    needs("--user", "--map-user=1000", "--map-group=1000")
    coord = Coordinator(socket_path, [UNSHARE or "unshare", "--user", "--map-user=1000",
                                      "--map-group=1000", "--"],
                        args=["--socket-mode", "666", "--allow-uid", "1000"])
    procs.append(coord)
    a, b = NsWorker(socket_path, seed=4, npages=N), NsWorker(socket_path, seed=4, npages=N)
    procs += [a, b]
    coord.wait_stats(lambda s: s["pages_sharing"] == N, "every page to merge")
    assert a.ask("set", name="sleep_millisecs", value=1)["set"] == "allowed"
    coord.close()

    needs(*USER_NS)
    with open("/proc/sys/kernel/overflowuid") as f:
        overflow = int(f.read())
    coord = Coordinator(socket_path, ns_prefix("user"), args=["--socket-mode", "666", "--allow-uid", "1000"])
    procs.append(coord)
    w = NsWorker(socket_path, seed=4, npages=N, uid=1000)
    procs.append(w)
    wait_for(lambda: f"uid {overflow} gid {overflow} is not allowed" in coord.log(), 30,
             "the coordinator to see uid 1000 as the overflow uid")


# ---- the Kubernetes recipe (deploy/k8s), in namespaces --------------------------------

def pod(*, pid_ns: bool, socket_dir: str | None = None) -> list[str]:
    """A pod-like sandbox: new mount, ipc, net and uts namespaces (and pid
    unless the pod shares the host's, as the coordinator's hostPID does), its
    own /dev/shm, and socket_dir mounted read-only at /mnt/shmdedup (a
    hostPath volume with readOnly: true)."""
    setup = "mount -t tmpfs -o size=512m,mode=1777 shm /dev/shm"
    if socket_dir:
        setup += (" && mount -t tmpfs -o size=1m tmp /mnt && mkdir /mnt/shmdedup"
                  f" && mount --bind -o ro {socket_dir} /mnt/shmdedup")
    return [UNSHARE or "unshare", "--mount", "--ipc", "--net", "--uts",
            *(PID_NS if pid_ns else []), "--", "sh", "-c", setup + ' && exec "$0" "$@"']


def test_kubernetes_recipe_coordinator_pod_and_worker_pods(socket_path: str, procs: list) -> None:
    """deploy/k8s: one coordinator pod with the host's pid namespace (hostPID)
    and the socket directory of the host (hostPath); worker pods in pid
    namespaces of their own that mount that directory read-only.  Merging,
    copy-on-write, a live worker losing its connection (keeps its slots: the
    coordinator has a pidfd for it) and an exit (frees them)."""
    needs("--mount", "--ipc", "--net", "--uts", *PID_NS)
    coord = Coordinator(socket_path, pod(pid_ns=False))
    procs.append(coord)
    inside = "/mnt/shmdedup/" + os.path.basename(socket_path)
    a, b, c = (NsWorker(inside, pod(pid_ns=True, socket_dir=os.path.dirname(socket_path)),
                        seed=7, npages=N) for _ in range(3))
    procs += [a, b, c]
    assert os.readlink(f"/proc/{a.pid}/ns/net") != os.readlink(f"/proc/{coord.host_pid}/ns/net")
    s = coord.wait_stats(lambda s: s["pages_shared"] == N and s["pages_sharing"] == 2 * N,
                         "every page to merge")
    assert sorted(w["pid"] for w in s["workers"]) == sorted([a.pid, b.pid, c.pid])
    wait_for(lambda: all_merged([a, b, c]), 30, "every worker to see every page merged")
    assert a.blocks() == b.blocks() == c.blocks() == 0 and stable_blocks(coord) == N

    a.ask("disconnect")                       # alive, still mapping the slots
    coord.wait_stats(lambda s: len(s["workers"]) == 2, "a's connection to go")
    b.exit()
    c.exit()                                  # a is the last one mapping them
    s = coord.wait_stats(lambda s: s["workers"] == [], "b's and c's exits to be seen")
    assert a.status()["digest"] == a.digest
    assert s["stable_pages_allocated"] == N and stable_blocks(coord) == N
    a.exit()                                  # now they can go
    coord.wait_stats(lambda s: s["stable_pages_allocated"] == 0, "a's slots to be freed")
    wait_for(lambda: stable_blocks(coord) == 0, 30, "the stable object to be punched")
