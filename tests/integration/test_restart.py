"""The coordinator dies, stops or loses a worker's connection; the workers'
bytes never change (DESIGN "Failure semantics", invariants 6 and 7).

* Killed (kill -9): merged pages stay mapped on its stable object, which lives
  on through the workers' mappings; copy-on-write is local, so writes work
  with no coordinator at all.
* Restarted on the same socket: the agents reconnect (with backoff) and
  register again; merging resumes.  Pages the old coordinator merged are
  *inherited*: left merged on the old object, never scanned, counted apart in
  ``pages_inherited`` (not in pages_shared/pages_sharing, which count this
  coordinator's slots), scanned again once a write breaks them; run=2
  unmerges them too.
* Stopped in order (SIGTERM, ``Coordinator.stop()``): the same as a death; no
  slot is freed on the way out (freeing punches the page out of every worker
  that maps it).
* A live worker whose connection drops keeps its slots until it exits (or its
  state bytes show the page broken); reconnecting, it gets them back.

Memory is checked from outside: st_blocks of the workers' backing objects.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest

import shmdedup
from shmdedup import _native
from tests.cluster import (
    CoordinatorProcess,
    digest,
    merged_counts,
    recount_problem,
    settle,
    start_worker,
    wait_registered,
)
from tests.helpers import Worker, allocated_bytes, no_shm_leftovers, reaper, wait_for  # noqa: F401

P = _native.PAGE_SIZE
N = 64
CONTROLS = {"sleep_millisecs": 0, "pages_to_scan": 256, "use_zero_pages": 1}
MERGED, ZERO, PRIVATE = _native.MERGED, _native.ZERO, _native.PRIVATE

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


@pytest.fixture
def socket_path() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="shmdedup-restart-")
    yield os.path.join(tmp, "c.sock")
    shutil.rmtree(tmp, ignore_errors=True)


def region_data(seed: int, npages: int = N, zeros: int = 8) -> bytes:
    """npages distinct random pages, the last `zeros` of them zero."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(P) for _ in range(npages - zeros)) + bytes(zeros * P)


class Pair:
    """Two workers holding the same region 'a' (so every page merges)."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self.data = {"a": bytearray(data)}
        self.workers = [start_worker(path) for _ in range(2)]
        self.backing = []
        for w in self.workers:
            _, fds = w.run("new('a', data, send=True)", data=data)
            self.backing.append(fds[0])
            os.close(fds[1])

    def close(self) -> None:
        for w in self.workers:
            w.close()
        for fd in self.backing:
            os.close(fd)

    def states(self, name: str = "a") -> list[bytes]:
        return [w.call("result = states()")[name] for w in self.workers]

    def write(self, name: str, off: int, data: bytes) -> None:
        """The same write in both workers (the pages stay duplicates)."""
        self.data[name][off:off + len(data)] = data
        for w in self.workers:
            w.call("write(name, [(off, data)])", name=name, off=off, data=data)

    def new(self, name: str, data: bytes) -> None:
        self.data[name] = bytearray(data)
        for w in self.workers:
            w.call("new(name, data)", name=name, data=data)

    def check_bytes(self) -> None:
        want = {name: digest(d) for name, d in self.data.items()}
        for w in self.workers:
            assert w.call("result = digests()") == want, f"worker {w.pid} lost bytes"

    def registered(self) -> dict[int, int]:
        return {w.pid: len(self.data) for w in self.workers}

    def settled(self, client: shmdedup.Client, expect: dict[str, int] | None = None,
                workers: list[Worker] | None = None) -> dict:
        """Wait until the recount over workers (default: both) holds and the
        stats equal expect; the stats."""
        out: dict = {}

        def problem() -> str | None:
            stats = client.stats()
            merged = zero = 0
            for w in workers or self.workers:
                m, z = merged_counts(w.call("result = states()"))
                merged, zero = merged + m, zero + z
            bad = recount_problem(stats, merged, zero)
            if bad is None and expect:
                got = {k: stats[k] for k in expect}
                bad = None if got == expect else f"stats {got}, expected {expect}"
            out.update(stats)
            return bad
        settle(client, problem, 30)
        return out


@pytest.fixture
def pair(socket_path: str) -> Iterator[Pair]:
    p = Pair(socket_path, region_data(1))
    yield p
    p.close()


def all_merged(states: list[bytes], n: int = N, zeros: int = 8) -> bool:
    return all(s == bytes([MERGED]) * (n - zeros) + bytes([ZERO]) * zeros for s in states)


def converged(data: bytes | bytearray) -> bytes:
    """States once both workers' identical copies are merged: zero pages on
    the zero page, the others on stable slots."""
    zero = bytes(P)
    return bytes(ZERO if data[i:i + P] == zero else MERGED for i in range(0, len(data), P))


def test_killed_coordinator_cow_keeps_working_then_restart_resumes(pair: Pair, socket_path: str) -> None:
    coord = CoordinatorProcess(socket_path, **CONTROLS).go()
    try:
        wait_for(lambda: all_merged(pair.states()), 30, "every page of both workers to merge")
        pair.settled(coord.client(), {"pages_shared": N - 8, "pages_sharing": N - 8, "ksm_zero_pages": 16,
                                      "pages_inherited": 0})
        assert [allocated_bytes(fd) for fd in pair.backing] == [0, 0]
    finally:
        coord.kill()

    # No coordinator: merged pages read right (the dead one's stable object
    # lives on through the mappings) and copy-on-write works.
    pair.check_bytes()
    assert all_merged(pair.states())
    pair.write("a", 3 * P + 5, b"written while no coordinator runs")
    pair.write("a", 10 * P, b"\xff" * P)
    pair.write("a", (N - 1) * P, b"zero page no more")
    pair.check_bytes()
    broken = {3, 10, N - 1}
    for s in pair.states():
        assert [p for p in range(N) if s[p] == PRIVATE] == sorted(broken)
    assert [allocated_bytes(fd) for fd in pair.backing] == [len(broken) * P] * 2
    # Advice given while no coordinator runs is recorded and registered later.
    pair.new("b", region_data(2, 16, zeros=0))

    # Restart on the same socket: the agents reconnect by themselves.
    coord = CoordinatorProcess(socket_path, **CONTROLS).go()
    try:
        client = coord.client()
        wait_registered(client, pair.registered(), timeout=20)
        # The broken pages and region b merge again on the new coordinator's
        # slots; the pages the old one merged stay merged on its object,
        # inherited and counted apart, never twice.
        inherited = 2 * (N - len(broken))
        stats = pair.settled(client, {"pages_shared": 3 + 16, "pages_sharing": 3 + 16,
                                      "ksm_zero_pages": 0, "pages_inherited": inherited})
        assert stats["stable_pages_allocated"] == 19
        assert [w["ksm_inherited_pages"] for w in stats["workers"]] == [inherited // 2] * 2
        assert pair.states() == [converged(pair.data["a"])] * 2
        assert [allocated_bytes(fd) for fd in pair.backing] == [0, 0]
        pair.check_bytes()

        # A write breaks an inherited page; it is then scanned and merged anew.
        pair.write("a", 20 * P + 1, b"inherited page written")
        pair.settled(client, {"pages_shared": 20, "pages_sharing": 20, "pages_inherited": inherited - 2})
        pair.check_bytes()

        # run=2 unmerges everything, inherited pages included.
        client.set("run", 2)
        assert all(s == bytes([PRIVATE]) * len(s) for w in pair.workers for s in w.call("result = states()").values())
        stats = client.stats()
        assert (stats["pages_shared"], stats["pages_sharing"], stats["pages_inherited"]) == (0, 0, 0)
        assert stats["stable_pages_allocated"] == 0
        pair.check_bytes()
        # run=1: everything merges again, now all on this coordinator's slots.
        client.set("run", 1)
        wait_for(lambda: pair.states() == [converged(pair.data["a"])] * 2, 30, "every page to merge again")
        pair.settled(client, {"pages_shared": N - 7 + 16, "pages_sharing": N - 7 + 16, "ksm_zero_pages": 14,
                              "pages_inherited": 0})
        pair.check_bytes()
    finally:
        coord.kill()


@pytest.mark.parametrize("how", ["process", "embedded"])
def test_orderly_stop_frees_no_slot_a_worker_maps(pair: Pair, socket_path: str, how: str) -> None:
    if how == "process":
        proc = CoordinatorProcess(socket_path, **CONTROLS).go()
        client = proc.client()
    else:
        coord = shmdedup.Coordinator(socket_path, export_env=False, **CONTROLS).start()
        client = coord.client()
    try:
        wait_for(lambda: all_merged(pair.states()), 30, "every page of both workers to merge")
        pair.settled(client, {"pages_shared": N - 8})
    finally:
        if how == "process":
            assert proc.stop() == 0, proc.log()
        else:
            coord.stop()
    # Freeing the slots on the way out would punch them: both workers would read zeros.
    pair.check_bytes()
    assert all_merged(pair.states())
    pair.write("a", 0, b"still copy-on-write")
    pair.check_bytes()


def test_live_worker_losing_its_connection_keeps_its_slots(pair: Pair, socket_path: str) -> None:
    a, b = pair.workers
    coord = shmdedup.Coordinator(socket_path, export_env=False, **CONTROLS).start()
    try:
        client = coord.client()
        wait_for(lambda: all_merged(pair.states()), 30, "every page of both workers to merge")
        pair.settled(client, {"pages_shared": N - 8, "pages_sharing": N - 8})

        # a points its agent elsewhere: the coordinator loses its connection
        # while a lives on, mapping the slots.
        a.call("shmdedup.set_socket(SOCKET + '.elsewhere')")
        wait_registered(client, {b.pid: 1})
        # b breaks every page: the slots' last registered sharer goes.
        b.call("write('a', [(p * P, bytes([p]) * 8) for p in range(r_n)])", r_n=N)
        for p in range(N):
            pair.data["a"][p * P:p * P + 8] = bytes([p]) * 8  # mirrored below for a
        client.wait_full_scans(3)
        # a still reads its own bytes: its slots were kept for it...
        assert a.call("result = digests()")["a"] == digest(region_data(1))
        assert a.call("result = states()")["a"] == bytes([MERGED]) * (N - 8) + bytes([ZERO]) * 8
        stats = client.stats()
        assert stats["stable_pages_allocated"] == N - 8
        assert stats["pages_shared"] == N - 8 and stats["pages_sharing"] == 0
        # ...and gives them back page by page as its own writes break them.
        a.call("write('a', [(p * P, bytes([p]) * 8) for p in range(16)])")
        client.wait_full_scans(2)
        assert client.stats()["stable_pages_allocated"] == N - 8 - 16

        # Back on this coordinator: a's region is registered again and its
        # remaining merged pages are this coordinator's again, not inherited.
        a.call("shmdedup.set_socket(SOCKET)")
        wait_registered(client, pair.registered())
        a.call("write('a', [(p * P, bytes([p]) * 8) for p in range(16, r_n)])", r_n=N)
        pair.settled(client, {"pages_inherited": 0})
        pair.check_bytes()
    finally:
        coord.stop()


def test_slots_of_an_exited_worker_are_freed(pair: Pair, socket_path: str) -> None:
    a, b = pair.workers
    third = start_worker(socket_path)
    try:
        third.call("new('a', data)", data=bytes(pair.data["a"]))
        coord = shmdedup.Coordinator(socket_path, export_env=False, **CONTROLS).start()
        try:
            client = coord.client()
            wait_registered(client, {a.pid: 1, b.pid: 1, third.pid: 1})
            pair.settled(client, {"pages_shared": N - 8, "pages_sharing": 2 * (N - 8)}, [a, b, third])
            # A worker that disconnects first and exits later (its ghost is
            # buried when its pidfd says it exited).
            third.call("shmdedup.set_socket(SOCKET + '.elsewhere')")
            wait_registered(client, pair.registered())
            assert client.stats()["pages_sharing"] == 2 * (N - 8)
            assert third.close() == 0
            pair.settled(client, {"pages_shared": N - 8, "pages_sharing": N - 8})
            # One killed outright: a's pages lose their last co-sharer, are
            # unmerged (a slot with one sharer saves nothing) and every slot is freed.
            os.kill(b.pid, signal.SIGKILL)
            b.proc.join(20)
            assert b.proc.exitcode == -signal.SIGKILL
            wait_registered(client, {a.pid: 1})
            wait_for(lambda: client.stats()["stable_pages_allocated"] == 0, 30, "every slot to be freed")
            assert a.call("result = states()")["a"] == bytes([PRIVATE]) * (N - 8) + bytes([ZERO]) * 8
            assert a.call("result = digests()")["a"] == digest(pair.data["a"])
            stats = client.stats()
            assert (stats["pages_shared"], stats["pages_sharing"], stats["ksm_zero_pages"]) == (0, 0, 8)
        finally:
            coord.stop()
    finally:
        third.close()


def view_copied(pair: Pair) -> list[int]:
    """Per worker: pages its COW breaks copied from a stable view so far."""
    return [w.call("result = _native._test_view_copied()") for w in pair.workers]


def test_breaks_copy_from_the_stable_view_and_never_through_a_stale_reference(
        pair: Pair, socket_path: str) -> None:
    """A break copies a merged page's bytes from the worker's view of the
    stable object, at the slot the merge recorded (sd_view.c), not from the
    faulting address.  That record must never point at the wrong bytes: not
    after the coordinator is replaced by one whose stable object holds other
    bytes at the very same slot numbers, not after a page is broken and merged
    again onto another slot, not after an unmerge and a merge."""
    for w in pair.workers:
        w.call("shmdedup.cow_fault_around(1)")      # one page per break
    coord = CoordinatorProcess(socket_path, **CONTROLS).go()
    try:
        wait_for(lambda: all_merged(pair.states()), 30, "every page of both workers to merge")
        coord.client().set("run", 0)     # the broken pages stay private until the restart
        before = view_copied(pair)
        for page in (5, 30, 12):
            pair.write("a", page * P + 7, b"x")
        assert [c - b for c, b in zip(view_copied(pair), before)] == [3, 3], "breaks did not copy from the view"
        pair.check_bytes()
    finally:
        coord.kill()

    # A new coordinator: a new stable object, whose slots 0, 1, ... hold the
    # pages of region b and the three broken pages of a.  The pages the old
    # one merged stay merged on the old object; their records name a view
    # the agents closed when the connection dropped.
    coord = CoordinatorProcess(socket_path, **CONTROLS).go()
    try:
        client = coord.client()
        wait_registered(client, pair.registered(), timeout=20)
        pair.new("b", region_data(2, N, zeros=0))
        wait_for(lambda: pair.states("b") == [converged(pair.data["b"])] * 2
                 and pair.states("a") == [converged(pair.data["a"])] * 2, 30, "b and a's broken pages to merge")
        stats = pair.settled(client, {"pages_inherited": 2 * (N - 3), "stable_pages_allocated": N + 3})
        assert stats["pages_shared"] == N + 3                 # slots 0 .. N + 2 in use again

        # Inherited pages: copied from their own mapping, never from the new
        # view at the same slot numbers (which hold b's bytes).
        inherited = [p for p in range(N - 8) if p not in (5, 30, 12)]
        random.Random(3).shuffle(inherited)
        before = view_copied(pair)
        for page in inherited:
            pair.write("a", page * P + 100, b"y")
        assert view_copied(pair) == before
        pair.check_bytes()

        # Pages merged by this coordinator, among them the three broken and
        # merged again onto new slots: copied from the current view.
        before = view_copied(pair)
        for page in (12, 5, 30, 40, 3):
            pair.write("a" if page in (12, 5, 30) else "b", page * P + 9, b"z")
        assert [c - b for c, b in zip(view_copied(pair), before)] == [5, 5]
        pair.check_bytes()

        # Unmerge everything, merge again (slots reused for other content):
        # every break still reads the right bytes.
        client.set("run", 2)
        client.set("run", 1)
        # (The unmerged zero pages are holes, which the scan leaves alone.)
        wait_for(lambda: pair.states("b") == [converged(pair.data["b"])] * 2
                 and [s[:N - 8] for s in pair.states("a")] == [converged(pair.data["a"])[:N - 8]] * 2,
                 30, "everything to merge again")
        before = view_copied(pair)
        order = [("a", p) for p in range(0, N - 8, 3)] + [("b", p) for p in range(1, N, 3)]
        random.Random(4).shuffle(order)
        for name, page in order:
            pair.write(name, page * P + 11, b"w")
        assert [c - b for c, b in zip(view_copied(pair), before)] == [len(order)] * 2
        pair.check_bytes()
    finally:
        coord.kill()
