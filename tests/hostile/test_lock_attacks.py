"""A peer that holds the inode lock of its own objects stalls nothing.

A write(2) into a shm object takes the object's inode lock and holds it while
it faults its source in; a peer makes that last as long as it likes (a source
page of a cold file on a slow disk: seconds, as any uid; a userfaultfd page
never served, as here: for ever).  A seek (SEEK_DATA/SEEK_HOLE) on the object
waits for that lock, and the coordinator used to seek on every peer's objects
from its event loop: to find data for the scan, for merge_now, and for each
statistics request (the state bytes' inherited pages).  It now asks
cachestat(2), which takes no lock (``_shm.data_extents``/``next_data``).

For each place, a real coordinator process with an honest worker beside the
peer: while the lock is held, the honest worker's fresh merges stay fast, a
client's stats round trips keep coming back, and once the writer lets go,
everything goes on.  Needs userfaultfd for kernel faults (root here).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading

import pytest

from shmdedup import _native
from tests.helpers import no_shm_leftovers, reaper, wait_for  # noqa: F401
from tests.hostile.loop_harness import NPAGES, CoordinatorProcess, Honest, assert_fast
from tests.hostile.scan_harness import Monitor
from tests.integration.hostile import PAGE, RawPeer, memfd

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="userfaultfd for kernel faults: needs root"),
              pytest.mark.usefixtures("no_shm_leftovers")]

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_USERFAULTFD = 323            # x86_64
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFD_API = 0xAA
_MODE_MISSING = 1


class HeldLock:
    """A thread blocked in pwrite(fd) on a source page nobody serves: it holds
    fd's inode lock until :meth:`release` closes the userfaultfd."""

    def __init__(self, fd: int) -> None:
        self.uffd = _libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if self.uffd < 0:
            err = ctypes.get_errno()
            pytest.skip(f"userfaultfd: {os.strerror(err)}") if err in (errno.EPERM, errno.ENOSYS) \
                else pytest.fail(f"userfaultfd: {os.strerror(err)}")
        fcntl.ioctl(self.uffd, _UFFDIO_API, bytearray(struct.pack("QQQ", _UFFD_API, 0, 0)))
        self.buf = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        fcntl.ioctl(self.uffd, _UFFDIO_REGISTER,
                    bytearray(struct.pack("QQQQ", addr, PAGE, _MODE_MISSING, 0)))
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._write, args=(fd,), daemon=True)
        self.thread.start()
        self.started.wait(10)
        # The writer is in the kernel, holding the lock, once it waits in the fault.
        wait_for(lambda: _in_fault(self.thread), 10, what="the writer to block in its fault")

    def _write(self, fd: int) -> None:
        self.started.set()
        try:
            os.pwrite(fd, memoryview(self.buf), 0)
        except OSError:
            pass                    # EFAULT once released: the page was never served

    def release(self) -> None:
        os.close(self.uffd)        # the fault fails, the write returns, the lock goes
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.buf.close()


def _in_fault(thread: threading.Thread) -> bool:
    tid = thread.native_id
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return "userfault" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("where", ["scan", "merge_now", "stats"])
def test_a_held_inode_lock_stalls_nothing(where: str) -> None:
    """``scan``: the peer advises an object whose first page is a hole (the
    scan looks for data after it); ``merge_now``: it asks to merge such a range
    now; ``stats``: it holds the lock of its state bytes, and sends nothing."""
    coord = CoordinatorProcess()
    honest = None
    peer = held = None
    backing = meta = -1
    try:
        honest = Honest(coord.path)
        wait_for(lambda: honest.merged() == NPAGES, 30, what="the honest worker to merge")
        n = 16
        backing, meta = memfd(n * PAGE), memfd(PAGE)
        os.pwrite(backing, os.urandom(PAGE), (n - 1) * PAGE)     # page 0 is a hole
        # Its state bytes claim page 14 merged by a previous coordinator: every
        # statistics request then looks for such pages in them.
        os.pwrite(meta, bytes([_native.MERGED]), 14)
        peer = RawPeer(coord.path)
        peer.hello()
        peer.send({"t": "register", "rid": 1, "npages": n}, [backing, meta])
        wait_for(lambda: any(w["pid"] == os.getpid() and w["regions"] == 1
                             for w in coord.stats()["workers"]), 30, what="its registration")
        held = HeldLock(meta if where == "stats" else backing)
        if where == "scan":
            peer.send({"t": "advise", "rid": 1, "start": 0, "npages": n, "mergeable": True})
        elif where == "merge_now":
            peer.send({"t": "merge_now", "req": 1, "rid": 1, "start": 0, "npages": n, "hashes": b""})
        mon = Monitor(coord.path)
        times = honest.fresh_merges(10)
        lat = mon.stop()
        assert coord.alive(), coord.log()[-3000:]
        assert not mon.errors, mon.errors
        assert_fast(times, f"a held inode lock ({where})")
        assert lat and max(lat) < 1.0, lat
        held.release()
        held = None
        assert coord.stats()["full_scans"] >= 0
        assert honest.fresh_merges(2)
    finally:
        if held is not None:
            held.release()
        if peer is not None:
            peer.close()
        for fd in (backing, meta):
            if fd >= 0:
                os.close(fd)
        if honest is not None:
            honest.close()
        coord.stop()
