"""Writes into a worker's merged pages from another process (a debugger).

A merged page is a read-only MAP_SHARED mapping of the stable object, made
from a read-only descriptor.  The kernel's forced writes (FOLL_FORCE: writes
to /proc/<pid>/mem and PTRACE_POKEDATA) cannot copy-on-write a shared
mapping, and the mapping may never become writable, so they fail with EIO;
process_vm_writev does not force and fails with EFAULT.  No fault reaches
the worker's trap; the page stays merged and unchanged.  After
``region.prepare_write`` (or inside ``region.pinned``) in the worker, the
same writes land.

The test process plays the debugger: it is the worker's parent, of the same
uid, so it may ptrace it and write its /proc/<pid>/mem.
"""

from __future__ import annotations

import ctypes
import errno
import os

from tests.helpers import Worker, wait_for
from tests.integration.conftest import FAST

NPAGES = 8
SETUP = r"""
import numpy as np
from shmdedup import MERGEABLE, PAGE_SIZE as P, Region
r = Region(NPAGES * P)
a = r.ndarray(np.uint8, (NPAGES, P))
a[:] = 0x5A
r.advise(MERGEABLE)
result = a.ctypes.data
"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_PTRACE_POKEDATA, _PTRACE_ATTACH, _PTRACE_DETACH = 5, 16, 17


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def proc_mem_write(pid: int, addr: int, data: bytes) -> int | str:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        return os.pwrite(fd, data, addr)
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)


def poke(pid: int, addr: int, word: int) -> int | str:
    """PTRACE_POKEDATA one word (attach, poke, detach)."""
    assert _libc.ptrace(_PTRACE_ATTACH, pid, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        os.waitpid(pid, 0)
        ctypes.set_errno(0)
        rv = _libc.ptrace(_PTRACE_POKEDATA, pid, ctypes.c_void_p(addr), ctypes.c_void_p(word))
        return 0 if rv == 0 else errno.errorcode[ctypes.get_errno()]
    finally:
        _libc.ptrace(_PTRACE_DETACH, pid, None, None)


def vm_write(pid: int, addr: int, data: bytes) -> int | str:
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IOVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = _IOVec(addr, len(data))
    n = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return n if n >= 0 else errno.errorcode[ctypes.get_errno()]


def test_debugger_writes_into_merged_pages_fail_with_eio(coordinator):
    c = coordinator(**FAST)
    w = Worker()
    base = w.call(SETUP, NPAGES=NPAGES)
    P = os.sysconf("SC_PAGE_SIZE")
    wait_for(lambda: w.call("result = r.merged_pages()") == NPAGES, 60, "the pages to merge")
    c.set("run", 0)     # pages broken below stay private (no merge back meanwhile)
    page = lambda i: base + i * P  # noqa: E731
    assert proc_mem_write(w.pid, page(1), b"x") == "EIO"
    assert poke(w.pid, page(2), 0x41) == "EIO"
    assert vm_write(w.pid, page(3), b"y") == "EFAULT"
    # Starting on a private page, a /proc/<pid>/mem write stops short at the
    # merged one.
    w.call("r.prepare_write(4 * P, P)")
    assert proc_mem_write(w.pid, page(4), b"z" * 2 * P) == P
    assert w.call("result = (r.merged_pages(), bytes(a[1:4, 0]), bytes(a[4:6, 0]))") == \
        (NPAGES - 1, b"\x5a" * 3, b"z\x5a")
    # Broken first (in the worker), the same writes land.
    w.call("r.prepare_write(P, 3 * P)")
    assert proc_mem_write(w.pid, page(1), b"x") == 1
    assert poke(w.pid, page(2), 0x41) == 0
    assert vm_write(w.pid, page(3), b"y") == 1
    assert w.call("result = bytes(a[1:4, 0])") == b"xAy"
    assert w.close() == 0
