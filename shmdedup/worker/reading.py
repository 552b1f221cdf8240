"""Reading a file into a region for the loading helpers, safely.

A :class:`Source` is a file being read front to back: a path opened here, or a
caller's binary file object.  It reads into a region only through ranges
pinned private for the duration of the system call (``Region.pinned``, or
``Region.readinto`` which pins): the kernel never writes into a merged page
(DESIGN, failure semantics: it would fail with EFAULT).  It remembers the
file's size, mtime and ctime when opened, so that the loader can tell whether
the file changed while it was read (``check_unchanged``).  Merging is the
loader's business (``loading``), not this module's.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from shmdedup.errors import ArgumentError, FileChangedError, ShortFileError
from shmdedup.worker.region import Region


class Source:
    """A file being read front to back: a path opened here (read with pread at
    our own position), or a caller's binary file object (read with its own
    readinto, from its current position, which ends after the data read, as
    numpy.fromfile leaves it).  Remembers the file's size, mtime and ctime to
    tell whether it changes while it is read."""

    def __init__(self, file: Any) -> None:
        self.f: Any = None
        self.fd: int | None = None
        self.owned = False
        self.pos = 0
        if isinstance(file, (str, bytes, os.PathLike)):
            self.name = os.fsdecode(file)
            self.fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            self.owned = True
        elif callable(getattr(file, "readinto", None)):
            self.f = file
            self.name = str(getattr(file, "name", type(file).__name__))
            try:
                self.fd = file.fileno()
            except (AttributeError, OSError, ValueError):
                self.fd = None  # io.BytesIO and the like: nothing can change it behind our back
        else:
            raise ArgumentError(f"file must be a path or a binary file object (with readinto), "
                                f"got {type(file).__name__}")
        try:
            st = os.fstat(self.fd) if self.fd is not None else None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.name)
            self.regular = st is not None and stat.S_ISREG(st.st_mode)
            self.seekable = st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode))
            self._seen = self._identity(st) if self.regular and st is not None else None
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.owned and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def bytes_left(self) -> int | None:
        """Bytes from the current position to the end (negative: past it), or
        None when the size cannot be known (a pipe)."""
        if self.f is None:
            assert self.fd is not None
            return os.fstat(self.fd).st_size - self.pos if self.seekable else None
        try:
            if not self.f.seekable():
                return None
            here = self.f.tell()
            end = self.f.seek(0, os.SEEK_END)
            self.f.seek(here)
            return int(end - here)
        except (OSError, ValueError):
            return None

    def skip(self, nbytes: int) -> None:
        if nbytes == 0:
            return
        if self.f is None and self.seekable:
            self.pos += nbytes
            return
        try:
            if self.f is not None and self.f.seekable():
                self.f.seek(nbytes, os.SEEK_CUR)
                return
        except (OSError, ValueError) as e:
            raise ArgumentError(f"cannot seek {nbytes} bytes ahead in {self.name}: {e}") from e
        data = self.read_bytes(nbytes)  # a pipe: read and drop
        if len(data) < nbytes:
            raise ShortFileError(f"{self.name} ended {len(data)} bytes into an offset of {nbytes}")

    def read_bytes(self, nbytes: int) -> bytes:
        """Up to nbytes as bytes (short only at the end of the file): headers."""
        out = bytearray()
        while len(out) < nbytes:
            if self.f is not None:
                part = self.f.read(nbytes - len(out))
            elif self.seekable:
                assert self.fd is not None
                part = os.pread(self.fd, nbytes - len(out), self.pos)
            else:
                assert self.fd is not None
                part = os.read(self.fd, nbytes - len(out))
            if not part:
                break
            out += part
            self.pos += len(part)
        return bytes(out)

    def readinto(self, region: Region, offset: int, nbytes: int) -> int:
        """Read up to nbytes into region[offset:]: short only at the end of the file."""
        got = 0
        while got < nbytes:
            off, n = offset + got, min(nbytes - got, 1 << 30)
            if self.f is not None:
                r = region.readinto(self.f, off, n)
            elif not self.seekable:
                r = region.readinto(self.fd, off, n)
            else:
                assert self.fd is not None
                with region.pinned(off, n), memoryview(region)[off:off + n] as view:
                    r = os.preadv(self.fd, [view], self.pos)
            if r is None:  # a non-blocking file object with nothing to read yet
                raise BlockingIOError(f"{self.name} is non-blocking and had no data")
            if r == 0:
                break
            got += r
            self.pos += r
        return got

    def check_unchanged(self) -> None:
        """Raise FileChangedError if the file's size, mtime or ctime moved since it was opened."""
        if self._seen is None or self.fd is None:
            return
        now = self._identity(os.fstat(self.fd))
        if now != self._seen:
            raise FileChangedError(
                f"{self.name} changed while it was read (size {self._seen[0]} -> {now[0]}, "
                f"mtime or ctime moved): the bytes read may mix old and new content; read it again")
