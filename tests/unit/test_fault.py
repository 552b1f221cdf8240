"""Fault injection (native/sd_fault.c): a process killed exactly between two
system calls of a merge or a break, checked from outside.

The test process plays the coordinator (it owns the stable segment) and keeps
descriptors of the victim's backing and state bytes, so after the SIGKILL it
sees exactly what the victim left half done: which pages are MERGING or
BREAKING, which backing pages are punched.  A second worker merged onto the
same slots must read its exact bytes throughout (DESIGN invariant 7), and the
stable slots must be untouched (invariant 5).
"""

from __future__ import annotations

import hashlib
import os
import signal

import numpy as np
import pytest

from shmdedup import _native, _shm
from shmdedup.coordinator.scan.stable import StableSegment
from tests.helpers import Worker, no_shm_leftovers, reaper, wait_for  # noqa: F401

P = _native.PAGE_SIZE
NPAGES = 8

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")

SETUP = """
import hashlib, os
import numpy as np
from shmdedup import _native
from shmdedup.worker.region import Region, PAGE_SIZE as P

def content(seed, npages):
    return np.random.default_rng(seed).integers(0, 2**63, npages * P // 8, dtype=np.uint64).view(np.uint8)

def new_region(npages, seed):
    global r, a
    r = Region(npages * P)
    a = r.ndarray()
    a[:] = content(seed, npages)
    send_fd(os.dup(r.backing_fd))
    send_fd(os.dup(r.meta_fd))
"""


def content(seed: int, npages: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, npages * P // 8, dtype=np.uint64).view(np.uint8)


def digest(buf: object) -> str:
    return hashlib.sha256(buf).hexdigest()


def singles(slot: int, npages: int) -> bytes:
    """One run per page: each page passes every merge point once."""
    return np.array([(i, 1, slot + i) for i in range(npages)], dtype=np.int64).tobytes()


class Scene:
    """A stable segment holding content(1), a survivor and a victim that both
    hold content(1) in a region of NPAGES pages."""

    def __init__(self) -> None:
        self.segment = StableSegment(chunk_pages=64)
        self.slot = self.segment.alloc(NPAGES)
        assert self.slot is not None
        self.segment.write(self.slot, content(1, NPAGES))
        self.fds: list[int] = []
        self.survivor = self._worker()
        self.victim = self._worker()
        self.backing, self.meta = self.fds[-2:]

    def _worker(self) -> Worker:
        w = Worker(setup=SETUP)
        ro = self.segment.readonly_fd()
        try:
            w.run("sv = _native.StableView(fds[0]); os.close(fds[0])", send_fds=(ro,))
        finally:
            os.close(ro)
        _, fds = w.run(f"new_region({NPAGES}, 1)")
        self.fds += fds
        return w

    def merge(self, w: Worker) -> bytes:
        return w.call("result = r.merge(sv, it)", it=singles(self.slot, NPAGES))

    def states(self) -> bytes:
        return os.pread(self.meta, NPAGES, 0)

    def present(self) -> list[bool]:
        """Which backing pages of the victim hold data (SEEK_DATA: reads nothing)."""
        mask = [False] * NPAGES
        for start, length in _shm.data_extents(self.backing, 0, NPAGES * P):
            for p in range(start // P, -(-(start + length) // P)):
                mask[p] = True
        return mask

    def expect_killed(self, code: str, **values: object) -> None:
        with pytest.raises(AssertionError, match="died"):
            self.victim.call(code, **values)
        self.victim.proc.join(10)
        assert self.victim.proc.exitcode == -signal.SIGKILL

    def check_survivor(self) -> None:
        assert self.survivor.call("result = bytes(a) == bytes(content(1, r.npages))")
        # Stable slots are written only by the coordinator (invariant 5).
        assert self.segment.read(self.slot, NPAGES) == content(1, NPAGES).tobytes()

    def close(self) -> None:
        self.survivor.close()
        self.victim.close()
        for fd in self.fds:
            os.close(fd)
        self.segment.close()


@pytest.fixture
def scene():
    s = Scene()
    yield s
    s.close()


def test_fault_points_are_named() -> None:
    assert _native._FAULT_POINTS == ("none", "merge_protected", "merge_mapped", "merge_punched",
                                     "break_copied", "break_mapped", "agent_merged",
                                     "agent_registered")


@pytest.mark.parametrize("bad, exc", [("nowhere", ValueError), (8, ValueError), (-1, ValueError),
                                      (2**70, ValueError), (True, TypeError), (1.0, TypeError),
                                      (b"merge_mapped", TypeError)])
def test_arm_fault_rejects_bad_points(bad: object, exc: type) -> None:
    with pytest.raises(exc):
        _native._test_arm_fault(bad)


def test_arm_fault_rejects_bad_countdowns_and_disarms() -> None:
    with pytest.raises(ValueError, match="countdown"):
        _native._test_arm_fault("merge_mapped", -1)
    with pytest.raises(TypeError):
        _native._test_arm_fault("merge_mapped", 0, True, 1)
    with pytest.raises(TypeError):
        _native._test_arm_fault("merge_mapped", "1")
    for off in (None, "none", 0):
        _native._test_arm_fault(off)
    with pytest.raises(ValueError):
        _native._fault_point(0)
    with pytest.raises(ValueError):
        _native._fault_point(len(_native._FAULT_POINTS))
    _native._fault_point(1)  # disarmed: nothing happens


def test_python_fault_point_kills_at_its_countdown() -> None:
    w = Worker(setup="from shmdedup import _native; AGENT = _native._FAULT_POINTS.index('agent_merged')")
    try:
        w.call("_native._test_arm_fault('agent_merged', 2)")
        w.call("_native._fault_point(AGENT); _native._fault_point(1); _native._fault_point(AGENT)")
        with pytest.raises(AssertionError, match="died"):
            w.call("_native._fault_point(AGENT)")
        w.proc.join(10)
        assert w.proc.exitcode == -signal.SIGKILL
    finally:
        w.close()


# Which backing pages still hold data when the victim dies merging page 2.
MERGE_POINTS = {
    "merge_protected": True,   # write-protected, nothing mapped or punched yet
    "merge_mapped": True,      # slot mapped over it, private copy not punched yet
    "merge_punched": False,    # punched, MERGED not published
}


@pytest.mark.parametrize("point", MERGE_POINTS)
def test_killed_mid_merge(scene: Scene, point: str) -> None:
    assert scene.merge(scene.survivor) == b"\x01" * NPAGES
    scene.victim.call(f"_native._test_arm_fault({point!r}, 2)")
    scene.expect_killed("r.merge(sv, it)", it=singles(scene.slot, NPAGES))
    # Runs 0 and 1 completed, run 2 died at the point, the rest never started.
    M, G, V = _native.MERGED, _native.MERGING, _native.PRIVATE
    assert scene.states() == bytes([M, M, G] + [V] * (NPAGES - 3))
    assert scene.present() == [False, False, MERGE_POINTS[point]] + [True] * (NPAGES - 3)
    scene.check_survivor()
    # The survivor still breaks and merges its pages normally.
    assert scene.survivor.call("a[2 * P] ^= 1; a[2 * P] ^= 1; result = r.breaks") == 1
    assert scene.merge(scene.survivor)[2] == 1
    scene.check_survivor()


@pytest.mark.parametrize("point", ["break_copied", "break_mapped"])
def test_killed_mid_break(scene: Scene, point: str) -> None:
    for w in (scene.survivor, scene.victim):
        assert scene.merge(w) == b"\x01" * NPAGES
    assert scene.present() == [False] * NPAGES
    scene.victim.call(f"_native._test_arm_fault({point!r}, 1)")
    # Writes to pages 0, 1, 2: the trap breaks page 0, dies breaking page 1.
    scene.expect_killed("a[0] ^= 1; a[P] ^= 1; a[2 * P] ^= 1")
    B, M, V = _native.BREAKING, _native.MERGED, _native.PRIVATE
    assert scene.states() == bytes([V, B] + [M] * (NPAGES - 2))
    # Page 1's content was written back before the death at either point.
    assert scene.present() == [True, True] + [False] * (NPAGES - 2)
    assert os.pread(scene.backing, P, P) == content(1, NPAGES)[P:2 * P].tobytes()
    scene.check_survivor()


def test_killed_mid_explicit_unmerge(scene: Scene) -> None:
    """break_range covers runs: a death in its second run leaves the first private."""
    for w in (scene.survivor, scene.victim):
        assert scene.merge(w) == b"\x01" * NPAGES
    # Page 3 private first: break_range then breaks runs [0, 3) and [4, 8).
    scene.victim.call("r.break_range(3, 1)")
    scene.victim.call("_native._test_arm_fault('break_mapped', 1)")
    scene.expect_killed("r.break_range(0, r.npages)")
    B, V = _native.BREAKING, _native.PRIVATE
    assert scene.states() == bytes([V, V, V, V, B, B, B, B])
    scene.check_survivor()


def test_held_thread_stops_at_its_point_and_the_rest_runs_on(scene: Scene) -> None:
    """hold=True: the thread that reaches the point stays there (here a
    daemon thread breaking the run [4, 8) with the GIL released), while the
    process keeps serving and still exits when asked (tests/exit holds merges
    and breaks this way).  A break in the trap would hold the GIL too: a
    Python write faults with it held."""
    for w in (scene.survivor, scene.victim):
        assert scene.merge(w) == b"\x01" * NPAGES
    scene.victim.call("r.break_range(3, 1)")
    scene.victim.call("import threading; _native._test_arm_fault('break_copied', 1, True); "
                      "t = threading.Thread(target=r.break_range, args=(0, r.npages), daemon=True); t.start()")
    B, V = _native.BREAKING, _native.PRIVATE
    wait_for(lambda: scene.victim.call("result = _native._test_fault_held()") == 1, 30,
             "the break of [4, 8) to be held")
    assert scene.states() == bytes([V] * 4 + [B] * 4)
    # The main thread runs on: it writes and reads the pages broken before the hold.
    assert scene.victim.call("a[0] ^= 1; a[0] ^= 1; "
                             "result = (bytes(a[:4 * P]) == bytes(content(1, 8)[:4 * P]), t.is_alive())") \
        == (True, True)
    assert scene.states() == bytes([V] * 4 + [B] * 4)
    assert scene.victim.close() == 0
    scene.check_survivor()


def test_held_python_point_releases_the_gil() -> None:
    w = Worker(setup="from shmdedup import _native; AGENT = _native._FAULT_POINTS.index('agent_merged')")
    try:
        w.call("import threading; _native._test_arm_fault('agent_merged', 0, True); "
               "t = threading.Thread(target=_native._fault_point, args=(AGENT,), daemon=True); t.start()")
        wait_for(lambda: w.call("result = _native._test_fault_held()") == 1, 30, "the thread to be held")
        assert w.call("t.join(0.2); result = t.is_alive()") is True
        assert w.close() == 0
    finally:
        w.close()


def test_disarmed_points_cost_nothing_visible(scene: Scene) -> None:
    scene.victim.call("_native._test_arm_fault('break_copied', 0); _native._test_arm_fault(None)")
    assert scene.merge(scene.victim) == b"\x01" * NPAGES
    assert scene.victim.call("a[:] ^= 1; a[:] ^= 1; result = (r.breaks, bytes(a) == bytes(content(1, r.npages)))") \
        == (NPAGES, True)
