"""Merging at write time: load, copy or compute data into a region chunk by chunk.

Scanning merges what already exists, so N processes that load the same data
first hold N copies.  The helpers here write a region in bounded chunks
(:data:`chunk_bytes`, 8 MiB by default) and declare each chunk final with
``Region.merge_now`` before they write the next: a page equal to a stable page
is mapped onto it at once, any other becomes a stable page the next process
finds.  At the peak a process holds one chunk of private pages, not a copy.

- :func:`fromfile`: ``numpy.fromfile`` (binary files) into a region;
- :func:`share`: a copy of an array (or bytes) in a region, same type, dtype,
  shape, memory order and read-only flag;
- :func:`fill`: an array computed in place, one block of rows at a time;
- ``load_npy`` and ``load_safetensors`` (in ``formats``) build on the same
  reader.

Reading keeps the I/O caveat (DESIGN, failure semantics): the kernel never
writes into a merged page, because every read goes into a range pinned private
(``Region.pinned``) for the duration of the system call.  A file that changes
while it is read is detected (size, mtime and ctime before, after every chunk,
and at the end) and raises :class:`~shmdedup.errors.FileChangedError`; the
region is dropped, nothing half-read is returned.

Without a coordinator (or with ``run`` other than 1) ``merge_now`` returns 0
at once and the data is intact: the helpers then only save the temporary copy
a caller would otherwise make, and the pages merge by scanning when a
coordinator appears (merge_now advises them mergeable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

import numpy as np

from shmdedup.errors import ArgumentError, ShortFileError
from shmdedup.worker.reading import Source
from shmdedup.pages import PAGE_SIZE, check_int, pages_for
from shmdedup.worker.region import Region

# Bytes written between two merge_now calls (rounded down to whole pages).
# Settable per process; every helper also takes chunk_bytes=.  Each call
# costs the coordinator 0.3 to 0.5 ms (its messages, the request's
# bookkeeping) besides its work per page: 0.15 to 0.25 us a page at 8 MiB,
# twice that at 4 MiB, for 4 MiB more private memory per process at the peak
# (benchmarks/write_time.py --chunk-mib).
chunk_bytes: int = 8 * 2**20

_ArrayT = TypeVar("_ArrayT", bound="np.ndarray[Any, Any]")
_ScalarT = TypeVar("_ScalarT", bound=np.generic)

# What this process declared final and what merge_now merged (the pytest
# plugin's summary reports them): pages, cumulative.
_counts_lock = threading.Lock()
_counts = {"pages_loaded": 0, "pages_merged_at_write": 0}


def write_time_stats() -> dict[str, int]:
    """Pages this process wrote through these helpers (``pages_loaded``) and
    how many of them ``merge_now`` merged or made stable at once
    (``pages_merged_at_write``); the rest are left to the scan."""
    with _counts_lock:
        return dict(_counts)


def _chunk(value: int | None) -> int:
    """The chunk in bytes: whole pages, at least one."""
    if value is None:
        value = chunk_bytes
    value = check_int("chunk_bytes", value, PAGE_SIZE)
    return value - value % PAGE_SIZE


class _Merger:
    """Declares a region's bytes final, front to back, in page-aligned chunks.

    ``final(upto)``: bytes [0, upto) will not be written again; once a chunk's
    worth of whole pages has accumulated they are merged now.  ``finish(end)``
    merges the rest (a last partial page included: its tail is never written).
    """

    def __init__(self, region: Region, chunk: int) -> None:
        self.region = region
        self.chunk = chunk
        self.done = 0  # bytes [0, done) declared; always page-aligned

    def final(self, upto: int) -> None:
        if upto - self.done >= self.chunk:
            self._declare(upto - upto % PAGE_SIZE)

    def finish(self, end: int) -> None:
        if end > self.done:
            self._declare(end)

    def _declare(self, end: int) -> None:
        length = end - self.done
        merged = self.region.merge_now(self.done, length)
        with _counts_lock:
            _counts["pages_loaded"] += pages_for(length)
            _counts["pages_merged_at_write"] += merged
        self.done = pages_for(end) * PAGE_SIZE


def _new_region(nbytes: int) -> Region:
    # Not advised at creation (even with process-wide merging on): a chunk is
    # advised by merge_now once written, so no scan reads half-written pages.
    return Region(max(nbytes, 1), mergeable=False)


def _discard(region: Region) -> None:
    """Close a region a helper failed to fill.  While a view of it is still
    alive (in the traceback of a fill function) it goes with its last view."""
    try:
        region.close()
    except BufferError:
        pass


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ArgumentError(f"dtype: {e}") from e
    if dt.hasobject:
        raise ArgumentError(f"dtype {dt} holds Python objects, which cannot live in shared memory")
    if dt.itemsize == 0:
        raise ArgumentError(f"dtype {dt} has no size")
    return cast("np.dtype[Any]", dt)


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (tuple, list)):
        return tuple(check_int("shape", d) for d in shape)
    return (check_int("shape", shape),)


def _end_of(view: np.ndarray, base: int) -> int:
    """Offset in the region just past a C-contiguous view whose region starts at address base."""
    return int(view.__array_interface__["data"][0]) - base + view.nbytes


# ---- reading files ------------------------------------------------------------

def read_pieces(src: Source, region: Region, pieces: list[tuple[int, int]], chunk: int) -> None:
    """Read consecutive stretches of the file into region ranges (offset,
    nbytes), in increasing region order, each starting on a page boundary;
    merge every chunk once it is read, and the rest at the end."""
    merger = _Merger(region, chunk)
    for offset, nbytes in pieces:
        done = 0
        while done < nbytes:
            n = min(chunk - (offset + done) % chunk, nbytes - done)
            got = src.readinto(region, offset + done, n)
            src.check_unchanged()
            done += got
            if got < n:
                raise ShortFileError(f"{src.name} ended early: {done} of the {nbytes} bytes asked for")
            merger.final(offset + done)
        merger.final(pages_for(offset + nbytes) * PAGE_SIZE)  # its last page's tail stays zero
    src.check_unchanged()
    merger.finish(pieces[-1][0] + pieces[-1][1] if pieces else 0)


def fromfile(file: Any, dtype: Any = float, count: int = -1, sep: str = "", offset: int = 0, *,
             chunk_bytes: int | None = None) -> np.ndarray[Any, Any]:
    """``numpy.fromfile`` for binary files, into a region merged chunk by chunk.

    file is a path or a binary file object (read from its current position,
    which ends just after the data, as numpy leaves it); count -1 reads every
    whole item to the end of the file; offset is in bytes (from the file
    object's current position).  Unlike numpy, a file shorter than asked
    raises ShortFileError instead of returning fewer items, and a file that
    changes while it is read raises FileChangedError.  Text files (sep) are
    not supported.  Bad arguments raise ArgumentError.
    """
    dt = _check_dtype(dtype)
    count = check_int("count", count, -1)
    offset = check_int("offset", offset)
    if sep != "":
        raise ArgumentError("text files (sep=...) are not supported: read them with numpy.fromfile, then share()")
    chunk = _chunk(chunk_bytes)
    with Source(file) as src:
        src.skip(offset)
        left = src.bytes_left()
        if left is not None and left < 0:
            raise ShortFileError(f"offset {offset} is past the end of {src.name} ({left + offset} bytes left)")
        if count == -1:
            if left is None:
                raise ArgumentError(f"count=-1 needs a file whose size is known; {src.name} is not "
                                    f"seekable: give count")
            count = left // dt.itemsize
        nbytes = count * dt.itemsize
        if left is not None and nbytes > left:
            raise ShortFileError(f"{src.name} holds {left} bytes after offset {offset}; count={count} of "
                                 f"{dt} needs {nbytes}")
        region = _new_region(nbytes)
        try:
            read_pieces(src, region, [(0, nbytes)], chunk)
        except BaseException:
            _discard(region)
            raise
    return region.ndarray(dt, (count,))


# ---- copying -------------------------------------------------------------------

@overload
def share(obj: _ArrayT, *, chunk_bytes: int | None = None) -> _ArrayT: ...
@overload
def share(obj: _ScalarT, *, chunk_bytes: int | None = None) -> _ScalarT: ...
@overload
def share(obj: bytes | bytearray | memoryview, *, chunk_bytes: int | None = None) -> memoryview: ...


def share(obj: Any, *, chunk_bytes: int | None = None) -> Any:
    """A copy of obj in a region, merged chunk by chunk as it is copied.

    - a numpy array: an array of the same dtype, shape, memory order (C, F or
      any other axis order; a strided view becomes contiguous in that order,
      as ``np.copy(order="K")`` does) and read-only flag;
    - bytes, bytearray, memoryview: a memoryview of the same format, shape and
      read-only flag (bytes: read-only).  It compares equal (``==``) and works
      wherever a buffer does, but has no str-like methods: ``bytes(view)``
      makes a private copy;
    - a numpy scalar, or anything empty: returned unchanged (nothing to save).

    Anything else (a subclass of ndarray, object arrays, a list...) raises
    ArgumentError: what share() cannot keep, it refuses.
    """
    kind = check_shareable(obj)
    if kind == "unchanged":
        return obj
    chunk = _chunk(chunk_bytes)
    if kind == "array":
        return _copy(obj, chunk)
    view = memoryview(obj)
    out = _copy(np.asarray(view), chunk, keep_order=False)
    region = region_of(out)
    assert region is not None
    del out
    # A memoryview of the region itself, not of a numpy array: a read-only
    # one of bytes is then hashable like bytes (memoryview hashes its exporter).
    result = memoryview(region)[:view.nbytes]
    if view.readonly:
        result = result.toreadonly()
    if view.format != "B" or view.ndim != 1:
        fmt: Any = view.format  # any struct format: cast() says which it takes
        try:
            result = result.cast(fmt, tuple(view.shape or ()))
        except (TypeError, ValueError):  # a format cast() does not take: numpy's equivalent one
            arr = region.ndarray(np.asarray(view).dtype, view.shape)
            arr.flags.writeable = not view.readonly
            result = arr.data
    return result


def check_shareable(obj: Any) -> str:
    """"array", "buffer" or "unchanged" for what share() takes, else ArgumentError."""
    if isinstance(obj, np.generic):
        return "unchanged"
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            raise ArgumentError(f"share() cannot keep the type {type(obj).__name__} (a subclass of "
                                f"numpy.ndarray); pass np.asarray(x) to share its data as a plain array")
        if obj.dtype.hasobject:
            raise ArgumentError(f"share() cannot put an array of dtype {obj.dtype} (Python objects) in "
                                f"shared memory")
        return "array" if obj.nbytes else "unchanged"
    if isinstance(obj, (bytes, bytearray, memoryview)):
        view = memoryview(obj)
        if view.nbytes == 0:
            return "unchanged"
        try:
            arr = np.asarray(view)
        except (TypeError, ValueError, NotImplementedError) as e:
            raise ArgumentError(f"share() cannot copy a buffer of format {view.format!r}: {e}") from e
        if arr.dtype.hasobject:
            raise ArgumentError(f"share() cannot copy a buffer of format {view.format!r} (Python objects)")
        return "buffer"
    raise ArgumentError(f"share() takes a numpy array, a numpy scalar, bytes, bytearray or a memoryview, "
                        f"got {type(obj).__name__}")


def _copy(src: np.ndarray[Any, Any], chunk: int, keep_order: bool = True) -> np.ndarray[Any, Any]:
    """src copied into a new region in src's axis order (C order unless
    keep_order), merged chunk by chunk."""
    if src.flags.c_contiguous or not keep_order:
        perm = list(range(src.ndim))
    elif src.flags.f_contiguous:
        perm = list(range(src.ndim))[::-1]
    else:  # outermost axis first, as np.copy(order="K")
        perm = sorted(range(src.ndim), key=lambda i: -abs(src.strides[i]))
    region = _new_region(src.nbytes)
    dst = region.ndarray(src.dtype, tuple(src.shape[i] for i in perm))
    try:
        base = int(dst.__array_interface__["data"][0])
        merger = _Merger(region, chunk)
        _copy_blocks(dst, src.transpose(perm), chunk, lambda view: merger.final(_end_of(view, base)))
        merger.finish(src.nbytes)
    except BaseException:
        del dst
        _discard(region)
        raise
    out: np.ndarray[Any, Any] = dst.transpose(np.argsort(perm))
    if not src.flags.writeable:
        out.flags.writeable = False
    return out


def _copy_blocks(dst: np.ndarray[Any, Any], src: np.ndarray[Any, Any], chunk: int,
                 done: Callable[[np.ndarray[Any, Any]], None]) -> None:
    """dst[...] = src (dst C-contiguous) in blocks of about chunk bytes along the
    leading axes, calling done(block) after each."""
    if dst.ndim == 0 or dst.nbytes <= chunk:
        dst[...] = src
        done(dst)
        return
    row = dst.nbytes // dst.shape[0]
    if row > chunk and dst.ndim > 1:
        for i in range(dst.shape[0]):
            _copy_blocks(dst[i], src[i], chunk, done)
        return
    step = max(1, chunk // row)
    for i in range(0, dst.shape[0], step):
        dst[i:i + step] = src[i:i + step]
        done(dst[i:i + step])


# ---- computing in place ------------------------------------------------------------

def fill(shape: int | tuple[int, ...], dtype: Any, fill_fn: Callable[[np.ndarray[Any, Any], int], Any], *,
         rows: int | None = None, chunk_bytes: int | None = None) -> np.ndarray[Any, Any]:
    """An array in a region, computed in place one block of rows at a time.

    ``fill_fn(block, start)`` is called for consecutive blocks along the first
    axis, ``block`` being the (zeroed, writable) rows ``[start, start +
    len(block))`` of the result; once it returns, the block is final: whole
    pages are merged as soon as a chunk (chunk_bytes) of them is final, so
    with blocks of about a chunk (the default ``rows``) every block is merged
    as soon as it returns.  A process never holds more than a chunk and a
    block of private pages::

        def features(block, start):
            block[...] = compute_rows(start, len(block))

        table = shmdedup.fill((1 << 20, 256), np.float32, features, rows=4096)
    """
    dims = _check_shape(shape)
    if not dims:
        raise ArgumentError("fill() needs at least one dimension (blocks are runs of rows)")
    dt = _check_dtype(dtype)
    chunk = _chunk(chunk_bytes)
    if not callable(fill_fn):
        raise ArgumentError(f"fill_fn must be callable, got {type(fill_fn).__name__}")
    nrows = dims[0]
    row_bytes = int(np.prod(dims[1:], dtype=np.int64)) * dt.itemsize
    if rows is None:
        rows = max(1, chunk // max(row_bytes, 1))
    rows = check_int("rows", rows, 1)
    region = _new_region(nrows * row_bytes)
    arr = region.ndarray(dt, dims)
    try:
        merger = _Merger(region, chunk)
        for start in range(0, nrows, rows):
            fill_fn(arr[start:start + rows], start)
            merger.final(min(start + rows, nrows) * row_bytes)
        merger.finish(nrows * row_bytes)
    except BaseException:
        del arr
        _discard(region)
        raise
    return arr


def region_of(obj: Any) -> Region | None:
    """The Region behind an array or memoryview made by these helpers (or by
    ``Region.ndarray``), or None."""
    base = obj
    while base is not None:
        if isinstance(base, Region):
            return base
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None


# The helpers are re-exported by shmdedup; chunk_bytes is their default chunk.
__all__ = ["chunk_bytes", "fill", "fromfile", "region_of", "share"]
