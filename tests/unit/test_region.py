"""shmdedup.worker.region.Region without a coordinator: sizes, views, argument rules,
closing.  Merging and copy-on-write are in test_cow.py (in child processes)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from shmdedup import _native
from shmdedup.errors import ArgumentError, Error, RegionClosedError
from shmdedup.worker.region import MERGEABLE, PAGE_SIZE, UNMERGEABLE, Region, pages_for
from tests.helpers import no_shm_leftovers, reaper, shm_names  # noqa: F401

P = PAGE_SIZE

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


@pytest.fixture
def region():
    r = Region(4 * P)
    yield r
    r.close()


# ---- sizes ---------------------------------------------------------------

@pytest.mark.parametrize("size, pages", [(1, 1), (P - 1, 1), (P, 1), (P + 1, 2), (10 * P, 10), (10 * P + 1, 11)])
def test_size_rounds_up_to_pages(size: int, pages: int) -> None:
    with Region(size) as r:
        assert r.npages == pages == pages_for(size)
        assert r.size == r.nbytes == len(r) == pages * P
        assert os.fstat(r.backing_fd).st_size == pages * P
        assert r.allocated_bytes() == 0  # nothing touched yet
        assert r.states() == bytes(pages)  # all PRIVATE
        assert r.merged_pages() == 0


@pytest.mark.parametrize("size", [0, -1, -P])
def test_size_must_be_positive(size: int) -> None:
    with pytest.raises(ArgumentError):
        Region(size)


@pytest.mark.parametrize("size", [1.0, "4096", None, True, b"1"])
def test_size_must_be_an_int(size: object) -> None:
    with pytest.raises(ArgumentError) as e:
        Region(size)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError) and isinstance(e.value, Error)


def test_size_accepts_numpy_int() -> None:
    with Region(np.int64(3 * P)) as r:
        assert r.npages == 3


def test_objects_are_unlinked_and_cloexec() -> None:
    with Region(P) as r:
        assert os.fstat(r.backing_fd).st_nlink == 0
        assert os.fstat(r.meta_fd).st_nlink == 0
        assert not os.get_inheritable(r.backing_fd)
        assert shm_names({os.getpid()}) == set()


# ---- views -----------------------------------------------------------------

def test_memoryview_round_trip(region: Region) -> None:
    with memoryview(region) as m:
        assert (m.format, m.itemsize, m.nbytes, m.readonly, m.contiguous) == ("B", 1, 4 * P, False, True)
        assert region.exports == 1
        m[P - 2:P + 2] = b"edge"
        m[-1] = 0xAB
        assert bytes(m[P - 2:P + 2]) == b"edge"
    assert region.exports == 0
    assert os.pread(region.backing_fd, 4, P - 2) == b"edge"  # it is the backing, MAP_SHARED
    assert os.pread(region.backing_fd, 1, 4 * P - 1) == b"\xab"
    assert region.allocated_bytes() == 3 * P


def test_writes_through_the_backing_are_seen(region: Region) -> None:
    os.pwrite(region.backing_fd, b"xyz", 2 * P)
    assert bytes(memoryview(region)[2 * P:2 * P + 3]) == b"xyz"


def test_ndarray_round_trip(region: Region) -> None:
    a = region.ndarray(np.float64, (4, P // 8))
    assert a.shape == (4, P // 8) and a.dtype == np.float64 and a.flags.writeable
    a[1, :] = np.arange(P // 8)
    b = region.ndarray(np.float64, P // 8, offset=P)
    assert np.array_equal(b, np.arange(P // 8))
    c = region.ndarray()  # default: every byte
    assert c.shape == (4 * P,) and c.dtype == np.uint8
    assert c.ctypes.data == region.address
    assert region.exports == 3
    del a, b, c
    gc.collect()
    assert region.exports == 0


def test_ndarray_shapes(region: Region) -> None:
    assert region.ndarray(np.uint8, ()).shape == ()  # one item
    assert region.ndarray(np.uint8, 0).shape == (0,)
    assert region.ndarray(np.uint8, (0, 5)).shape == (0, 5)
    assert region.ndarray(np.int32, np.int64(3)).shape == (3,)
    assert region.ndarray(np.uint8, offset=4 * P).shape == (0,)  # at the very end: empty
    assert region.ndarray(np.uint16, offset=4 * P - 2).shape == (1,)  # exactly fits
    assert region.ndarray(np.dtype([("a", "u1"), ("b", "<f8")]), 3, offset=1).shape == (3,)  # packed: align 1


@pytest.mark.parametrize("dtype", ["O", "V0", "not-a-dtype", np.dtype([("o", "O")])])
def test_ndarray_bad_dtype(region: Region, dtype: object) -> None:
    with pytest.raises(ArgumentError) as e:
        region.ndarray(dtype)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("shape", [(4 * P + 1,), (2, 2 * P + 1), -1, (1.0,), ("2",), (True,)])
def test_ndarray_bad_shape(region: Region, shape: object) -> None:
    with pytest.raises(ArgumentError):
        region.ndarray(np.uint8, shape)


@pytest.mark.parametrize("dtype, offset", [(np.uint8, 4 * P + 1), (np.uint8, -1), (np.uint8, 1.0), (np.uint8, True),
                                           (np.float64, 4), (np.int32, 2), (np.complex128, 8 * 3 + 4)])
def test_ndarray_bad_offset_or_alignment(region: Region, dtype: object, offset: object) -> None:
    with pytest.raises(ArgumentError):
        region.ndarray(dtype, offset=offset)


def test_ndarray_needs_room(region: Region) -> None:
    with pytest.raises(ArgumentError, match="needs"):
        region.ndarray(np.uint16, 2, offset=4 * P - 2)
    with pytest.raises(ArgumentError, match="needs"):
        region.ndarray(np.uint64, 2, offset=4 * P - 8)


# ---- advice --------------------------------------------------------------------

def test_advise_records_runs(region: Region) -> None:
    assert region.advice_runs() == []
    region.advise(MERGEABLE, P, 2 * P)
    assert region.advice_runs() == [(1, 2)]
    region.advise(MERGEABLE, 3 * P, 1)  # length rounds up to a page
    assert region.advice_runs() == [(1, 3)]
    region.advise(UNMERGEABLE, 2 * P, P)
    assert region.advice_runs() == [(1, 1), (3, 1)]
    region.advise(MERGEABLE)  # default: whole region
    assert region.advice_runs() == [(0, 4)]
    region.advise(UNMERGEABLE, 0, 0)  # empty range: no-op, like madvise
    assert region.advice_runs() == [(0, 4)]
    region.advise(UNMERGEABLE, np.int64(0), np.int64(4 * P))
    assert region.advice_runs() == []


def test_mergeable_at_creation() -> None:
    with Region(3 * P, mergeable=True) as r:
        assert r.advice_runs() == [(0, 3)]
    with Region(3 * P, mergeable=False) as r:
        assert r.advice_runs() == []


def test_advise_at_the_end(region: Region) -> None:
    region.advise(MERGEABLE, 4 * P, 0)  # offset == size, empty: allowed (madvise too)
    region.advise(MERGEABLE, 3 * P)  # length None: to the end
    assert region.advice_runs() == [(3, 1)]


@pytest.mark.parametrize("offset, length", [
    (1, P), (P - 1, P), (P // 2, None),          # unaligned offset
    (0, 4 * P + 1), (3 * P, P + 1), (5 * P, 0),  # past the end
    (5 * P, None),                               # offset past the end, length to the end
    (-P, P), (0, -1),                            # negative
    (True, P), (0, False), ("0", P), (0, "4096"), (0.0, P), (0, float(P)),  # types
])
def test_advise_argument_rules(region: Region, offset: object, length: object) -> None:
    with pytest.raises(ArgumentError) as e:
        region.advise(MERGEABLE, offset, length)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError)
    assert region.advice_runs() == []  # nothing recorded


@pytest.mark.parametrize("offset, length", [
    (1, P), (P // 2, None), (0, 4 * P + 1), (5 * P, 0), (5 * P, None), (-P, P), (0, -1),
    (True, P), (0, False), ("0", P), (0.0, P),
])
def test_merge_now_argument_rules_are_advises(region: Region, offset: object, length: object) -> None:
    """merge_now checks its range as advise does, before anything else: no
    advice recorded, no coordinator asked."""
    with pytest.raises(ArgumentError) as e:
        region.merge_now(offset, length)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError)
    assert region.advice_runs() == []


def test_merge_now_of_nothing_is_zero(region: Region) -> None:
    assert region.merge_now(4 * P, 0) == 0
    assert region.merge_now(P, 0) == 0
    assert region.advice_runs() == []


def test_checksums_are_hints_of_private_pages_with_data() -> None:
    """The worker's lookup hints for merge_now: XXH64 of each private page
    that holds data, 0 for holes, which are not read (reading one through
    the mapping would allocate it)."""
    r = Region(8 * P)
    a = r.ndarray(np.uint8, (8, P))
    pages = {1: np.full(P, 7, np.uint8), 2: np.zeros(P, np.uint8),      # written zeros: data
             5: np.arange(P, dtype=np.uint8), 6: np.arange(P, dtype=np.uint8)[::-1].copy()}
    for i, v in pages.items():
        a[i] = v
    del a
    h = np.frombuffer(r.checksums(0, 8), np.uint64)
    assert r.allocated_bytes() == 4 * P          # the holes stayed holes
    for i, v in pages.items():
        assert h[i] == np.frombuffer(_native.hash_pages(v.tobytes()), np.uint64)[0]
    assert not h[[0, 3, 4, 7]].any()
    assert np.frombuffer(r.checksums(5, 2), np.uint64).tolist() == h[5:7].tolist()
    assert r.checksums(8, 0) == b""
    for bad in ((7, 2), (-1, 1), (0, -1)):
        with pytest.raises(ValueError):
            r.checksums(*bad)
    r.close()


@pytest.mark.parametrize("advice", [0, 11, 14, -12, True, False, "MERGEABLE", 12.0, None, b"\x0c"])
def test_advise_bad_advice(region: Region, advice: object) -> None:
    with pytest.raises(ArgumentError):
        region.advise(advice)  # type: ignore[arg-type]
    assert region.advice_runs() == []


def test_advise_accepts_numpy_advice(region: Region) -> None:
    region.advise(np.int32(MERGEABLE))
    assert region.advice_runs() == [(0, 4)]


def test_prepare_write_rounds_out_and_checks_range(region: Region) -> None:
    assert region.prepare_write() == 0  # nothing merged: nothing to break
    assert region.prepare_write(P + 5, 10) == 0  # unaligned is fine here (rounded out)
    with pytest.raises(ArgumentError):
        region.prepare_write(4 * P - 1, 2)
    with pytest.raises(ArgumentError):
        region.prepare_write(-1, 1)


# ---- I/O helpers without merged pages ------------------------------------------

def test_readinto_and_recv_into_plain(region: Region, tmp_path) -> None:
    import socket
    path = tmp_path / "data"
    path.write_bytes(b"0123456789" * 1000)
    with open(path, "rb", buffering=0) as f:
        assert region.readinto(f, P - 3, 7) == 7
    assert bytes(memoryview(region)[P - 3:P + 4]) == b"0123456"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert region.readinto(fd, 3 * P, 5) == 5
    finally:
        os.close(fd)
    assert bytes(memoryview(region)[3 * P:3 * P + 5]) == b"01234"
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"hello")
        assert region.recv_into(b, 2 * P - 2, 5) == 5
    assert bytes(memoryview(region)[2 * P - 2:2 * P + 3]) == b"hello"
    assert region.exports == 0  # the helpers release their views


# ---- closing ---------------------------------------------------------------------

def test_close_with_live_memoryview_raises_buffererror() -> None:
    r = Region(2 * P)
    m = memoryview(r)
    with pytest.raises(BufferError, match="1 exported"):
        r.close()
    assert not r.closed
    m[0] = 1  # still mapped and usable
    a = r.ndarray()
    with pytest.raises(BufferError, match="2 exported"):
        r.close()
    m.release()
    del a
    gc.collect()
    r.close()
    assert r.closed


def test_close_is_idempotent_and_drops_fds() -> None:
    r = Region(P)
    fds = (r.backing_fd, r.meta_fd)
    r.close()
    r.close()
    assert r.closed and r.backing_fd == r.meta_fd == -1
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert "closed" in repr(r)


def test_context_manager() -> None:
    with Region(P) as r:
        assert not r.closed
        memoryview(r)[0] = 7
    assert r.closed
    with pytest.raises(KeyError), Region(P) as r2:
        raise KeyError("inside")
    assert r2.closed


CLOSED_CALLS = {
    "memoryview": lambda r, sv: memoryview(r),
    "ndarray": lambda r, sv: r.ndarray(),
    "advise": lambda r, sv: r.advise(MERGEABLE),
    "advise_un": lambda r, sv: r.advise(UNMERGEABLE),
    "prepare_write": lambda r, sv: r.prepare_write(),
    "readinto": lambda r, sv: r.readinto(0, 0, 1),
    "recv_into": lambda r, sv: r.recv_into(None, 0, 1),
    "states": lambda r, sv: r.states(),
    "merged_pages": lambda r, sv: r.merged_pages(),
    "allocated_bytes": lambda r, sv: r.allocated_bytes(),
    "break_range": lambda r, sv: r.break_range(0, 1),
    "merge": lambda r, sv: r.merge(sv, np.array([0, 1, 0], dtype=np.int64).tobytes()),
    "address": lambda r, sv: r.address,
    "merge_now": lambda r, sv: r.merge_now(),
    "checksums": lambda r, sv: r.checksums(0, 1),
}


@pytest.fixture
def stable_view():
    fd = os.memfd_create("stable", os.MFD_CLOEXEC)
    os.ftruncate(fd, P)
    sv = _native.StableView(fd)
    os.close(fd)
    yield sv
    sv.close()


@pytest.mark.parametrize("call", CLOSED_CALLS.values(), ids=CLOSED_CALLS.keys())
def test_closed_region_raises_regionclosederror(call, stable_view) -> None:
    r = Region(P)
    r.close()
    with pytest.raises(RegionClosedError) as e:
        call(r, stable_view)
    assert isinstance(e.value, ValueError) and "closed" in str(e.value)


def test_closed_region_harmless_reads() -> None:
    r = Region(2 * P)
    r.close()
    assert r.closed and r.npages == 2 and r.size == 2 * P and r.breaks == 0 and r.exports == 0


def mapped_at(address: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(int(line.split("-", 1)[0], 16) == address for line in f)


def test_garbage_collected_region_unmaps() -> None:
    r = Region(64 * P)
    memoryview(r)[:] = b"\x01" * 64 * P
    address = r.address
    assert mapped_at(address)
    del r
    gc.collect()
    assert not mapped_at(address)


def test_many_regions_distinct() -> None:
    regions = [Region(P) for _ in range(20)]
    try:
        for i, r in enumerate(regions):
            memoryview(r)[0] = i
        assert [memoryview(r)[0] for r in regions] == list(range(20))
        assert len({r.id for r in regions}) == 20
        assert len({r.address for r in regions}) == 20
    finally:
        for r in regions:
            r.close()


def test_trap_installed_by_region() -> None:
    with Region(P):
        assert _native.trap_in_front()
