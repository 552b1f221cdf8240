"""shmdedup.coordinator.scan.stable: the slot allocator (against a set model) and stable segments."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shmdedup.errors import ArgumentError, ShmError
from shmdedup.coordinator.scan.stable import PAGE_SIZE as P
from shmdedup.coordinator.scan.stable import SlotAllocator, StableSegment


def our_shm_names() -> set[str]:
    marker = f"-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if "shmdedup" in n and marker in n}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    names, fds = our_shm_names(), open_fds()
    yield
    assert our_shm_names() == names
    assert open_fds() == fds


@pytest.fixture
def segment() -> Iterator[StableSegment]:
    with StableSegment(chunk_pages=8) as seg:
        yield seg


def page(byte: int) -> bytes:
    return bytes([byte]) * P


# --- SlotAllocator ---------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/grow against a plain set of used slots."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = SlotAllocator()
        self.capacity = 0
        self.used: set[int] = set()

    def run_is_free(self, start: int, n: int) -> bool:
        return start + n <= self.capacity and not any(s in self.used for s in range(start, start + n))

    @rule(extra=st.integers(0, 40))
    def grow(self, extra: int) -> None:
        self.capacity += extra
        self.slots.grow(self.capacity)

    @rule(n=st.integers(1, 24), hint=st.none() | st.integers(0, 150))
    def alloc(self, n: int, hint: int | None) -> None:
        if hint is not None and self.run_is_free(hint, n):
            expected: int | None = hint
        else:
            expected = next((s for s in range(self.capacity) if self.run_is_free(s, n)), None)
        assert self.slots.alloc(n, hint) == expected
        if expected is not None:
            self.used.update(range(expected, expected + n))

    @rule(data=st.data())
    def free_used(self, data: st.DataObject) -> None:
        if not self.used:
            return
        start = data.draw(st.sampled_from(sorted(self.used)))
        longest = 1
        while start + longest in self.used:
            longest += 1
        n = data.draw(st.integers(1, longest))
        self.slots.free(start, n)
        self.used.difference_update(range(start, start + n))

    @rule(start=st.integers(0, 150), n=st.integers(1, 10))
    def free_any(self, start: int, n: int) -> None:
        if start + n <= self.capacity and all(s in self.used for s in range(start, start + n)):
            self.slots.free(start, n)
            self.used.difference_update(range(start, start + n))
        else:
            before = self.slots.free_extents()
            with pytest.raises(ArgumentError):
                self.slots.free(start, n)
            assert self.slots.free_extents() == before

    @invariant()
    def matches_model(self) -> None:
        assert self.slots.capacity == self.capacity
        assert self.slots.used == len(self.used)
        assert self.slots.free_count == self.capacity - len(self.used)
        extents = self.slots.free_extents()
        free = [s for start, n in extents for s in range(start, start + n)]
        assert free == sorted(set(range(self.capacity)) - self.used)  # sorted, disjoint, exact
        for (a, n), (b, _) in zip(extents, extents[1:]):
            assert a + n < b  # coalesced: no two extents touch
        assert self.slots.largest_free() == max((n for _, n in extents), default=0)
        tail = extents[-1][1] if extents and sum(extents[-1]) == self.capacity else 0
        assert self.slots.free_at_end() == tail


AllocatorMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestAllocatorModel = AllocatorMachine.TestCase


def test_hint_continues_a_run() -> None:
    slots = SlotAllocator(64)
    assert slots.alloc(4) == 0
    assert slots.alloc(4, hint=4) == 4
    assert slots.alloc(4, hint=20) == 20  # free: taken exactly, even past first fit
    assert slots.alloc(4) == 8  # no hint: the lowest free run
    assert slots.alloc(4, hint=2) == 12  # hint in use: first fit instead
    assert slots.alloc(8, hint=16) == 24  # only [16, 20) free there
    assert slots.alloc(33, hint=32) is None
    assert slots.alloc(32, hint=32) == 32
    assert slots.used == 60 and slots.free_extents() == [(16, 4)]


def test_first_fit_prefers_lowest_address() -> None:
    slots = SlotAllocator(100)
    assert slots.alloc(100) == 0
    slots.free(80, 20)  # big run high up
    slots.free(10, 5)  # small run low down
    slots.free(30, 9)
    assert slots.alloc(5) == 10
    assert slots.alloc(6) == 30  # same size class as 9, below the big run
    assert slots.alloc(4) == 80  # [36, 39) is too short
    assert slots.largest_free() == 16
    assert slots.alloc(17) is None


def test_double_free_and_bad_ranges_are_rejected() -> None:
    slots = SlotAllocator(16)
    assert slots.alloc(8) == 0
    slots.free(2, 2)
    for start, n in [(2, 1), (3, 1), (1, 2), (3, 3), (0, 8), (8, 1), (15, 1), (16, 1), (14, 4)]:
        with pytest.raises(ArgumentError, match="double free|capacity"):
            slots.free(start, n)
    with pytest.raises(ValueError):  # ArgumentError is a ValueError too
        slots.free(2)
    assert slots.used == 6 and slots.free_extents() == [(2, 2), (8, 8)]
    slots.free(0, 2)
    slots.free(4, 4)
    assert slots.free_extents() == [(0, 16)]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.alloc(0),
        lambda s: s.alloc(True),
        lambda s: s.alloc(1.0),
        lambda s: s.alloc(1, hint=-1),
        lambda s: s.free(-1),
        lambda s: s.free(0, 0),
        lambda s: s.grow(3),
        lambda s: SlotAllocator(-1),
    ],
)
def test_allocator_rejects_bad_arguments(call: object) -> None:
    with pytest.raises(ArgumentError):
        call(SlotAllocator(4))  # type: ignore[operator]


def test_grow_coalesces_with_free_tail() -> None:
    slots = SlotAllocator(8)
    assert slots.alloc(6) == 0
    assert slots.alloc(4) is None
    slots.grow(8)  # same capacity: nothing to do
    slots.grow(12)
    assert slots.free_extents() == [(6, 6)] and slots.free_at_end() == 6
    assert slots.alloc(6) == 6
    assert slots.free_at_end() == 0 and slots.largest_free() == 0


def test_fragmented_first_fit_stays_correct() -> None:
    slots = SlotAllocator(1 << 16)
    assert slots.alloc(1 << 16) == 0
    for s in range(0, 1 << 16, 2):  # 32768 single free slots
        slots.free(s)
    assert slots.alloc(2) is None
    slots.free(65533)
    assert slots.alloc(2) == 65532
    assert slots.alloc(1) == 0


# --- StableSegment ---------------------------------------------------------------


def test_segment_grows_in_whole_chunks(segment: StableSegment) -> None:
    assert segment.size_bytes == 0 and os.fstat(segment.fd).st_size == 0
    assert segment.alloc(1) == 0
    assert segment.size_bytes == 8 * P
    assert segment.alloc(7) == 1
    assert segment.size_bytes == 8 * P
    assert segment.alloc(1) == 8
    assert segment.alloc(20) == 9  # the 7 free tail slots plus two more chunks
    assert segment.size_bytes == 32 * P == os.fstat(segment.fd).st_size
    assert segment.pages_in_use == 29
    assert segment.allocated_bytes() == 0  # nothing written yet


def test_segment_hint_grows_to_continue_the_tail(segment: StableSegment) -> None:
    assert segment.alloc(6) == 0
    assert segment.alloc(4, hint=6) == 6
    assert segment.size_bytes == 16 * P
    assert segment.alloc(6, hint=10) == 10
    assert segment.alloc(4, hint=0) == 16  # hint in use: first fit, then growth
    assert segment.alloc(1, hint=100) == 20  # no growth for a hint past the end
    assert segment.size_bytes == 24 * P


def test_segment_write_read_round_trip(segment: StableSegment) -> None:
    first = segment.alloc(3)
    assert first == 0
    data = page(1) + page(2) + page(3)
    segment.write(first, data)
    assert segment.read(first, 3) == data
    assert segment.read(1) == page(2)
    segment.write(1, memoryview(bytearray(page(9))))
    assert segment.read(0, 3) == page(1) + page(9) + page(3)
    assert segment.allocated_bytes() == 3 * P
    assert os.pread(segment.fd, 3 * P, 0) == segment.read(0, 3)


def test_segment_rejects_unallocated_and_partial_pages(segment: StableSegment) -> None:
    assert segment.alloc(2) == 0
    with pytest.raises(ArgumentError):
        segment.write(1, page(1) * 2)  # slot 2 is free
    with pytest.raises(ArgumentError):
        segment.write(0, b"x" * (P + 1))
    with pytest.raises(ArgumentError):
        segment.write(0, b"")
    with pytest.raises(ArgumentError):
        segment.read(2)
    with pytest.raises(ArgumentError):
        segment.read(-1)
    assert segment.allocated_bytes() == 0


def test_segment_free_punches(segment: StableSegment) -> None:
    assert segment.alloc(4) == 0
    segment.write(0, page(5) * 4)
    assert segment.allocated_bytes() == 4 * P
    segment.free(1, 2)
    assert segment.allocated_bytes() == 2 * P
    assert segment.pages_in_use == 2
    with pytest.raises(ArgumentError):
        segment.read(1)
    with pytest.raises(ArgumentError):  # double free: the live slot 0 is not punched
        segment.free(0, 2)
    assert segment.read(0) == page(5) and segment.allocated_bytes() == 2 * P
    assert segment.alloc(2) == 1
    assert segment.read(1, 2) == bytes(2 * P)  # a reused slot starts from zeros
    assert segment.size_bytes == 8 * P  # never shrinks


def test_segment_max_pages_cap() -> None:
    with StableSegment(chunk_pages=4, max_pages=5) as seg:
        assert seg.alloc(3) == 0
        assert seg.alloc(3) is None
        assert seg.alloc(2) == 3
        assert seg.alloc(1) is None
        seg.free(0, 3)
        assert seg.alloc(3) == 0
        assert seg.pages_in_use == 5
    with StableSegment(chunk_pages=4, max_pages=0) as seg:  # 0: no cap
        assert seg.alloc(100) == 0


def test_segment_close_is_idempotent() -> None:
    seg = StableSegment()
    ro = seg.readonly_fd()
    with seg:
        assert seg.alloc(1) == 0
        seg.write(0, page(7))
    assert seg.closed
    seg.close()
    for call in (lambda: seg.fd, lambda: seg.alloc(1), lambda: seg.read(0), seg.readonly_fd):
        with pytest.raises(ShmError) as info:
            call()
        assert info.value.errno == errno.EBADF
    try:  # handed-out fds outlive the segment object
        assert os.fstat(ro).st_size == 4096 * P
    finally:
        os.close(ro)


@pytest.mark.parametrize("kwargs", [{"chunk_pages": 0}, {"chunk_pages": 1.5}, {"max_pages": -1}])
def test_segment_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ArgumentError):
        StableSegment(**kwargs)  # type: ignore[arg-type]


# The worker's side of invariant 5: only a read-only fd; it reads the slots
# (pread and a PROT_READ mapping), but no shared writable mapping and no
# mprotect to PROT_WRITE. Raw libc calls, since a mistake could crash.
CHILD = textwrap.dedent(
    """
    import ctypes, errno, hashlib, json, mmap, os, sys
    fd, size = int(sys.argv[1]), int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    out = {"pread": hashlib.sha256(os.pread(fd, size, 0)).hexdigest()}
    try:
        mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        out["mmap_write"] = 0
    except OSError as exc:
        out["mmap_write"] = exc.errno
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    out["mapped"] = hashlib.sha256(ctypes.string_at(addr, size)).hexdigest()
    rc = libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE)
    out["mprotect_write"] = ctypes.get_errno() if rc else 0
    libc.munmap(addr, size)
    print(json.dumps(out))
    """
)


def test_worker_with_readonly_fd_reads_but_cannot_write(segment: StableSegment) -> None:
    assert segment.alloc(3) == 0
    data = page(0xA5) + page(0) + page(0x5A)
    segment.write(0, data)
    ro = segment.readonly_fd()
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(ro), str(3 * P)],
            pass_fds=(ro,),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(ro)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    digest = hashlib.sha256(data).hexdigest()
    assert out == {"pread": digest, "mapped": digest, "mmap_write": errno.EACCES, "mprotect_write": errno.EACCES}
