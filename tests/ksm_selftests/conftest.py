"""The Linux kernel's KSM selftests, ported to regions (docs/ksm-selftests.md).

``tools/testing/selftests/mm/ksm_functional_tests.c`` and ``ksm_tests.c`` run
in one process that maps anonymous memory, madvises it, drives ksmd through
/sys/kernel/mm/ksm and checks /proc/self/ksm_stat and /proc/self/pagemap.
Here the process under test is a worker process (``tests.helpers.Worker``)
running :data:`WORKER`: it allocates regions, advises them, drives the
coordinator through its own ``Client`` (run, use_zero_pages, waits on
full_scans advancing, never a sleep) and reads its own /proc/self/pagemap.
The coordinator is a thread of the test process, private to each test, so
its counters are the test's own, as the kernel tests' are once they have
written run=2.

``ksm`` gives (coordinator, worker) with :data:`WORKER` loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import Worker
from tests.integration.conftest import (  # noqa: F401  (fixtures for this directory too)
    _memory_lock,
    _nothing_left_in_dev_shm,
    coordinator,
    no_shm_leftovers,
    reaper,
)

MiB = 1 << 20

# Runs in the worker: the kernel tests' helpers, for regions.
WORKER = r'''
import ctypes, os, subprocess, sys, time
import numpy as np
import shmdedup
from shmdedup import MERGEABLE, UNMERGEABLE, PAGE_SIZE as P, Region

client = shmdedup.Client(timeout=120)
_pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
_libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4


def after_fork():
    """In a forked child: a connection of its own (never the parent's), and
    its own pagemap (the inherited descriptor reads the parent's)."""
    global client, _pagemap
    client = shmdedup.Client(timeout=120)
    _pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)


def addr(r):
    return r.ndarray(np.uint8).ctypes.data


def pfns(r):
    """The page frame of each page of the region (0: not present, or not shown)."""
    raw = os.pread(_pagemap, 8 * r.npages, addr(r) // P * 8)
    e = np.frombuffer(raw, np.uint64)
    present = (e >> np.uint64(63)).astype(bool)
    return np.where(present, e & np.uint64((1 << 55) - 1), np.uint64(0))


def touch(r):
    """Read one byte of every page, so that each has a page-table entry (a
    merged or broken page is mapped afresh, and faulted in lazily)."""
    return int(r.ndarray(np.uint8, (r.npages, P))[:, 0].astype(np.int64).sum())


def range_maps_duplicates(r):
    """The kernel tests' check: does the range map one page frame twice?"""
    touch(r)
    f = pfns(r)
    f = f[f != 0]
    return len(np.unique(f)) != len(f)


def pfns_readable(r):
    touch(r)
    return bool(pfns(r).any())


def my_stat(name):
    """This process's line of ksm_stat, as the coordinator counts it."""
    for w in client.stats()["workers"]:
        if w["pid"] == os.getpid():
            return w[name]
    return 0


def get_my_merging_pages():
    return my_stat("ksm_merging_pages")


def get_my_ksm_zero_pages():
    return my_stat("ksm_zero_pages")


def ksm_merge():
    """run=1, then two full scans (the kernel's ksm_merge): every merge they
    asked for has landed when the wait returns."""
    client.set("run", 1)
    client.wait_full_scans(2, timeout=120)


def ksm_unmerge():
    client.set("run", 2)


def mmap_and_merge_range(val, npages, mode):
    """__mmap_and_merge_range: a region of npages filled with val, made
    mergeable by advice ('madvise'), by process-wide merging switched on now
    ('prctl'), or already on ('none'); merged.  Raises AssertionError with
    the kernel test's message when a step fails."""
    ksm_unmerge()                      # stabilize accounting
    assert get_my_merging_pages() == 0, "Still pages merged"
    r = Region(npages * P)
    r.ndarray(np.uint8)[:] = val
    if mode == "prctl":
        shmdedup.enable_process_merging(True)
    elif mode == "madvise":
        r.advise(MERGEABLE)
    ksm_merge()
    assert not val or get_my_merging_pages(), "No pages got merged"
    return r


def madvise(r, offset, length, advice):
    if _libc.madvise(ctypes.c_void_p(addr(r) + offset), ctypes.c_size_t(length), advice):
        raise OSError(ctypes.get_errno(), "madvise")


def test_child_ksm(npages):
    """The kernel's test_child_ksm, in a forked or exec'd child: process-wide
    merging is on, and merging really happens.  0, or -1/-2 as there."""
    if not shmdedup.process_merging():
        return -1
    try:
        r = mmap_and_merge_range(0xcf, npages, "none")
    except AssertionError:
        return -2
    r.close()
    return 0
'''


@pytest.fixture
def ksm(coordinator: Callable[..., Any], reaper: None) -> Iterator[tuple[Any, Worker]]:  # noqa: F811
    """A private coordinator (no pause between batches, as the kernel tests
    set sleep_millisecs=0) and a worker with the harness loaded."""
    c = coordinator(sleep_millisecs=0, pages_to_scan=10000)
    w = Worker(setup=WORKER)
    yield c, w
    w.call("shmdedup.enable_process_merging(False)")
    assert w.close() == 0
