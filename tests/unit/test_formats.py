"""shmdedup.load_npy and shmdedup.load_safetensors without a coordinator: numpy's
(and safetensors') answers byte for byte, tensors at page-aligned offsets of one
region, and every malformed header refused with FormatError (truncated data
with ShortFileError), nothing leaked."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmdedup
from shmdedup.errors import FormatError, ShortFileError
from shmdedup.worker.region import PAGE_SIZE
from tests.helpers import no_shm_leftovers, reaper  # noqa: F401

P = PAGE_SIZE

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


# ---- .npy -------------------------------------------------------------------------

def npy(path: Path, arr: np.ndarray, version: tuple[int, int] | None = None) -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, version=version)
    return path


NPY_ARRAYS = {
    "c": np.arange(100000, dtype=np.float64).reshape(250, 400),
    "f": np.asfortranarray(np.arange(60000, dtype=">i4").reshape(200, 300)),
    "zero_d": np.array(3.5),
    "empty": np.zeros((0, 7), np.int16),
    "bool_3d": np.random.default_rng(1).integers(0, 2, (20, 30, 40)).astype(bool),
    "structured": np.zeros(5000, dtype=[("a", "<i2"), ("b", "<f8", (2,))]),
    "strings": np.array(["ab", "cde"] * 3000),
}


@pytest.mark.parametrize("name", list(NPY_ARRAYS))
@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
def test_load_npy_equals_numpy(tmp_path: Path, name: str, version: tuple[int, int] | None) -> None:
    f = npy(tmp_path / "a.npy", NPY_ARRAYS[name], version)
    want = np.load(f)
    for chunk in (P, None):
        got = shmdedup.load_npy(f, chunk_bytes=chunk)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.tobytes(order="A") == want.tobytes(order="A")
        assert got.flags.f_contiguous == want.flags.f_contiguous
        assert got.flags.c_contiguous == want.flags.c_contiguous
        assert got.flags.writeable and shmdedup.region_of(got) is not None


def test_load_npy_from_a_file_object_at_its_position(tmp_path: Path) -> None:
    buf = io.BytesIO()
    buf.write(b"junk")
    a = np.arange(3000, dtype=np.int32)
    np.lib.format.write_array(buf, a)
    buf.write(b"more")
    buf.seek(4)
    assert np.array_equal(shmdedup.load_npy(buf), a) and buf.read() == b"more"


def npy_bytes(header: bytes, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    size = struct.pack("<H", len(header)) if version == (1, 0) else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes(version) + size + header + data


GOOD = b"{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }"


@pytest.mark.parametrize("content, match", [
    (b"", "ends inside"),
    (b"\x93NUM", "ends inside"),
    (b"PK\x03\x04" + bytes(100), "not a .npy"),
    (npy_bytes(GOOD, version=(9, 0)), "version 9.0"),
    (npy_bytes(GOOD)[:20], "ends inside"),
    (npy_bytes(b"{'descr': '<i4', 'shape': (4,)}"), "exactly"),
    (npy_bytes(b"[1, 2]"), "exactly"),
    (npy_bytes(b"{'descr': '<i4', 'fortran_order': 0, 'shape': (4,)}"), "fortran_order"),
    (npy_bytes(b"{'descr': '<i4', 'fortran_order': False, 'shape': (-4,)}"), "shape"),
    (npy_bytes(b"{'descr': '<i4', 'fortran_order': False, 'shape': [4]}"), "shape"),
    (npy_bytes(b"{'descr': 'zz', 'fortran_order': False, 'shape': (4,)}"), "descr"),
    (npy_bytes(b"{'descr': '|O', 'fortran_order': False, 'shape': (4,)}"), "Python objects"),
    (npy_bytes(b"__import__('os').system('true')"), "unreadable"),
    (npy_bytes(b"{" * 200 + b"}" * 200), "unreadable|exactly"),
    (npy_bytes(b" " * 20000, version=(2, 0)), "more than"),
    (npy_bytes(GOOD, bytes(15)), "holds 15 bytes"),
])
def test_load_npy_refuses_bad_files(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "bad.npy"
    f.write_bytes(content)
    with pytest.raises((FormatError, ShortFileError), match=match) as e:
        shmdedup.load_npy(f)
    assert isinstance(e.value, (ValueError, EOFError))


def test_load_npy_exact_header_is_read(tmp_path: Path) -> None:
    f = tmp_path / "ok.npy"
    f.write_bytes(npy_bytes(GOOD, struct.pack("<4i", 1, 2, 3, 4)))
    assert shmdedup.load_npy(f).tolist() == [1, 2, 3, 4]


# ---- safetensors ----------------------------------------------------------------------

NAMES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("u1"): "U8",
         np.dtype("<f2"): "F16", np.dtype("bool"): "BOOL", np.dtype("<i4"): "I32", np.dtype("<u2"): "U16"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The format, written here: 8-byte header size, JSON header, then the data."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    data, off = b"", 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"embed": rng.standard_normal((300, 77)).astype(np.float32), "bias": np.arange(5, dtype=np.int64),
            "empty": np.zeros((0, 3), np.float16), "mask": rng.integers(0, 2, 9000).astype(bool),
            "scalar": np.array(1.25), "big": rng.integers(0, 255, 3 * P + 1).astype(np.uint8)}


def test_load_safetensors_tensors_at_page_aligned_offsets(tmp_path: Path) -> None:
    want = tensors()
    f = tmp_path / "m.safetensors"
    f.write_bytes(safetensors_bytes(want, {"format": "np"}))
    for chunk in (P, None):
        got = shmdedup.load_safetensors(f, chunk_bytes=chunk)
        assert list(got) == list(want)
        regions = {id(shmdedup.region_of(a)) for a in got.values()}
        assert len(regions) == 1  # one region
        for name, arr in got.items():
            assert arr.dtype == want[name].dtype and arr.shape == want[name].shape
            assert np.array_equal(arr, want[name]) and arr.flags.writeable
        starts = sorted(a.__array_interface__["data"][0] for a in got.values() if a.size)
        assert all((s - starts[0]) % P == 0 for s in starts)


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors not installed")
def test_load_safetensors_equals_the_safetensors_package(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file
    f = str(tmp_path / "m.safetensors")
    save_file(tensors(), f, metadata={"a": "b"})
    want, got = load_file(f), shmdedup.load_safetensors(f, chunk_bytes=P)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])


def header_file(tmp_path: Path, header: Any, data: bytes = b"", raw: bytes | None = None) -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return f


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, match", [
    ({"t": dict(T, dtype="BF16")}, bytes(8), "numpy has no equivalent"),
    ({"t": dict(T, shape=[3])}, bytes(12), "needs 12"),
    ({"t": dict(T, shape=[-2])}, bytes(8), "bad shape"),
    ({"t": dict(T, shape=[2.0])}, bytes(8), "bad shape"),
    ({"t": dict(T, data_offsets=[8, 0])}, bytes(8), "bad data_offsets"),
    ({"t": dict(T, data_offsets=[0])}, bytes(8), "bad data_offsets"),
    ({"t": {"dtype": "F32"}}, bytes(8), "needs dtype, shape and data_offsets"),
    ({"t": T, "u": dict(T, data_offsets=[4, 12])}, bytes(12), "without gaps or overlaps"),
    ({"t": dict(T, data_offsets=[8, 16])}, bytes(16), "without gaps or overlaps"),
    ({"t": T, "__metadata__": {"a": 1}}, bytes(8), "__metadata__"),
    ([1, 2], b"", "not a JSON object"),
    ({"t": T}, bytes(7), "holds 7 bytes"),
])
def test_load_safetensors_refuses_bad_headers(tmp_path: Path, header: Any, data: bytes, match: str) -> None:
    with pytest.raises((FormatError, ShortFileError), match=match):
        shmdedup.load_safetensors(header_file(tmp_path, header, data))


@pytest.mark.parametrize("content, match", [
    (b"", "ends inside"),
    (struct.pack("<Q", 10**9) + b"{}", "more than"),
    (struct.pack("<Q", 100) + b"{}", "ends inside"),
    (struct.pack("<Q", 4) + b"{\xff}}", "unreadable"),
    (struct.pack("<Q", 5) + b"{'a'}", "unreadable"),
])
def test_load_safetensors_refuses_bad_framing(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "bad.safetensors"
    f.write_bytes(content)
    with pytest.raises((FormatError, ShortFileError), match=match):
        shmdedup.load_safetensors(f)
