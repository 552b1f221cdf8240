"""Regions: pages of POSIX shared memory that a worker can advise mergeable.

A :class:`Region` is N pages backed by one anonymous shm object (the *backing*,
mapped MAP_SHARED read-write) plus a small metadata object holding one state
byte per page (shared with the coordinator, which reads it to see
copy-on-write breaks without a message).  Both objects are unlinked the moment
they are created (see ``_shm``): nothing is ever left in /dev/shm.

The memory itself is the C core's ``Mapping``: it exports the buffer
(``memoryview(region)``, ``region.ndarray(...)``), is registered with the
SIGSEGV copy-on-write trap, and does the merge and break primitives.

``advise()`` follows madvise(2)'s argument rules: a page-aligned offset, a
length rounded up to whole pages, the range inside the region.  Advice is
recorded here and registered with the domain's coordinator by the agent (now
if one runs, or whenever one appears).

I/O caveat: a system call that writes into a merged page (``read``,
``recv_into``, ``readinto``) fails with EFAULT instead of faulting (the kernel
does not raise SIGSEGV for it).  Call :meth:`Region.prepare_write` on the range
first, or use the helpers :meth:`readinto` / :meth:`recv_into` that do it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, overload

import numpy as np
import numpy.typing as npt

from shmdedup import _native, _shm
from shmdedup.errors import ArgumentError, RegionClosedError, ShmError
from shmdedup.pages import PAGE_SIZE, check_int, mask_runs, pages_for

MERGEABLE = 12  # the values of MADV_MERGEABLE / MADV_UNMERGEABLE
UNMERGEABLE = 13

_ids = itertools.count(1)
# Every region of this process, open or not (weakly): enable_process_merging()
# advises or unadvises them all, as PR_SET_MEMORY_MERGE does every VMA.
_all: weakref.WeakValueDictionary[int, Region] = weakref.WeakValueDictionary()


class _Listener(Protocol):
    """What a region asks of this process's agent (agent.py)."""

    process_merging: bool

    def on_advise(self, region: Region, first: int, n: int, mergeable: bool) -> None: ...

    def on_close(self, region: Region) -> None: ...

    def merge_now(self, region: Region, first: int, n: int) -> int:
        """Advise the range (region.set_mergeable) and merge it now."""


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


class SupportsReadinto(Protocol):
    """A binary file, as :meth:`Region.readinto` reads it (``open(path, "rb")``)."""

    def readinto(self, buffer: memoryview, /) -> int: ...


class SupportsRawReadinto(Protocol):
    """A raw binary file (``io.RawIOBase``): its readinto returns None when it
    is non-blocking and has no data yet."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


# Set by the agent module (its on_advise, on_close and merge_now hooks) so
# regions do not import the agent (and work without any coordinator at all).
_listener: _Listener | None = None


def acquire_unless_finalizing(lock: _Lock) -> bool:
    """Take ``lock``, waiting as long as it takes, except during interpreter
    finalization: then only if it is free, and False if not.

    Once the interpreter finalizes, CPython ends (up to 3.13) or blocks (3.14+)
    every daemon thread that wants the GIL back, holding whatever locks it
    had; a finalizer that waits for one of them (a Region freed at module
    teardown closing itself) hangs the exit.  A library must never do that:
    the caller skips what it cannot do, and the exit releases the rest.
    """
    return bool(lock.acquire(blocking=not sys.is_finalizing()))


ENV_FAULT_AROUND = "SHMDEDUP_COW_FAULT_AROUND"


def cow_fault_around(pages: int | None = None) -> int:
    """The widest copy-on-write fault-around of this process, in pages.

    A write to a merged page breaks that page only, unless it lands on the
    page right after the previous break (a sequential writer): then the trap
    breaks twice as many pages as last time, up to this many, with one copy
    and one remap, like the kernel's fault-around for reads.  Pages broken
    ahead but never written are merged again by the next scan.  1 turns it
    off (every write fault breaks exactly one page, as in Linux KSM).  The
    default is 64, or ``$SHMDEDUP_COW_FAULT_AROUND``.  With ``pages``, sets it
    and returns the previous value.
    """
    if pages is None:
        return _native.fault_around()
    pages = check_int("pages", pages, 1, _native.FAULT_AROUND_LIMIT)
    return _native.fault_around(pages)


def _fault_around_from_env() -> None:
    value = os.environ.get(ENV_FAULT_AROUND)
    if not value:
        return
    try:
        cow_fault_around(int(value))
    except ValueError:
        warnings.warn(f"${ENV_FAULT_AROUND}={value!r} ignored: it must be an int between 1 and "
                      f"{_native.FAULT_AROUND_LIMIT}", RuntimeWarning, stacklevel=2)


class Region(_native.Mapping):
    """N pages of shared memory that can be advised mergeable.

    ``Region(size)`` rounds size up to whole pages.  ``mergeable=True`` advises
    the whole region at once; with process-wide merging switched on
    (:func:`shmdedup.enable_process_merging`) that is the default, and
    ``mergeable=False`` opts this region out.
    """

    def __init__(self, size: int, *, mergeable: bool | None = None) -> None:
        size = check_int("size", size, 1)
        npages = pages_for(size)
        backing = _shm.create(npages * PAGE_SIZE, "region")
        try:
            meta = _shm.create(pages_for(npages) * PAGE_SIZE, "meta")
        except BaseException:
            os.close(backing)
            raise
        try:
            # The state bytes are written by merges and the trap, through a
            # mapping: a page of them still a hole when /dev/shm is full would
            # end the process with SIGBUS at its first merge.  Allocate them
            # now, where running out is a clear error.
            os.posix_fallocate(meta, 0, pages_for(npages) * PAGE_SIZE)
        except OSError as e:
            os.close(backing)
            os.close(meta)
            raise ShmError(e.errno, f"cannot allocate the region's page states: {e.strerror}") from e
        except BaseException:
            os.close(backing)
            os.close(meta)
            raise
        try:
            super().__init__(backing, meta, npages)
        except BaseException:
            os.close(backing)
            os.close(meta)
            raise
        self.id: int = next(_ids)
        self.backing_fd: int = backing
        self.meta_fd: int = meta
        self.pid: int = os.getpid()
        # Advice per page, the truth the agent registers with a coordinator.
        self._advice = np.zeros(npages, dtype=bool)
        # Held by the agent while it merges or breaks this region, and by
        # close(), so a region is never unmapped under a running merge.
        self._op_lock = threading.Lock()
        # Pages pinned private by an I/O in progress (pinned()): never merged.
        self._pins = np.zeros(npages, dtype=np.int32)
        _native.trap_install()
        _all[self.id] = self
        if mergeable is None:
            mergeable = _listener is not None and _listener.process_merging
        if mergeable:
            self.advise(MERGEABLE)

    # -- basic properties ------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the region (a whole number of pages)."""
        return self.npages * PAGE_SIZE

    nbytes = size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.npages} pages"
        return f"<shmdedup.Region id={self.id} {state}>"

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            if self.pid != os.getpid():
                raise RegionClosedError(
                    f"region {self.id} belongs to process {self.pid}: regions are not inherited across fork")
            raise RegionClosedError(f"region {self.id} is closed")

    def _page_range(self, offset: object, length: object, *, round_out: bool = False) -> tuple[int, int]:
        """(first page, page count) of a byte range, madvise style: offset must
        be page-aligned (unless round_out), length is rounded up."""
        self._check_open()
        offset = check_int("offset", offset)
        if length is None:
            length = self.size - offset if offset <= self.size else -1
        length = check_int("length", length)
        if round_out:
            end = offset + length
            offset -= offset % PAGE_SIZE
            length = end - offset
        elif offset % PAGE_SIZE:
            raise ArgumentError(f"offset {offset} is not a multiple of the page size {PAGE_SIZE}")
        if offset + length > self.size:
            raise ArgumentError(
                f"length {length} at offset {offset} runs past the end of the region ({self.size} bytes)")
        return offset // PAGE_SIZE, pages_for(length)

    # -- views -----------------------------------------------------------

    def ndarray(self, dtype: npt.DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None,
                offset: int = 0) -> npt.NDArray[Any]:
        """A numpy array over the region's memory (no copy).

        shape None means as many items as fit after offset.  Writes to merged
        pages are copy-on-write: they break the page, invisibly to the caller.
        """
        self._check_open()
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise ArgumentError(f"dtype: {e}") from e
        if dt.itemsize == 0 or dt.hasobject:
            raise ArgumentError(f"dtype {dt} cannot live in shared memory")
        offset = check_int("offset", offset)
        if offset > self.size:
            raise ArgumentError(f"offset {offset} is past the end of the region ({self.size} bytes)")
        if offset % dt.alignment:
            raise ArgumentError(f"offset {offset} is not aligned for dtype {dt} (alignment {dt.alignment})")
        if shape is None:
            shape = ((self.size - offset) // dt.itemsize,)
        elif not isinstance(shape, tuple):
            shape = (shape,)
        dims = tuple(check_int("shape", d) for d in shape)
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if offset + count * dt.itemsize > self.size:
            raise ArgumentError(
                f"an array of shape {dims} and dtype {dt} at offset {offset} needs "
                f"{count * dt.itemsize} bytes; the region has {self.size - offset} after it")
        return np.frombuffer(memoryview(self), dtype=dt, count=count, offset=offset).reshape(dims)

    # -- advice ----------------------------------------------------------

    def advise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) for a range.

        UNMERGEABLE drops the advice, then breaks every merged page of the
        range back to a private copy.  If memory runs out that raises OSError
        (ENOSPC, ENOMEM), and a signal (Ctrl-C) interrupts it within ~256
        pages; either way every page is merged or private with its bytes, and
        calling again finishes the job.
        """
        if (isinstance(advice, bool) or not isinstance(advice, (int, np.integer))
                or advice not in (MERGEABLE, UNMERGEABLE)):
            raise ArgumentError(f"advice must be MERGEABLE ({MERGEABLE}) or UNMERGEABLE ({UNMERGEABLE}), got {advice!r}")
        first, n = self._page_range(offset, length)
        if n == 0:
            return
        mergeable = advice == MERGEABLE
        if not mergeable:
            # Tell the coordinator first so it stops merging the range, then
            # break what is merged.
            self._advice[first:first + n] = False
            if _listener is not None:
                _listener.on_advise(self, first, n, False)
            self.break_range(first, n)
            return
        self._advice[first:first + n] = True
        if _listener is not None:
            _listener.on_advise(self, first, n, True)

    def merge_now(self, offset: int = 0, length: int | None = None) -> int:
        """Merge a range whose content is final, now: no scan, no two-visit wait.

        Same argument rules and errors as :meth:`advise`.  The range is advised
        MERGEABLE first (so the scan keeps it merged afterwards, and the
        advice outlives the call, as for advise).  Before it returns, every
        page of the range that equals a stable page is mapped onto it and its
        private copy punched out of the region's shm object, and every other
        page is made a stable page at once (the coordinator copies it) and
        mapped the same way, so the next process with the same bytes finds
        it.  Within ``max_kernel_pages``, ``max_page_sharing`` and the mapping
        budget: pages past them stay private (the scan tries them later).
        Never-written pages (holes) cost nothing and are left alone.

        Returns the number of pages of the range merged during the call (0
        when they all were merged already).  Returns 0 at once, the data
        untouched, when no coordinator answers or its ``run`` is not 1.  A
        page another thread writes meanwhile ends private with its new bytes.
        If the coordinator dies, or stops answering for
        ``shmdedup.worker.agent.MERGE_NOW_TIMEOUT`` seconds, it returns what
        merged until then (and the calls in the next
        ``shmdedup.worker.agent.STALL_WINDOW`` seconds return 0 at once,
        unless it answers again).  Raises ``ShmError`` (an OSError,
        errno ENOSPC, with the count in ``.merged``) when the shared-memory
        filesystem is full and some pages could not become stable; those stay
        private with their bytes, the others are merged.
        """
        first, n = self._page_range(offset, length)
        if n == 0:
            return 0
        if _listener is None:
            self._advice[first:first + n] = True
            return 0
        # The agent sets the advice: it travels with the request (an advise
        # message would also wake the scan for a batch, each chunk of a
        # streaming load), and a registration meanwhile leaves it out.
        return _listener.merge_now(self, first, n)

    def set_mergeable(self, first: int, n: int) -> None:
        """Advise pages [first, first + n) MERGEABLE here only (the agent's
        merge_now tells the coordinator itself)."""
        self._advice[first:first + n] = True

    def merge_hints(self, first: int, n: int) -> bytes:
        """Little-endian XXH64 of each private page with data (0 for the
        others): merge_now's lookup hints for the coordinator."""
        h = self.checksums(first, n)
        if sys.byteorder != "little":
            h = np.frombuffer(h, np.uint64).astype("<u8").tobytes()
        return h

    # -- for the agent ---------------------------------------------------

    @property
    def op_lock(self) -> threading.Lock:
        """Held by the agent while it merges or breaks this region, and by
        close(), so a region is never unmapped under a running merge."""
        return self._op_lock

    def may_merge(self, pages: np.ndarray) -> np.ndarray:
        """Mask of ``pages`` (indexes) that a merge may take now: advised
        mergeable, and not pinned private by an I/O (:meth:`pinned`)."""
        mask: np.ndarray = self._advice[pages] & (self._pins[pages] == 0)
        return mask

    def advice_runs(self, first: int = 0, n: int | None = None,
                    without: Iterable[Sequence[int]] = ()) -> list[tuple[int, int]]:
        """The mergeable ranges of pages [first, first + n) (all pages by
        default) as (first page, page count) runs, leaving out the
        ``without`` ranges (start, end)."""
        end = self.npages if n is None else first + n
        mask = self._advice[first:end]
        cut = [(max(a, first) - first, min(b, end) - first) for a, b in without
               if a < end and b > first]
        if cut:
            mask = mask.copy()
            for a, b in cut:
                mask[a:b] = False
        starts, ends = mask_runs(mask)
        return [(first + s, e - s) for s, e in zip(starts.tolist(), ends.tolist())]

    # -- copy-on-write and I/O ------------------------------------------

    def prepare_write(self, offset: int = 0, length: int | None = None) -> int:
        """Break merged pages overlapping [offset, offset+length) so that a
        system call may write there (read/recv_into into a merged page get
        EFAULT, not a fault).  Returns pages broken.  A page may merge again
        later: call this right before the system call."""
        first, n = self._page_range(offset, length, round_out=True)
        return self.break_range(first, n)

    @contextlib.contextmanager
    def pinned(self, offset: int = 0, length: int | None = None) -> Iterator[None]:
        """Break the merged pages overlapping the range and keep them private
        until the block ends: for a system call that writes there and may
        block (a recv waiting for data), which prepare_write alone cannot
        cover, since the page could merge again while it waits."""
        first, n = self._page_range(offset, length, round_out=True)
        with self._op_lock:       # the agent merges under this lock
            self._pins[first:first + n] += 1
            try:
                self.break_range(first, n)
            except BaseException:
                self._pins[first:first + n] -= 1
                raise
        try:
            yield
        finally:
            self._pins[first:first + n] -= 1

    @overload
    def readinto(self, f: SupportsReadinto | int, offset: int = 0, length: int | None = None) -> int: ...
    @overload
    def readinto(self, f: SupportsRawReadinto, offset: int = 0, length: int | None = None) -> int | None: ...

    def readinto(self, f: SupportsRawReadinto | int, offset: int = 0, length: int | None = None) -> int | None:
        """Read from a binary file (or raw fd) into the region; returns bytes read
        (None: a non-blocking raw file had no data)."""
        if length is None:
            length = self.size - offset if isinstance(offset, int) and 0 <= offset <= self.size else -1
        with self.pinned(offset, length), memoryview(self)[offset:offset + length] as view:
            if isinstance(f, int):
                return os.readv(f, [view])
            return f.readinto(view)

    def recv_into(self, sock: socket.socket, offset: int = 0, nbytes: int | None = None, flags: int = 0) -> int:
        """socket.recv_into into the region, its pages pinned private meanwhile."""
        if nbytes is None:
            nbytes = self.size - offset if isinstance(offset, int) and 0 <= offset <= self.size else -1
        with self.pinned(offset, nbytes), memoryview(self)[offset:offset + nbytes] as view:
            return sock.recv_into(view, nbytes, flags)

    # -- state -----------------------------------------------------------

    def merged_pages(self) -> int:
        """Pages of this region currently merged (stable or zero page)."""
        self._check_open()
        s = np.frombuffer(self.states(), dtype=np.uint8)
        return int(np.count_nonzero((s == _native.MERGED) | (s == _native.ZERO)))

    def allocated_bytes(self) -> int:
        """Memory the backing object really holds (st_blocks), seen from outside."""
        self._check_open()  # closed: the fd is gone (its number may be reused)
        return _shm.allocated_bytes(self.backing_fd)

    def close(self) -> None:
        """Unmap the region.  Raises BufferError while memoryviews or arrays
        over it are alive.  Idempotent."""
        if self.closed:
            if self.pid != os.getpid() and self.backing_fd >= 0:
                super().close()  # forked child: only drops its descriptors
                self._close_fds()
            return
        if self.exports:
            super().close()  # raises BufferError with the count
        if _listener is not None:
            _listener.on_close(self)
        if not acquire_unless_finalizing(self._op_lock):
            # Finalizing, with a merge or break of this region frozen in a
            # daemon thread: leave the mapping to the exit.
            return
        try:
            super().close()
        finally:
            self._op_lock.release()
        self._close_fds()

    def _close_fds(self) -> None:
        _shm.close_fds((self.backing_fd, self.meta_fd))
        self.backing_fd = self.meta_fd = -1

    def __del__(self) -> None:
        try:
            if not self.closed and not self.exports:
                self.close()
        except Exception:
            pass


def open_regions() -> int:
    """How many regions of this process are open (not closed yet)."""
    return sum(not r.closed for r in list(_all.values()))


_fault_around_from_env()


__all__ = [
    "MERGEABLE",
    "PAGE_SIZE",
    "UNMERGEABLE",
    "Region",
    "SupportsRawReadinto",
    "SupportsReadinto",
    "cow_fault_around",
    "open_regions",
]
