"""I/O into regions while the coordinator keeps merging, and regions made
after fork."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading

import numpy as np

import shmdedup
from tests.helpers import wait_for
from shmdedup import MERGEABLE, PAGE_SIZE, _native

N = 64



def twins(seed: int) -> tuple[shmdedup.Region, shmdedup.Region]:
    data = np.random.default_rng(seed).integers(0, 256, N * PAGE_SIZE, dtype=np.uint8)
    out = []
    for _ in range(2):
        r = shmdedup.Region(N * PAGE_SIZE)
        r.ndarray(np.uint8)[:] = data
        r.advise(MERGEABLE)
        out.append(r)
    return out[0], out[1]


def test_blocking_recv_into_keeps_its_pages_private_while_scans_go_on() -> None:
    with shmdedup.Coordinator(pages_to_scan=10000, sleep_millisecs=0) as c:
        a, b = twins(1)
        wait_for(lambda: a.merged_pages() == N, 30, "the twins to merge")
        left, right = socket.socketpair()
        got: list = []
        t = threading.Thread(target=lambda: got.append(a.recv_into(left, 0, 3 * PAGE_SIZE)))
        t.start()
        wait_for(lambda: a.states()[0] == _native.PRIVATE, 10, "recv_into to break its pages")
        # Several full scans while recv_into waits: the pinned pages stay private.
        c.wait_full_scans(3, timeout=30)
        assert set(a.states()[:3]) == {_native.PRIVATE}
        payload = bytes(range(256)) * (3 * PAGE_SIZE // 256)
        right.sendall(payload)
        t.join(10)
        assert got == [len(payload)]
        assert bytes(memoryview(a)[:len(payload)]) == payload
        # Unpinned again: untouched pages of the range merge back once equal.
        with memoryview(a) as m:
            m[:3 * PAGE_SIZE] = memoryview(b)[:3 * PAGE_SIZE]
        wait_for(lambda: a.merged_pages() == N, 30, "the pages to merge again after the I/O")
        left.close(), right.close(), a.close(), b.close()


def _child(q) -> None:
    try:
        a, b = twins(2)
        wait_for(lambda: a.merged_pages() == N, 30, "merging in the forked child")
        q.put("ok")
    except BaseException as e:  # report, don't hang the parent
        q.put(repr(e))


def test_regions_created_after_fork_merge() -> None:
    with shmdedup.Coordinator(pages_to_scan=10000, sleep_millisecs=0):
        a, b = twins(3)     # the parent has an agent already
        wait_for(lambda: a.merged_pages() == N, 30, "merging in the parent")
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(q,))
        p.start()
        try:
            assert q.get(timeout=60) == "ok"
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        assert p.exitcode == 0
        a.close(), b.close()
