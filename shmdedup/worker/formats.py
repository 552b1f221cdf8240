"""Loading ``.npy`` and safetensors files into regions, merged at write time.

Both parse their small header here (no pickle, no third-party package), then
read the data with the chunked reader of ``loading`` (each chunk merged before
the next is read; the I/O caveat kept; a file that changes while it is read
raises FileChangedError).  Headers are untrusted input: every field is checked
and a bad one raises FormatError; a file shorter than its header says raises
ShortFileError.

- ``.npy`` (versions 1.0, 2.0, 3.0): dtype, shape and Fortran order from the
  header, as ``numpy.load`` reads them; object arrays (pickles) are refused.
- safetensors: the 8-byte little-endian header size, the JSON header, then the
  tensors' bytes, which must cover the data section contiguously, as the
  format requires.  All tensors go into one region, each at a page-aligned
  offset, in file order: a tensor's pages depend only on its own bytes, so the
  same tensor merges across processes even when two files lay it out
  differently.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

import numpy as np

from shmdedup.errors import FormatError, ShortFileError
from shmdedup.worker.loading import _chunk, _discard, _new_region, read_pieces
from shmdedup.worker.reading import Source
from shmdedup.pages import PAGE_SIZE, pages_for

NPY_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER = 10000  # numpy.load's default max_header_size: literal_eval of more is a DoS risk
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit

# safetensors dtype names with a numpy equivalent (the data is little-endian).
SAFETENSORS_DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2",
    "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8",
    "C64": "<c8",
}


def _exact(src: Source, nbytes: int, what: str) -> bytes:
    data = src.read_bytes(nbytes)
    if len(data) < nbytes:
        raise ShortFileError(f"{src.name} ends inside its {what} ({len(data)} of {nbytes} bytes)")
    return data


# ---- .npy --------------------------------------------------------------------

def _npy_header(src: Source) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    magic = _exact(src, 8, ".npy header")
    if magic[:6] != NPY_MAGIC:
        raise FormatError(f"{src.name} is not a .npy file (no \\x93NUMPY magic)")
    version = (magic[6], magic[7])
    if version == (1, 0):
        size_bytes, encoding = 2, "latin1"
    elif version in ((2, 0), (3, 0)):
        size_bytes, encoding = 4, "latin1" if version == (2, 0) else "utf8"
    else:
        raise FormatError(f"{src.name}: .npy version {version[0]}.{version[1]} is not supported")
    hlen = int.from_bytes(_exact(src, size_bytes, ".npy header"), "little")
    if hlen > NPY_MAX_HEADER:
        raise FormatError(f"{src.name}: .npy header of {hlen} bytes (more than {NPY_MAX_HEADER})")
    raw = _exact(src, hlen, ".npy header")
    try:
        d = ast.literal_eval(raw.decode(encoding))
    except (UnicodeDecodeError, SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
        raise FormatError(f"{src.name}: unreadable .npy header: {e}") from None
    if not isinstance(d, dict) or set(d) != {"descr", "shape", "fortran_order"}:
        raise FormatError(f"{src.name}: a .npy header needs exactly descr, shape and fortran_order, got {d!r:.200}")
    shape, fortran = d["shape"], d["fortran_order"]
    if (not isinstance(shape, tuple)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise FormatError(f"{src.name}: bad .npy shape {shape!r:.200}")
    if not isinstance(fortran, bool):
        raise FormatError(f"{src.name}: bad .npy fortran_order {fortran!r:.200}")
    try:
        dt = np.lib.format.descr_to_dtype(d["descr"])
    except (TypeError, ValueError) as e:
        raise FormatError(f"{src.name}: bad .npy descr {d['descr']!r:.200}: {e}") from None
    if dt.hasobject:
        raise FormatError(f"{src.name} holds Python objects (a pickle), which cannot live in shared memory")
    if dt.itemsize == 0 and math.prod(shape):
        raise FormatError(f"{src.name}: dtype {dt} has no size")
    return dt, shape, fortran


def load_npy(file: Any, *, chunk_bytes: int | None = None) -> np.ndarray[Any, Any]:
    """A ``.npy`` file (path, or binary file object from its current position)
    as an array in a region, merged chunk by chunk as it is read: the dtype,
    shape and memory order (C or Fortran) of ``numpy.load``.  A writable array,
    like numpy's (writes are copy-on-write)."""
    chunk = _chunk(chunk_bytes)
    with Source(file) as src:
        dt, shape, fortran = _npy_header(src)
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        left = src.bytes_left()
        if left is not None and left < nbytes:
            raise ShortFileError(f"{src.name} holds {left} bytes of data; its header ({dt}, shape {shape}) "
                                 f"says {nbytes}")
        region = _new_region(nbytes)
        try:
            read_pieces(src, region, [(0, nbytes)], chunk)
        except BaseException:
            _discard(region)
            raise
    flat = region.ndarray(dt, (count,))
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


# ---- safetensors ----------------------------------------------------------------

def _tensor_entry(src: Source, name: str, info: Any) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise FormatError(f"{src.name}: tensor {name!r} needs dtype, shape and data_offsets")
    kind, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if kind not in SAFETENSORS_DTYPES:
        raise FormatError(f"{src.name}: tensor {name!r} has dtype {kind!r:.40}, which numpy has no equivalent for")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise FormatError(f"{src.name}: tensor {name!r} has a bad shape {shape!r:.200}")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(type(n) is int for n in offs)
            or not 0 <= offs[0] <= offs[1]):
        raise FormatError(f"{src.name}: tensor {name!r} has bad data_offsets {offs!r:.200}")
    dt = np.dtype(SAFETENSORS_DTYPES[kind])
    if offs[1] - offs[0] != math.prod(shape) * dt.itemsize:
        raise FormatError(f"{src.name}: tensor {name!r}: data_offsets {offs} hold {offs[1] - offs[0]} bytes; "
                          f"{kind} of shape {shape} needs {math.prod(shape) * dt.itemsize}")
    return dt, tuple(shape), offs[0], offs[1]


def load_safetensors(file: Any, *, chunk_bytes: int | None = None) -> dict[str, np.ndarray[Any, Any]]:
    """A safetensors file as ``{name: array}`` (like ``safetensors.numpy.load_file``),
    every tensor in one region at a page-aligned offset, merged chunk by chunk
    as it is read.  ``__metadata__`` is checked and dropped."""
    chunk = _chunk(chunk_bytes)
    with Source(file) as src:
        hlen = int.from_bytes(_exact(src, 8, "safetensors header size"), "little")
        if hlen > SAFETENSORS_MAX_HEADER:
            raise FormatError(f"{src.name}: safetensors header of {hlen} bytes (more than {SAFETENSORS_MAX_HEADER})")
        try:
            header = json.loads(_exact(src, hlen, "safetensors header").decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FormatError(f"{src.name}: unreadable safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise FormatError(f"{src.name}: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{src.name}: __metadata__ must map names to strings")
        entries = {name: _tensor_entry(src, name, info) for name, info in header.items()}
        in_file = sorted(entries, key=lambda n: (entries[n][2], entries[n][3]))
        end = 0
        for name in in_file:
            if entries[name][2] != end:
                raise FormatError(f"{src.name}: tensor {name!r} starts at {entries[name][2]}, not at {end}: "
                                  f"the tensors must cover the data section without gaps or overlaps")
            end = entries[name][3]
        left = src.bytes_left()
        if left is not None and left < end:
            raise ShortFileError(f"{src.name} holds {left} bytes of tensor data; its header says {end}")
        offsets, size = {}, 0
        for name in in_file:
            offsets[name] = size
            size += pages_for(entries[name][3] - entries[name][2]) * PAGE_SIZE
        region = _new_region(size)
        try:
            read_pieces(src, region, [(offsets[n], entries[n][3] - entries[n][2]) for n in in_file], chunk)
        except BaseException:
            _discard(region)
            raise
    return {name: region.ndarray(entries[name][0], entries[name][1], offsets[name]) for name in entries}


__all__ = ["load_npy", "load_safetensors"]
