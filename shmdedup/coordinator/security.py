"""Trust boundaries of the coordinator: what it accepts from a peer, and how.

docs/security.md states the threat model; this module holds the mechanisms
the coordinator uses at its boundaries:

* :func:`check_worker_object` vets a descriptor a worker sends at
  registration: a readable regular file on tmpfs, at least as large as the
  worker claims.  Anything else (a pipe, a directory, a write-only fd, a
  file on a FUSE mount whose reads could block the event loop forever) is
  refused before the coordinator ever reads it.
* :class:`StateBytes` reads a worker's state bytes with pread, never through
  a mapping.  The meta object belongs to the worker, which may shrink it at
  any moment; touching a mapping past the new end is SIGBUS, which would kill
  the whole domain.  A pread past the end just comes back short, and the
  missing bytes read as 0 (PRIVATE), the same as a lie the worker could tell
  anyway: it only hurts that worker's own accounting.
* :class:`TokenBucket` bounds the message rate of each connection, and
  :class:`LogLimiter` the coordinator's log lines about peers, per kind: a
  flood of bad connections must not turn into a flood of log lines.
* :func:`set_dumpable` (prctl PR_SET_DUMPABLE) keeps same-uid processes from
  ptrace / process_vm_writev into a standalone coordinator and from opening
  its descriptors (the writable stable segment) through /proc/<pid>/fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import time
from typing import Any

import numpy as np

from shmdedup import _shm
from shmdedup.errors import ProtocolError

TMPFS_MAGIC = 0x01021994
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_STATFS_SIZE = 120  # sizeof(struct statfs) on 64-bit Linux; f_type comes first


def fs_type(fd: int) -> int:
    """The filesystem magic of the file behind fd (statfs f_type)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _shm.libc.fstatfs(fd, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fstatfs: {os.strerror(e)}")
    return int(struct.unpack_from("l", buf.raw)[0]) & 0xFFFFFFFF


def check_worker_object(fd: int, what: str, min_size: int) -> None:
    """Raise ProtocolError unless *fd* is a readable tmpfs file of >= min_size bytes."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fs = fs_type(fd)
    except OSError as e:
        raise ProtocolError(f"{what}: cannot inspect the descriptor: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"{what} is not a shared memory object (mode {st.st_mode:o})")
    if flags & getattr(os, "O_PATH", 0) or flags & os.O_ACCMODE == os.O_WRONLY:
        raise ProtocolError(f"{what} descriptor is not open for reading")
    if fs != TMPFS_MAGIC:
        raise ProtocolError(f"{what} is not on tmpfs (filesystem magic {fs:#x})")
    if st.st_size < min_size:
        raise ProtocolError(f"{what} holds {st.st_size} bytes, {min_size} needed "
                            f"for the pages registered")


class StateBytes:
    """A worker's state bytes (one per page), read with pread on each access.

    Indexable like the uint8 array it replaces: ``s[a:b]``, ``s[i]`` and
    ``s[index_array]`` return fresh numpy values.  Never maps the object, so a
    worker shrinking it cannot crash the coordinator (see module docstring).
    What is read follows what is asked: an index array of pages far apart is
    read one cluster of nearby pages at a time, never as one span between the
    lowest and the highest; and :meth:`data_ranges` says where the bytes can
    be anything but 0 at all (a hole in the object is PRIVATE).
    """

    # Index arrays whose pages lie further apart than this are read per cluster.
    CLUSTER_GAP = 4096

    def __init__(self, fd: int, npages: int) -> None:
        self.fd = fd
        self.npages = npages

    def __len__(self) -> int:
        return self.npages

    def _read(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, 0), min(b, self.npages)
        out = np.zeros(max(b - a, 0), np.uint8)
        if b > a:
            data = os.pread(self.fd, b - a, a)
            out[:len(data)] = np.frombuffer(data, np.uint8)
        return out

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.npages)
            return self._read(start, stop)[::step]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not 0 <= i < self.npages:
                raise IndexError(f"page {i} is outside the region's {self.npages} pages")
            return self._read(i, i + 1)[0]
        idx = np.asarray(key)
        if idx.size == 0:
            return np.zeros(idx.shape, np.uint8)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if lo < 0 or hi > self.npages:
            raise IndexError(f"pages [{lo}, {hi}) are outside the region's {self.npages} pages")
        if hi - lo <= 4 * idx.size + self.CLUSTER_GAP:
            return self._read(lo, hi)[idx - lo]
        flat = idx.ravel()
        order = np.argsort(flat, kind="stable")
        s = flat[order]
        cut = (np.flatnonzero(np.diff(s) > self.CLUSTER_GAP) + 1).tolist()
        got = np.empty(len(s), np.uint8)
        for a, b in zip([0, *cut], [*cut, len(s)]):
            first = int(s[a])
            got[a:b] = self._read(first, int(s[b - 1]) + 1)[s[a:b] - first]
        out = np.empty(len(s), np.uint8)
        out[order] = got
        return out.reshape(idx.shape)

    def data_ranges(self, a: int = 0, b: int | None = None) -> list[tuple[int, int]]:
        """[start, end) ranges of pages within [a, b) whose state bytes hold
        data; every other page's state byte reads 0 (PRIVATE)."""
        b = self.npages if b is None else min(b, self.npages)
        if b <= a:
            return []
        return [(s, s + n) for s, n in _shm.data_extents(self.fd, a, b)]


class TokenBucket:
    """``rate`` messages per second on average, bursts of up to ``burst``."""

    def __init__(self, burst: float) -> None:
        self.tokens: float = float(burst)
        self.last: float = time.monotonic()

    def take(self, rate: float, burst: float, now: float | None = None) -> bool:
        """Spend one token; False when the bucket is empty (the peer is too fast).

        The limits are passed on every call so a control changed at run time
        applies to connections that are already open.
        """
        now = time.monotonic() if now is None else now
        self.tokens = min(float(burst), self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class LogLimiter:
    """Warnings of one kind at ``rate`` lines a second on average, bursts of
    ``burst``; lines past that are counted, and the count is added to the next
    line of that kind that passes."""

    def __init__(self, logger: Any, rate: float = 20.0, burst: float = 200.0) -> None:
        self.logger = logger
        self.rate: float = rate
        self.burst: float = burst
        self.buckets: dict[str, TokenBucket] = {}
        self.suppressed: dict[str, int] = {}

    def warning(self, kind: str, fmt: str, *args: Any) -> None:
        bucket = self.buckets.get(kind)
        if bucket is None:
            bucket = self.buckets[kind] = TokenBucket(self.burst)
        if not bucket.take(self.rate, self.burst):
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return
        n = self.suppressed.pop(kind, 0)
        if n:
            fmt += " (%d more like it not logged)"
            args += (n,)
        self.logger.warning(fmt, *args)


_fs_type = fs_type


def set_dumpable(dumpable: bool) -> None:
    """prctl(PR_SET_DUMPABLE): with False, only root may ptrace this process,
    write its memory (process_vm_writev) or open /proc/<pid>/fd/*; no core dumps."""
    if _shm.libc.prctl(_PR_SET_DUMPABLE, int(bool(dumpable)), 0, 0, 0) != 0:
        e = ctypes.get_errno() or errno.EINVAL
        raise OSError(e, f"prctl(PR_SET_DUMPABLE): {os.strerror(e)}")


def is_dumpable() -> bool:
    return bool(_shm.libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
