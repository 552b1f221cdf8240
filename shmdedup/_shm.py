"""POSIX shared-memory objects as plain file descriptors.

The only module of shmdedup that imports posix_ipc. Everything it hands out is
an ``int`` fd that the caller owns; posix_ipc keeps nothing.

Invariants kept here:

* **No name survives creation.** ``create`` unlinks the object right after
  ``shm_open``, before anything else can fail, so a crash at any later instant
  leaves nothing in /dev/shm. Objects travel between processes as descriptors
  (SCM_RIGHTS), never by name.
* **Every fd is close-on-exec**, so a worker that spawns a program does not leak
  its backing or the stable segments into it.
* **No posix_ipc exception escapes.** They are not OSError and carry no errno;
  ``translate_error`` turns each into a ``ShmError`` with the errno it stands for.
* **Read-only means a new open file description** (``reopen_readonly``): a
  worker holding it cannot map it for writing or mprotect it writable (EACCES),
  which is what keeps stable slots immutable outside the coordinator.
* **Holes are never read.** ``data_extents`` and ``next_data`` find written
  pages without reading them, so callers can skip the rest without
  allocating it.  The object may belong to another process that truncates,
  grows or punches it at any moment: the answer is a snapshot, and a change
  between two system calls ends it early rather than failing.
* **No lock another process can hold.** They ask cachestat(2) (the C core's
  ``data_mask``/``first_data``), not SEEK_DATA/SEEK_HOLE: a seek on a shm
  object waits for its inode lock, which a write(2) into it holds while it
  faults its source in, for as long as its writer makes that last; the
  coordinator's event loop must not wait on a peer.  Seeks only where
  cachestat is missing (Linux before 6.5, or no C core).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from collections.abc import Callable, Iterable
from typing import TypeVar

import posix_ipc

from shmdedup.errors import ArgumentError, ShmError
from shmdedup.pages import PAGE_SIZE, check_int

_native_punch_hole: Callable[[int, int, int], None] | None
_data_mask: Callable[[int, int, int], bytes] | None
_first_data: Callable[[int, int, int], int | None] | None
try:
    from shmdedup._native import data_mask as _data_mask
    from shmdedup._native import first_data as _first_data
    from shmdedup._native import punch_hole as _native_punch_hole
except ImportError:  # an older or missing C core: ctypes does the same system call, seeks find data
    _native_punch_hole = _data_mask = _first_data = None
_cachestat = True               # cleared the first time the kernel lacks cachestat(2)
# data_extents asks for at most this many pages' mask at once.
_MASK_PAGES = 1 << 20

__all__ = [
    "PAGE_SIZE",
    "allocated_bytes",
    "close_fds",
    "create",
    "data_extents",
    "libc",
    "next_data",
    "punch_hole",
    "reopen_readonly",
    "resize",
    "translate_error",
]

_E = TypeVar("_E", bound=OSError)

# off_t is signed 64-bit: ftruncate and lseek cannot go past this.
_MAX_OFFSET = 2**63 - 1
# Leaves room for the "/shmdedup-", pid and token parts within NAME_MAX (255).
_MAX_TAG = 64
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

# The process's one handle on libc, for the calls os does not offer
# (fallocate here; fstatfs and prctl in the coordinator's security checks).
libc = ctypes.CDLL(None, use_errno=True)
_fallocate = libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

# posix_ipc sets its own message for the errnos it recognises and drops the
# number; fragments of its messages (1.1 - 1.3) recover it. First match wins,
# so "Shared memory ... already exists" is EEXIST before "memory" means ENOMEM.
_MESSAGE_ERRNOS = (
    ("already exists", errno.EEXIST),
    ("no shared memory exists", errno.ENOENT),
    ("does not exist", errno.ENOENT),
    ("too long", errno.ENAMETOOLONG),
    ("maximum number of files", errno.EMFILE),
    ("system limit", errno.ENFILE),
    ("too large", errno.EFBIG),
    ("invalid", errno.EINVAL),
    ("permission", errno.EACCES),
    ("read-only", errno.EACCES),
    ("no space", errno.ENOSPC),
    ("memory", errno.ENOMEM),
)


_M_MMAP_THRESHOLD = -3      # mallopt(3)


def fix_mmap_threshold(nbytes: int) -> bool:
    """Have glibc's malloc serve blocks of ``nbytes`` or more with their own
    mmap, so that freeing one gives its memory back at once; glibc's default
    threshold slides up to 32 MiB after such frees, and big temporaries then
    stay in the heap.  False where malloc is not glibc's (no mallopt)."""
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1)


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring failures: for descriptors being let go on a
    path that has nothing better to do with an error (a reply, a drop)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _os_error(cls: type[_E], err: int, call: str, filename: str | None = None) -> _E:
    """An exception of ``cls`` carrying ``err`` and naming the failed call."""
    message = f"{call}: {os.strerror(err)}"
    return cls(err, message) if filename is None else cls(err, message, filename)


def translate_error(exc: BaseException, call: str, name: str | None = None) -> ShmError:
    """The ``ShmError`` that a posix_ipc (or OSError/ValueError) failure stands for.

    The errno is exact when the exception has one, otherwise inferred from the
    posix_ipc class and message; EIO when nothing fits. Callers chain the result
    (``raise translate_error(exc, ...) from exc``) so the original stays visible.
    """
    err = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if not err:
        message = str(exc).lower()
        err = next((e for fragment, e in _MESSAGE_ERRNOS if fragment in message), None)
    if not err:
        if isinstance(exc, posix_ipc.ExistentialError):
            err = errno.EEXIST
        elif isinstance(exc, posix_ipc.PermissionsError):
            err = errno.EACCES
        elif isinstance(exc, posix_ipc.BusyError):
            err = errno.EAGAIN
        elif isinstance(exc, posix_ipc.SignalError):
            err = errno.EINTR
        elif isinstance(exc, ValueError):
            err = errno.EINVAL
        elif isinstance(exc, MemoryError):
            err = errno.ENOMEM
        else:
            err = errno.EIO
    return _os_error(ShmError, err, call, name)


def _new_name(tag: str) -> str:
    return f"/shmdedup-{tag}-{os.getpid()}-{secrets.token_hex(8)}"


def _release(shm: posix_ipc.SharedMemory) -> None:
    # Linux frees the descriptor even when close() reports an error, so there
    # is nothing to retry and nothing the caller could do about it.
    try:
        shm.close_fd()
    except (posix_ipc.Error, OSError, ValueError):
        pass


def create(size: int, tag: str = "obj") -> int:
    """Create an anonymous shm object of ``size`` bytes; return an fd the caller owns.

    The object is already unlinked when this returns. The fd is O_RDWR and
    O_CLOEXEC; the object has mode 0600. Raises ``ArgumentError`` for a bad size
    or tag and ``ShmError`` (with errno) when the system refuses.
    """
    check_int("size", size, 0, _MAX_OFFSET)
    if not isinstance(tag, str) or not 0 < len(tag) <= _MAX_TAG or not _TAG_CHARS.issuperset(tag):
        raise ArgumentError(f"tag must be 1-{_MAX_TAG} characters of [A-Za-z0-9_.], got {tag!r}")
    name = _new_name(tag)
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    except (posix_ipc.Error, OSError, ValueError, MemoryError) as exc:
        raise translate_error(exc, "shm_open", name) from exc
    try:
        try:
            shm.unlink()
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise translate_error(exc, "shm_unlink", name) from exc
        try:
            fd = os.dup(shm.fd)  # os.dup returns a non-inheritable (O_CLOEXEC) fd
        except OSError as exc:
            raise translate_error(exc, "dup", name) from exc
    finally:
        _release(shm)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise translate_error(exc, "ftruncate", name) from exc
    return fd


def resize(fd: int, size: int) -> None:
    """Set the object's size to ``size`` bytes (ftruncate). Raises ``ShmError``."""
    check_int("size", size, 0, _MAX_OFFSET)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise translate_error(exc, "ftruncate") from exc


def reopen_readonly(fd: int) -> int:
    """A new, read-only open file description of the object behind ``fd``.

    A process holding only this fd cannot map the object writable or mprotect
    such a mapping to PROT_WRITE (EACCES). The caller owns (and closes) the fd.
    """
    check_int("fd", fd, 0, 2**31 - 1)
    path = f"/proc/self/fd/{fd}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise translate_error(exc, f"open({path}, O_RDONLY)") from exc


def allocated_bytes(fd: int) -> int:
    """Memory the object really uses: st_blocks * 512 (holes cost nothing)."""
    return os.fstat(fd).st_blocks * 512


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the pages of [offset, offset+length) without changing the size.

    Later reads of the range return zeros. Partial pages at the edges are
    zeroed rather than freed (kernel semantics), so callers pass whole pages.
    Raises ``OSError`` with errno on failure.
    """
    check_int("offset", offset, 0, _MAX_OFFSET)
    check_int("length", length, 1, _MAX_OFFSET - offset)
    if _native_punch_hole is not None:
        _native_punch_hole(fd, offset, length)
        return
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _os_error(OSError, ctypes.get_errno(), "fallocate(PUNCH_HOLE)")


def _no_cachestat(exc: OSError) -> bool:
    """True (and seeks from now on) if ``exc`` says the kernel has no cachestat."""
    global _cachestat
    if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
        _cachestat = False
        return True
    return False


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The (offset, length) extents of [start, end) that hold data, in order,
    in whole pages clipped to [start, end).

    Nothing is read and no hole gets allocated.  Pages in memory or swapped
    out hold data (cachestat); without cachestat, lseek SEEK_DATA/SEEK_HOLE
    (tmpfs reports data per page, per huge page for THP shmem), which moves
    the file offset of ``fd``'s open file description, which every user of
    these objects ignores (they use pread/pwrite/mmap).
    """
    check_int("start", start, 0, _MAX_OFFSET)
    check_int("end", end, start, _MAX_OFFSET)
    if _data_mask is not None and _cachestat:
        try:
            return _mask_extents(_data_mask, fd, start, end)
        except OSError as exc:
            if not _no_cachestat(exc):
                raise
    return _seek_extents(fd, start, end)


def _mask_extents(data_mask: Callable[[int, int, int], bytes], fd: int, start: int,
                  end: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    last = -(-end // PAGE_SIZE)
    for w0 in range(start // PAGE_SIZE, last, _MASK_PAGES):
        mask = data_mask(fd, w0, min(_MASK_PAGES, last - w0))
        i = mask.find(1)
        while i >= 0:
            j = mask.find(0, i)
            if j < 0:
                j = len(mask)
            a, b = max((w0 + i) * PAGE_SIZE, start), min((w0 + j) * PAGE_SIZE, end)
            if extents and extents[-1][0] + extents[-1][1] == a:
                a = extents.pop()[0]            # a run across two windows
            extents.append((a, b - a))
            i = mask.find(1, j)
    return extents


def _seek_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        data = _seek_data(fd, pos)
        if data is None or data >= end:
            break
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        except OSError as exc:
            # ENXIO: the object was truncated below `data` since the first
            # seek (another process owns it); nothing is left from there.
            if exc.errno == errno.ENXIO:
                break
            raise
        if hole <= data:  # changed between the seeks as well: stop here, seen next time
            break
        extents.append((data, hole - data))
        pos = hole
    return extents


def next_data(fd: int, offset: int) -> int | None:
    """The first offset at or after ``offset`` that holds data, or None when
    there is none (only holes, or past the end): by cachestat within the
    object's size, as data_extents, else SEEK_DATA."""
    check_int("offset", offset, 0, _MAX_OFFSET)
    if _first_data is not None and _cachestat:
        try:
            first, last = offset // PAGE_SIZE, -(-os.fstat(fd).st_size // PAGE_SIZE)
            if first >= last:
                return None
            page = _first_data(fd, first, last - first)
            return None if page is None else max(page * PAGE_SIZE, offset)
        except OSError as exc:
            if not _no_cachestat(exc):
                raise
    return _seek_data(fd, offset)


def _seek_data(fd: int, offset: int) -> int | None:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
