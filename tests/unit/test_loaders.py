"""shmdedup.worker.loading without a coordinator: fromfile, share and fill give numpy's
answers byte for byte (dtype, shape, order, flags), refuse bad input clearly and
leak nothing; the merger declares each chunk final before the next is written.
Merging itself, across processes, is in tests/integration/test_loading.py."""

from __future__ import annotations

import array
import gc
import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmdedup
from shmdedup.worker import loading, reading
from shmdedup.errors import ArgumentError, Error, ShortFileError
from shmdedup.worker.region import PAGE_SIZE, Region
from tests.helpers import no_shm_leftovers, reaper  # noqa: F401

P = PAGE_SIZE

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every range the helpers declare final, in order, interleaved with
    ("write", ...) events the tests add."""
    events: list[tuple[Any, ...]] = []
    real = Region.merge_now

    def spy(region: Region, offset: int = 0, length: int | None = None) -> int:
        events.append(("merge", offset, length))
        return real(region, offset, length)

    monkeypatch.setattr(Region, "merge_now", spy)
    return events


def merged_ranges(events: list[tuple[Any, ...]]) -> list[tuple[int, int]]:
    return [(e[1], e[2]) for e in events if e[0] == "merge"]


def assert_tiles(ranges: list[tuple[int, int]], nbytes: int, chunk: int) -> None:
    """Ranges are page-aligned, consecutive from 0, at most a chunk plus what
    a block may overrun, and cover nbytes."""
    pos = 0
    for off, length in ranges:
        assert off == pos and off % P == 0 and length > 0
        pos = off + -(-length // P) * P
    assert pos == -(-nbytes // P) * P


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- fromfile -------------------------------------------------------------------

DTYPES = ["u1", "<f8", ">i4", "c16", [("a", "<i2"), ("b", "<f4", (3,))], "?"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nbytes", [0, 1, P - 1, P, 5 * P + 7, 64 * P + 100])
def test_fromfile_equals_numpy(tmp_path: Path, dtype: Any, nbytes: int) -> None:
    data = np.random.default_rng(nbytes).bytes(nbytes)
    f = write(tmp_path / "data.bin", data)
    for chunk in (P, 3 * P, None):
        got = shmdedup.fromfile(f, dtype, chunk_bytes=chunk)
        want = np.fromfile(f, dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
        assert got.flags.writeable and got.flags.c_contiguous
        assert shmdedup.region_of(got) is not None


@pytest.mark.parametrize("count, offset", [(0, 0), (1, 0), (10, 3), (-1, 8), (-1, 4000), (-1, 4096 * 3)])
def test_fromfile_count_and_offset(tmp_path: Path, count: int, offset: int) -> None:
    f = write(tmp_path / "d.bin", np.arange(4096 * 2, dtype=np.uint16).tobytes())
    got = shmdedup.fromfile(f, np.uint16, count, offset=offset, chunk_bytes=P)
    want = np.fromfile(f, np.uint16, count, offset=offset)
    assert np.array_equal(got, want) and got.dtype == want.dtype


def test_fromfile_file_object_position_like_numpy(tmp_path: Path) -> None:
    f = write(tmp_path / "d.bin", bytes(range(256)) * 100)
    with open(f, "rb") as a, open(f, "rb") as b:
        a.read(5)
        b.read(5)
        got = shmdedup.fromfile(a, np.uint8, 1000, offset=3, chunk_bytes=P)
        want = np.fromfile(b, np.uint8, 1000, offset=3)
        assert np.array_equal(got, want) and a.tell() == b.tell() == 1008
        rest = shmdedup.fromfile(a, np.uint32)  # count -1: whole items to the end
        assert np.array_equal(rest, np.fromfile(b, np.uint32))


def test_fromfile_from_bytesio_and_pipe() -> None:
    data = np.random.default_rng(1).bytes(3 * P + 5)
    assert shmdedup.fromfile(io.BytesIO(data), np.uint8).tobytes() == data
    r, w = os.pipe()
    t = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    t.start()
    try:
        with open(r, "rb", buffering=0) as pipe:
            with pytest.raises(ArgumentError, match="not seekable"):
                shmdedup.fromfile(pipe, np.uint8)
            got = shmdedup.fromfile(pipe, np.uint8, count=len(data) - 10, offset=10, chunk_bytes=P)
    finally:
        t.join()
    assert got.tobytes() == data[10:]


def test_fromfile_short_file_raises(tmp_path: Path) -> None:
    f = write(tmp_path / "d.bin", bytes(10))
    with pytest.raises(ShortFileError, match="needs 12") as e:
        shmdedup.fromfile(f, np.uint32, count=3)
    assert isinstance(e.value, EOFError) and isinstance(e.value, Error)
    with pytest.raises(ShortFileError, match="past the end"):
        shmdedup.fromfile(f, np.uint8, offset=11)
    assert shmdedup.fromfile(f, np.uint8, offset=10).size == 0  # at the end: empty, as numpy
    with pytest.raises(ShortFileError):
        shmdedup.fromfile(io.BytesIO(bytes(10)), np.uint8, count=11)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "no such dtype"}, "dtype"),
    ({"dtype": object}, "Python objects"),
    ({"dtype": [("a", "O")]}, "Python objects"),
    ({"dtype": "V0"}, "no size"),
    ({"count": -2}, "count"),
    ({"count": 1.5}, "count"),
    ({"count": True}, "count"),
    ({"offset": -1}, "offset"),
    ({"offset": 2.0}, "offset"),
    ({"sep": ","}, "text files"),
    ({"chunk_bytes": P - 1}, "chunk_bytes"),
    ({"chunk_bytes": "4M"}, "chunk_bytes"),
])
def test_fromfile_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    f = write(tmp_path / "d.bin", bytes(100))
    with pytest.raises(ArgumentError, match=match) as e:
        shmdedup.fromfile(f, **kwargs)
    assert isinstance(e.value, ValueError)


def test_fromfile_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="path or a binary file"):
        shmdedup.fromfile(3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="path or a binary file"):
        with open(write(tmp_path / "t.txt", b"x"), "r") as text:
            shmdedup.fromfile(text)
    with pytest.raises(FileNotFoundError):
        shmdedup.fromfile(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        shmdedup.fromfile(tmp_path)


def test_fromfile_declares_each_chunk_before_reading_the_next(tmp_path: Path,
                                                              declared: list[tuple[Any, ...]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = 10 * P + 123
    f = write(tmp_path / "d.bin", np.random.default_rng(2).bytes(nbytes))
    real = reading.Source.readinto

    def spy(self: Any, region: Any, offset: int, n: int) -> int:
        declared.append(("read", offset, n))
        return real(self, region, offset, n)

    monkeypatch.setattr(reading.Source, "readinto", spy)
    got = shmdedup.fromfile(f, np.uint8, chunk_bytes=3 * P)
    assert got.tobytes() == f.read_bytes()
    assert_tiles(merged_ranges(declared), nbytes, 3 * P)
    # read 3 pages, declare them, read the next 3...
    assert [e[0] for e in declared] == ["read", "merge"] * 4
    for read, merge in zip(declared[::2], declared[1::2]):
        assert merge[1] == read[1] and merge[2] >= read[2]


# ---- share ------------------------------------------------------------------------

def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    big = rng.standard_normal((300, 500))
    ro = big.copy()
    ro.flags.writeable = False
    return {
        "c": big, "f": np.asfortranarray(big), "strided": big[::2, ::3], "reversed": big[::-1],
        "transposed": big.T, "readonly": ro, "zero_d": np.array(2.5), "one": np.array([7], np.int8),
        "big_endian": big.astype(">i4"), "bool": big > 0,
        "structured": np.zeros(10000, dtype=[("a", "<i4"), ("b", "<f8", (3,))]),
        "axes_permuted": rng.integers(0, 9, (40, 50, 60)).transpose(2, 0, 1),
        "rows_over_a_chunk": rng.standard_normal((3, 5000)),
        "readonly_f": np.asfortranarray(ro),
    }


@pytest.mark.parametrize("name", list(arrays()))
def test_share_keeps_type_dtype_shape_order_and_flags(name: str) -> None:
    a = arrays()[name]
    for chunk in (P, None):
        s = shmdedup.share(a, chunk_bytes=chunk)
        assert type(s) is np.ndarray and s.dtype == a.dtype and s.shape == a.shape
        assert s.tobytes() == a.tobytes()
        assert s.flags.writeable == a.flags.writeable
        assert s.flags.c_contiguous == a.flags.c_contiguous or not a.flags.contiguous
        assert s.flags.f_contiguous == a.flags.f_contiguous or not a.flags.contiguous
        assert sum(abs(st) * (n - 1) for st, n in zip(s.strides, s.shape)) + s.itemsize == s.nbytes  # dense
        # The axis order of memory is kept (np.copy(order="K")).
        assert sorted(range(a.ndim), key=lambda i: -abs(a.strides[i])) == \
            sorted(range(s.ndim), key=lambda i: -s.strides[i])
        assert shmdedup.region_of(s) is not None and not np.shares_memory(s, a)


def test_share_copies_what_it_is_given() -> None:
    a = np.arange(10000.0)
    s = shmdedup.share(a)
    s[0] = -1
    assert a[0] == 0  # a copy, not a view


@pytest.mark.parametrize("obj", [np.float64(1.5), np.int8(3), np.array([]), np.zeros((0, 5)), b"",
                                 bytearray(), np.str_("x")])
def test_share_returns_scalars_and_empty_things_unchanged(obj: Any) -> None:
    assert shmdedup.share(obj) is obj


def test_share_bytes_is_a_read_only_equal_memoryview() -> None:
    data = bytes(range(256)) * 100
    s = shmdedup.share(data)
    assert isinstance(s, memoryview) and s.readonly and s.format == "B" and s.nbytes == len(data)
    assert s == data and bytes(s) == data and hash(s) == hash(data) and len(s) == len(data)
    assert np.frombuffer(s, np.uint8).tobytes() == data
    with pytest.raises(TypeError):
        s[0] = 1  # type: ignore[index]
    assert shmdedup.region_of(s) is not None


def test_share_bytearray_and_memoryviews_keep_format_shape_and_flag() -> None:
    ba = bytearray(b"ab" * 5000)
    s = shmdedup.share(ba)
    assert s == ba and not s.readonly
    s[0] = ord("z")
    assert ba[0] == ord("a")
    for mv in (memoryview(array.array("q", range(3000))),
               memoryview(np.arange(24.0).reshape(4, 6)).toreadonly(),
               memoryview(np.arange(24.0).reshape(4, 6))[::2],
               memoryview(np.arange(3000, dtype=">i4"))):
        s = shmdedup.share(mv)
        assert s == mv and s.format == mv.format and s.shape == mv.shape and s.readonly == mv.readonly


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "got list"), ("text", "got str"), (3, "got int"), (None, "got NoneType"),
    (np.array([None, 1]), "Python objects"), (np.ma.array([1, 2]), "MaskedArray"),
    (np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]), "recarray"), (memoryview(np.array([None, 1])), "Python objects"),
    (array.array("i", [1]), "got array"),
])
def test_share_refuses_what_it_cannot_keep(obj: Any, match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        shmdedup.share(obj)


def test_share_declares_chunks_in_order(declared: list[tuple[Any, ...]]) -> None:
    a = np.random.default_rng(4).standard_normal((3, 5000))  # rows bigger than the chunk
    s = shmdedup.share(a, chunk_bytes=2 * P)
    assert np.array_equal(s, a)
    assert_tiles(merged_ranges(declared), a.nbytes, 2 * P)
    f = shmdedup.share(np.asfortranarray(a), chunk_bytes=P)
    assert np.array_equal(f, a) and f.flags.f_contiguous


# ---- fill --------------------------------------------------------------------------

def test_fill_calls_consecutive_blocks_and_declares_each(declared: list[tuple[Any, ...]]) -> None:
    def rows(block: np.ndarray, start: int) -> None:
        declared.append(("fill", start, len(block)))
        assert not block.any()  # zeroed
        block[...] = np.arange(start, start + len(block))[:, None]

    a = shmdedup.fill((1000, 33), np.int32, rows, rows=100, chunk_bytes=P)
    assert a.shape == (1000, 33) and a.dtype == np.int32 and a.flags.c_contiguous and a.flags.writeable
    assert (a == np.arange(1000)[:, None]).all()
    fills = [e for e in declared if e[0] == "fill"]
    assert [(s, n) for _, s, n in fills] == [(s, 100) for s in range(0, 1000, 100)]
    assert_tiles(merged_ranges(declared), a.nbytes, P)
    # When a block is filled, less than a chunk of what came before is undeclared.
    seen = 0
    for e in declared:
        if e[0] == "fill":
            assert e[1] * 33 * 4 - seen < P
        else:
            seen = e[1] + e[2]


def test_fill_default_rows_follow_the_chunk() -> None:
    starts: list[int] = []
    a = shmdedup.fill(10 * P, np.uint8, lambda b, s: (starts.append(s), b.fill(s % 251)), chunk_bytes=2 * P)
    assert starts == list(range(0, 10 * P, 2 * P)) and a[-1] == (8 * P) % 251


def test_fill_error_propagates_and_frees_the_region() -> None:
    def boom(block: np.ndarray, start: int) -> None:
        if start:
            raise KeyError("boom")
        block.fill(1)

    with pytest.raises(KeyError):
        shmdedup.fill((100, P), np.uint8, boom, rows=10)
    gc.collect()  # the traceback held the block; the region goes with it


@pytest.mark.parametrize("args, kwargs, match", [
    (((), np.int8, lambda b, s: None), {}, "at least one dimension"),
    (((4,), np.int8, lambda b, s: None), {"rows": 0}, "rows"),
    (((4,), np.int8, None), {}, "callable"),
    (((4, -1), np.int8, lambda b, s: None), {}, "shape"),
    (((4,), object, lambda b, s: None), {}, "Python objects"),
])
def test_fill_bad_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        shmdedup.fill(*args, **kwargs)


def test_write_time_stats_count_declared_pages() -> None:
    before = loading.write_time_stats()
    shmdedup.share(np.ones(10 * P, np.uint8))
    after = loading.write_time_stats()
    assert after["pages_loaded"] - before["pages_loaded"] == 10
    assert after["pages_merged_at_write"] == before["pages_merged_at_write"]  # no coordinator here
