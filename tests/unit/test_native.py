"""shmdedup._native, the plain functions: checksums (xxhash is the oracle), page
reads that never allocate holes (DESIGN invariant 4), compare, zero test, punch."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from shmdedup import _native, _shm
from tests.helpers import allocated_bytes, child_env, no_shm_leftovers, reaper  # noqa: F401

P = _native.PAGE_SIZE

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


@pytest.fixture
def shm():
    """An 8-page shm object, closed after the test."""
    fd = _shm.create(8 * P, "native")
    yield fd
    os.close(fd)


def page(byte: int) -> bytes:
    return bytes([byte]) * P


# ---- constants --------------------------------------------------------------

def test_constants() -> None:
    assert P == os.sysconf("SC_PAGE_SIZE")
    states = [_native.PRIVATE, _native.MERGING, _native.MERGED, _native.BREAKING, _native.ZERO]
    assert _native.PRIVATE == 0  # a fresh (zero-filled) metadata object means all private
    assert len(set(states)) == 5


# ---- hash_pages -----------------------------------------------------------------

def checksums(raw: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 31, 32, 33, 63, 64, 65, 100, 4095, 4096])
@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**64 - 1])
def test_xxh64_known_answers(n: int, seed: int) -> None:
    data = bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))
    assert _native.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1))
def test_xxh64_matches_xxhash(data: bytes, seed: int) -> None:
    assert _native.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


def test_hash_pages_is_xxh64_of_each_page() -> None:
    rng = np.random.default_rng(7)
    buf = rng.integers(0, 256, 5 * P, dtype=np.uint8)
    buf[2 * P:3 * P] = 0
    raw = _native.hash_pages(buf)
    assert isinstance(raw, bytes) and len(raw) == 5 * 8
    want = [xxhash.xxh64_intdigest(buf[i * P:(i + 1) * P].tobytes()) for i in range(5)]
    assert checksums(raw) == want
    assert np.array_equal(np.frombuffer(raw, dtype="<u8"), np.array(want, dtype=np.uint64))


HASH_PAGES_CODE = """
import json, sys, numpy as np
from shmdedup import _native
P = _native.PAGE_SIZE
rng = np.random.default_rng(11)
out = {"simd": _native.HASH_SIMD, "hashes": []}
for n in range(20):
    raw = bytearray(rng.integers(0, 256, n * P + 1, dtype=np.uint8).tobytes())
    if n > 2:
        raw[1 + P:1 + 2 * P] = bytes(P)              # a zero page among them
    view = memoryview(raw)[1:]                       # unaligned: loads are unaligned
    out["hashes"].append(np.frombuffer(_native.hash_pages(view), "<u8").tolist())
json.dump(out, sys.stdout)
"""


@pytest.mark.parametrize("no_simd", ["", "1"])
def test_hash_pages_eight_at_a_time_and_one_at_a_time_are_xxh64(no_simd: str) -> None:
    """hash_pages hashes groups of 8 pages with AVX-512 where the CPU has it,
    one page at a time otherwise (or with SHMDEDUP_NO_SIMD set): both are
    XXH64 of each page, for any count (groups of 8 and a remainder)."""
    proc = subprocess.run([sys.executable, "-c", HASH_PAGES_CODE], capture_output=True, text=True,
                          timeout=60, env=child_env({"SHMDEDUP_NO_SIMD": no_simd}), check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    if no_simd:
        assert got["simd"] == 0
    rng = np.random.default_rng(11)
    for n, hashes in enumerate(got["hashes"]):
        raw = bytearray(rng.integers(0, 256, n * P + 1, dtype=np.uint8).tobytes())
        if n > 2:
            raw[1 + P:1 + 2 * P] = bytes(P)
        data = bytes(raw[1:])
        assert hashes == [xxhash.xxh64_intdigest(data[i * P:(i + 1) * P]) for i in range(n)], n


def test_hash_pages_empty_and_bad_sizes() -> None:
    assert _native.hash_pages(b"") == b""
    for n in (1, P - 1, P + 1, 3 * P - 8):
        with pytest.raises(ValueError, match="multiple of the page size"):
            _native.hash_pages(bytes(n))


def test_hash_pages_equal_pages_equal_checksums() -> None:
    raw = checksums(_native.hash_pages(page(3) + page(4) + page(3)))
    assert raw[0] == raw[2] != raw[1]


# ---- read_pages ------------------------------------------------------------------

def idx(*pages: int) -> bytes:
    return np.array(pages, dtype=np.int64).tobytes()


def test_read_pages_reads_data_and_holes_without_allocating(shm: int) -> None:
    for p in (1, 5, 6, 7):
        os.pwrite(shm, page(p), p * P)
    before = allocated_bytes(shm)
    assert before == 4 * P
    out = bytearray(8 * P)
    hashes = bytearray(8 * 8)
    _native.read_pages(shm, idx(*range(8)), out, hashes)
    for p in range(8):
        assert out[p * P:(p + 1) * P] == (page(p) if p in (1, 5, 6, 7) else bytes(P)), p
    assert hashes == _native.hash_pages(bytes(out))
    # Holes read through pread stay holes: a mapping would have allocated them.
    assert allocated_bytes(shm) == before


def test_read_pages_any_order_and_duplicates(shm: int) -> None:
    for p in range(8):
        os.pwrite(shm, page(0x10 + p), p * P)
    order = [7, 0, 1, 2, 2, 6, 3, 4, 5, 4]
    out = np.zeros(len(order) * P, dtype=np.uint8)
    _native.read_pages(shm, idx(*order), out)
    for i, p in enumerate(order):
        assert out[i * P:(i + 1) * P].tobytes() == page(0x10 + p)


def test_read_pages_out_may_be_larger_and_past_eof_reads_zero(shm: int) -> None:
    os.pwrite(shm, page(9), 7 * P)
    out = bytearray(b"\xff" * 4 * P)
    _native.read_pages(shm, idx(7, 8, 9), out)  # 8 and 9 are past the end
    assert out[:P] == page(9)
    assert out[P:3 * P] == bytes(2 * P)
    assert out[3 * P:] == b"\xff" * P  # untouched
    _native.read_pages(shm, idx(), bytearray(0))


def pread_pages_between_markers(code: str) -> tuple[list[str], list[int]]:
    """Run code under strace; the pread64 calls between the BEGIN and END it
    writes to stderr, and the pages each read (sorted)."""
    proc = subprocess.run(["strace", "-f", "-e", "trace=pread64,write", "-o", "/dev/stderr",
                           "python", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, env=child_env(), check=False)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip("ptrace not permitted here")
    assert proc.returncode == 0, proc.stderr
    between = proc.stderr.split("BEGIN", 1)[1].split("END", 1)[0]
    preads = [line for line in between.splitlines() if "pread64(" in line]
    return preads, sorted(int(line.rsplit("=", 1)[1]) // P for line in preads)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_read_pages_one_pread_per_consecutive_run() -> None:
    code = """
        import os, numpy as np
        from shmdedup import _native, _shm
        P = _native.PAGE_SIZE
        fd = _shm.create(64 * P, "strace")
        pages = [0, 1, 2, 3, 10, 11, 20, 5, 6, 7, 8]   # runs: 0-3, 10-11, 20, 5-8
        out = bytearray(len(pages) * P)
        os.write(2, b"BEGIN\\n")
        _native.read_pages(fd, np.array(pages, dtype=np.int64).tobytes(), out)
        os.write(2, b"END\\n")
    """
    preads, sizes = pread_pages_between_markers(code)
    assert sizes == [1, 2, 4, 4], preads


def test_read_pages_bad_arguments(shm: int) -> None:
    out = bytearray(2 * P)
    with pytest.raises(ValueError, match="multiple of the page size"):
        _native.read_pages(shm, idx(0), bytearray(P + 1))
    with pytest.raises(ValueError, match="pages"):
        _native.read_pages(shm, idx(0, 1, 2), out)  # out too small
    with pytest.raises(ValueError, match="int64"):
        _native.read_pages(shm, b"\0" * 12, out)
    with pytest.raises(ValueError, match="negative"):
        _native.read_pages(shm, idx(0, -1), out)
    with pytest.raises(ValueError, match="hashes"):
        _native.read_pages(shm, idx(0, 1), out, bytearray(8))
    with pytest.raises(TypeError):
        _native.read_pages(shm, idx(0), bytes(P))  # out must be writable
    with pytest.raises(OSError) as e:
        _native.read_pages(9999, idx(0), out)
    assert e.value.errno == errno.EBADF
    assert "pread" in str(e.value)


def test_read_pages_rejects_index_past_off_t(shm: int) -> None:
    # idx * PAGE_SIZE must not overflow off_t (a wrapped offset reads another page).
    assert 2**62 * P % 2**64 == 0  # would wrap to offset 0: page 0 read back silently
    os.pwrite(shm, page(1), 0)
    for bad in (2**62, 2**63 // P):
        with pytest.raises(ValueError, match="offset"):
            _native.read_pages(shm, idx(bad), bytearray(P))
    out = bytearray(b"\xff" * P)
    _native.read_pages(shm, idx(2**40), out)  # far past EOF, no wrap: zeros
    assert out == bytes(P)
    with pytest.raises(OSError) as e:  # offset fits, offset + length does not: the kernel says so
        _native.read_pages(shm, idx(2**63 // P - 1), bytearray(P))
    assert e.value.errno == errno.EINVAL


# ---- compare_slots ----------------------------------------------------------------

def compare_oracle(fd: int, buf: bytes, buf_idx: list[int], slots: list[int]) -> list[int]:
    """The Python path compare_slots replaces: pread each slot, compare."""
    out = []
    for b, s in zip(buf_idx, slots):
        other = os.pread(fd, P, s * P)
        other += bytes(P - len(other))       # past EOF reads as zeros
        out.append(int(buf[b * P:(b + 1) * P] == other))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_compare_slots_matches_pread_and_compare(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200                                  # more than one 64-page read
    fd = _shm.create(n * P, "cmp")
    try:
        content = rng.integers(0, 256, n * P, dtype=np.uint8)
        content[5 * P:6 * P] = 0             # a page left as a hole below
        os.pwrite(fd, content[:5 * P].tobytes(), 0)
        os.pwrite(fd, content[6 * P:].tobytes(), 6 * P)
        # Runs of consecutive slots (long, short, single), repeats, any order,
        # the hole, and slots past EOF (zeros).
        slots = (list(range(0, 150)) + [3, 3, 170, 171, 5, 199, 198, n, n + 1] + list(range(100, 180)))
        buf = np.zeros((len(slots), P), np.uint8)
        buf_idx = rng.permutation(len(slots))
        for i, (b, s) in enumerate(zip(buf_idx, slots)):
            if s < n and i % 3:
                buf[b] = content[s * P:(s + 1) * P]   # two in three equal
            if i % 7 == 0:
                buf[b, rng.integers(P)] ^= 1 + int(rng.integers(255))   # a one-byte difference
        got = _native.compare_slots(buf, np.asarray(buf_idx, np.int64), fd, np.asarray(slots, np.int64))
        want = compare_oracle(fd, buf.tobytes(), buf_idx.tolist(), slots)
        assert list(got) == want
        assert 0 < sum(want) < len(want)
        assert allocated_bytes(fd) == (n - 1) * P    # the hole stays a hole (never mapped)
    finally:
        os.close(fd)


def test_compare_slots_empty_and_bad_arguments(shm: int) -> None:
    buf = bytes(2 * P)
    assert _native.compare_slots(buf, idx(), shm, idx()) == b""
    with pytest.raises(ValueError, match="same length"):
        _native.compare_slots(buf, idx(0, 1), shm, idx(0))
    with pytest.raises(ValueError, match="out of range"):
        _native.compare_slots(buf, idx(2), shm, idx(0))       # past the buffer
    with pytest.raises(ValueError, match="out of range"):
        _native.compare_slots(buf, idx(0), shm, idx(-1))
    with pytest.raises(ValueError, match="out of range"):
        _native.compare_slots(buf, idx(0), shm, idx(2**62))   # offset would wrap
    with pytest.raises(ValueError, match="multiple of the page size"):
        _native.compare_slots(bytes(P + 1), idx(0), shm, idx(0))
    with pytest.raises(OSError) as e:
        _native.compare_slots(buf, idx(0), 9999, idx(0))
    assert e.value.errno == errno.EBADF and "pread" in str(e.value)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_compare_slots_one_pread_per_run_of_at_most_64() -> None:
    code = """
        import os, numpy as np
        from shmdedup import _native, _shm
        P = _native.PAGE_SIZE
        fd = _shm.create(256 * P, "strace")
        slots = list(range(0, 100)) + [150, 151, 7, 200]   # runs: 64 + 36, 2, 1, 1
        buf = bytes(len(slots) * P)
        os.write(2, b"BEGIN\\n")
        _native.compare_slots(buf, np.arange(len(slots), dtype=np.int64), fd,
                              np.array(slots, dtype=np.int64))
        os.write(2, b"END\\n")
    """
    preads, sizes = pread_pages_between_markers(code)
    assert sizes == [1, 1, 2, 36, 64], preads


# ---- pages_equal, is_zero ----------------------------------------------------

def test_pages_equal() -> None:
    a = page(1) + page(2)
    assert _native.pages_equal(a, bytearray(a))
    b = bytearray(a)
    b[-1] ^= 1
    assert not _native.pages_equal(a, b)
    assert not _native.pages_equal(a, a[:-1])  # lengths differ
    assert _native.pages_equal(b"", b"")


def test_is_zero() -> None:
    assert _native.is_zero(bytes(3 * P))
    assert _native.is_zero(b"")
    for pos in (0, P - 1, 2 * P + 17):
        buf = bytearray(3 * P)
        buf[pos] = 1
        assert not _native.is_zero(buf), pos
    with pytest.raises(ValueError):
        _native.is_zero(bytes(P + 8))


# ---- punch_hole ----------------------------------------------------------------

def test_punch_hole_frees_blocks(shm: int) -> None:
    os.pwrite(shm, b"\x77" * 8 * P, 0)
    assert allocated_bytes(shm) == 8 * P
    _native.punch_hole(shm, 2 * P, 3 * P)
    assert allocated_bytes(shm) == 5 * P
    assert os.fstat(shm).st_size == 8 * P  # KEEP_SIZE
    assert os.pread(shm, 8 * P, 0) == b"\x77" * 2 * P + bytes(3 * P) + b"\x77" * 3 * P
    _native.punch_hole(shm, 6 * P, 100 * P)  # past EOF: fine, size unchanged
    assert allocated_bytes(shm) == 3 * P
    assert os.fstat(shm).st_size == 8 * P


def test_punch_hole_errors(shm: int) -> None:
    with pytest.raises(ValueError):
        _native.punch_hole(shm, -P, P)
    with pytest.raises(ValueError):
        _native.punch_hole(shm, 0, -1)
    with pytest.raises(OSError) as e:
        _native.punch_hole(9999, 0, P)
    assert e.value.errno == errno.EBADF
    assert "fallocate" in str(e.value)
    ro = _shm.reopen_readonly(shm)
    try:
        with pytest.raises(OSError) as e:
            _native.punch_hole(ro, 0, P)
        assert e.value.errno == errno.EBADF  # fallocate needs a writable fd
    finally:
        os.close(ro)


def test_resident_pages_counts_written_pages_only(shm) -> None:
    assert _native.resident_pages(shm, 0, 8 * P) == 0
    os.pwrite(shm, b"x" * (3 * P), 2 * P)
    assert _native.resident_pages(shm, 0, 8 * P) == 3
    assert _native.resident_pages(shm, 3 * P, P) == 1
    _native.punch_hole(shm, 2 * P, P)
    assert _native.resident_pages(shm, 0, 8 * P) == 2
    with pytest.raises(ValueError):
        _native.resident_pages(shm, -1, P)


def test_data_mask_and_first_data(shm) -> None:
    """Pages with data by bisection over cachestat: the mask, the first page
    of a range, an empty range, a range past the end (holes), and bad
    arguments (a range whose byte offsets would not fit, a closed fd)."""
    for page in (1, 2, 5, 7):
        os.pwrite(shm, b"x", page * P + 9)
    assert _native.data_pages(shm, 0, 8 * P) == 4
    assert _native.data_pages(shm, 0, 0) == 0          # not cachestat's "to the end"
    assert list(_native.data_mask(shm, 0, 8)) == [0, 1, 1, 0, 0, 1, 0, 1]
    assert list(_native.data_mask(shm, 6, 5)) == [0, 1, 0, 0, 0]
    assert _native.data_mask(shm, 3, 0) == b""
    assert [_native.first_data(shm, a, 8 - a) for a in range(8)] == [1, 1, 2, 5, 5, 5, 7, 7]
    assert _native.first_data(shm, 3, 2) is None
    assert _native.first_data(shm, 8, 100) is None
    assert _native.first_data(shm, 0, 0) is None
    for bad in [(-1, 4), (0, -1), (2**62, 2**62), (0, 2**63 - 1)]:
        with pytest.raises(ValueError):
            _native.data_mask(shm, *bad)
        with pytest.raises(ValueError):
            _native.first_data(shm, *bad)
    with pytest.raises(OSError) as e:
        _native.data_mask(2**31 - 1, 0, 4)
    assert e.value.errno == errno.EBADF
