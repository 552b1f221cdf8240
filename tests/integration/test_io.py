"""System calls that write into merged pages (DESIGN "Failure semantics").

The kernel copies a received message into user memory itself: a merged page
is read-only, so the copy fails with EFAULT instead of faulting into the COW
trap.  A stream socket keeps the bytes (tests/unit/test_cow.py); a datagram
socket has already taken the message off its queue: it is dropped.
``Region.recv_into`` breaks the pages first, and keeps them from merging again
until the call returns (``Region.pinned``), so the message arrives.

Real processes: a coordinator (a thread of the test process) merges the pages
of a worker process, which does the I/O.
"""

from __future__ import annotations

import pytest

from tests.helpers import Worker, wait_for
from tests.integration.conftest import FAST

NPAGES = 64

# Two copies of 32 random pages: they merge with each other.
WORKER = r"""
import errno, os, socket
import numpy as np
from shmdedup import MERGEABLE, PAGE_SIZE as P, Region, _native

half = np.random.default_rng(9).integers(0, 256, (NPAGES // 2, P), dtype=np.uint8)
expected = np.concatenate((half, half))
r = Region(NPAGES * P)
a = r.ndarray(np.uint8, (NPAGES, P))
a[:] = expected
r.advise(MERGEABLE)

def state(page):
    return int(np.frombuffer(r.states(), np.uint8)[page])

def pair(family):
    if family == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return tx, rx
"""


def merged(w: Worker) -> None:
    """Wait until every page of the worker is merged (its own count: other
    processes may share the coordinator)."""
    wait_for(lambda: w.call("result = r.merged_pages()") == NPAGES, 60, "the two halves to merge")


@pytest.mark.parametrize("family", ["unix", "udp"])
def test_datagram_into_merged_page_efault_drops_it_region_recv_into_delivers(coordinator, family: str) -> None:
    coordinator(**FAST)
    w = Worker(setup=f"NPAGES = {NPAGES}\n" + WORKER)
    merged(w)
    assert w.call("result = r.merged_pages()") == NPAGES
    out = w.call("""
        tx, rx = pair(family)
        res = {"merged_before": state(5) == _native.MERGED}
        tx.send(b"first datagram")
        m = memoryview(r)
        try:
            rx.recv_into(m[5 * P + 100:5 * P + 200])
            res["plain"] = "received"
        except OSError as e:
            res["plain"] = errno.errorcode[e.errno]
        m.release()
        # The page is untouched and still merged...
        res["page_after_efault"] = (state(5) == _native.MERGED, bool(np.array_equal(a, expected)))
        # ... and the datagram is gone: nothing left to read.
        rx.setblocking(False)
        try:
            res["left_in_queue"] = rx.recv(100)
        except BlockingIOError:
            res["left_in_queue"] = None
        rx.setblocking(True)
        # Region.recv_into breaks the page first: the next one arrives.
        tx.send(b"second datagram")
        res["helper"] = r.recv_into(rx, 5 * P + 100, 100)
        expected[5, 100:115] = np.frombuffer(b"second datagram", np.uint8)
        res["page_after_helper"] = (state(5) == _native.PRIVATE, bool(np.array_equal(a, expected)))
        # prepare_write, then a plain recv_into works too (nothing merges
        # here in between: the twin page 41 is private since its pair broke).
        r.prepare_write(9 * P, 10)
        tx.send(b"third")
        m = memoryview(r)
        res["after_prepare"] = rx.recv_into(m[9 * P:9 * P + 10])
        m.release()
        expected[9, :5] = np.frombuffer(b"third", np.uint8)
        res["intact"] = bool(np.array_equal(a, expected))
        tx.close(); rx.close()
        result = res
    """, family=family)
    assert out["merged_before"]
    assert out["plain"] == "EFAULT"
    assert out["page_after_efault"] == (True, True)
    assert out["left_in_queue"] is None, "the datagram should have been dropped"
    assert out["helper"] == len(b"second datagram")
    assert out["page_after_helper"] == (True, True)
    assert out["after_prepare"] == 5 and out["intact"]
    assert w.close() == 0


def test_pinned_keeps_pages_from_merging_until_the_block_ends(coordinator) -> None:
    c = coordinator(**FAST)
    w = Worker(setup=f"NPAGES = {NPAGES}\n" + WORKER)
    merged(w)
    w.call("ctx = r.pinned(3 * P, 4 * P); ctx.__enter__()")
    c.wait_full_scans(3)                 # the coordinator would merge them back at once
    assert w.call("result = [state(p) for p in range(2, 8)]") == [2, 0, 0, 0, 0, 2]
    w.call("ctx.__exit__(None, None, None)")
    merged(w)
    assert w.call("result = (r.merged_pages(), bool(np.array_equal(a, expected)))") == (NPAGES, True)
    assert w.close() == 0


# Receives datagrams into a page whose twin keeps it merging: every call of
# Region.recv_into races the coordinator, which merges the page back as soon
# as it holds its old bytes again (each call waits until it has).  The window between the break and the
# receive is widened to 5 ms (a slow break), so that the coordinator has time
# to merge the page in it: unless pinned() keeps it from doing so.
RACE = """
import time
break_range = r.break_range
def slow_break(first, n):
    broken = break_range(first, n)
    time.sleep(0.005)
    return broken
r.break_range = slow_break
tx, rx = pair("unix")
calls = lost = merged_first = 0
for i in range(n):
    merged_first += state(1) == _native.MERGED
    payload = i.to_bytes(4, "little") * 16
    tx.send(payload)
    try:
        if r.recv_into(rx, P + 100, 64) != 64 or bytes(a[1, 100:164]) != payload:
            lost += 1
    except OSError:
        lost += 1                          # EFAULT: merged between break and recv
    calls += 1
    a[1, 100:164] = expected[1, 100:164]   # its old bytes: it merges again
    deadline = time.monotonic() + 20       # and every call starts on a merged page
    while state(1) != _native.MERGED and time.monotonic() < deadline:
        time.sleep(0.0005)
tx.close(); rx.close()
del r.break_range
result = (calls, lost, merged_first)
"""


def test_region_recv_into_loses_no_datagram_while_the_page_keeps_merging(coordinator) -> None:
    coordinator(pages_to_scan=1000, sleep_millisecs=0)
    w = Worker(setup=f"NPAGES = {NPAGES}\n" + WORKER)
    merged(w)
    calls, lost, merged_first = w.call(RACE, n=500, timeout=120)
    assert calls == 500 and lost == 0
    assert merged_first == 500, merged_first  # the page really was merged before every call
    assert w.close() == 0
