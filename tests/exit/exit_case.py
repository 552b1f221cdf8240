"""One program of the exit matrix (test_exit_matrix.py): it gets into
position, says so, and ends the way it is told.

    python exit_case.py WAY VIEWS PHASE COORDINATOR

It allocates a region of NPAGES pages (DISTINCT contents, each repeated),
advises it mergeable and, with a coordinator, waits until every page is
merged.  PHASE then puts an operation in flight and holds it there with a
test fault point (``_native._test_arm_fault(point, 0, True)``):

* ``idle``: nothing in flight;
* ``register``: the agent is held at ``agent_registered``, holding its own
  lock, as a daemon thread frozen by finalization holds what it held (the
  hang of issue 10); the last act (below) does not advise its region, since
  that waits for the lock (the agent normally holds it for microseconds);
* ``merge``: the agent holds a merge batch at ``merge_protected`` (pages
  write-protected and MERGING, the region's op lock held, the GIL released);
* ``break``: a daemon thread holds ``advise(UNMERGEABLE)`` at
  ``break_copied`` (pages BREAKING, the op lock held, the GIL released).

VIEWS ``alive`` keeps a memoryview and an array over the region in module
globals to the end (as the script of issue 10 does); ``released`` releases
them first, leaving the region itself to finalization.  It prints
``ready <pid> [socket]`` (the pid that holds the region, and the embedded
coordinator's socket) and waits for a line on
stdin (``go``), or for the signal the test sends.  Its last act then is the
script of issue 10 (a fresh region, written and advised, its views kept or
released as VIEWS says), so that the agent is busy at the instant the
program ends; then it ends by WAY:

``end`` falls off the end; ``exit`` calls sys.exit(3); ``thread_exit`` ends
main at once while a non-daemon thread waits for the go and calls
sys.exit(5) (the status stays 0); ``raise`` raises an uncaught exception;
``sigterm``/``sigint`` wait for the signal with the default handlers;
``os_exit`` calls os._exit(4); ``mp_fork``/``mp_spawn`` do all of the above
in a multiprocessing child whose target returns on the go (the parent exits
0 if the child exited 0 within CHILD_TIMEOUT).

COORDINATOR is ``absent``, ``running`` or ``killed`` (a process the test
starts, and kills after ``ready`` for ``killed``; ``$SHMDEDUP_SOCKET`` names
it) or ``embedded`` (started here, in a thread, and never stopped).
Anything unexpected exits 90 with a line on stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time

import numpy as np

import shmdedup
from shmdedup import _native

P = shmdedup.PAGE_SIZE
NPAGES = 64
DISTINCT = 4
WAIT = 60.0          # s: getting into position on a loaded 2-core box
CHILD_TIMEOUT = 30.0
HOLD = {"register": "agent_registered", "merge": "merge_protected", "break": "break_copied"}
# Kept to the end: the region and, with views alive, its views.
KEEP: list = []


def fail(why: str) -> None:
    print(f"exit_case: {why}", file=sys.stderr, flush=True)
    os._exit(90)


def wait_until(ok, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not ok():
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def held() -> bool:
    return _native._test_fault_held() > 0


def get_into_position(views: str, phase: str, coordinator: str) -> None:
    """Allocate, advise, merge, hold; KEEP what must live to the end."""
    if coordinator == "embedded":
        KEEP.append(shmdedup.Coordinator(sleep_millisecs=0, pages_to_scan=NPAGES).start())
    r = shmdedup.Region(NPAGES * P)
    mv = memoryview(r)
    a = r.ndarray(np.uint8).reshape(NPAGES, P)
    for i in range(NPAGES):
        a[i] = i % DISTINCT + 1
    if phase in ("register", "merge"):
        _native._test_arm_fault(HOLD[phase], 0, True)
    r.advise(shmdedup.MERGEABLE)
    if phase in ("register", "merge"):
        wait_until(held, f"the agent to be held ({phase})")
    elif coordinator != "absent":
        wait_until(lambda: r.merged_pages() == NPAGES, "every page to merge")
    if phase == "break":
        _native._test_arm_fault(HOLD[phase], 0, True)
        threading.Thread(target=r.advise, args=(shmdedup.UNMERGEABLE,), daemon=True).start()
        wait_until(held, "a break to be held")
    if views == "alive":
        KEEP.extend([r, mv, a])
    else:
        del a
        mv.release()
        KEEP.append(r)
    where = KEEP[0].socket_path if coordinator == "embedded" else ""
    print(f"ready {os.getpid()} {where}", flush=True)


def last_act(views: str, phase: str) -> None:
    """The script of issue 10, right before the end."""
    r = shmdedup.Region(1 << 20)
    mv = memoryview(r)
    a = r.ndarray(np.uint8, (1 << 20,))
    a[:] = 7
    if phase != "register":
        r.advise(shmdedup.MERGEABLE)
    if views == "alive":
        KEEP.extend([r, mv, a])
    else:
        del a
        mv.release()
        KEEP.append(r)


def child(views: str, phase: str, coordinator: str, go) -> None:
    get_into_position(views, phase, coordinator)
    if not go.poll(WAIT):
        fail("no go")
    last_act(views, phase)


def wait_for_go() -> None:
    if sys.stdin.readline().strip() != "go":
        fail("expected go on stdin")


def main(way: str, views: str, phase: str, coordinator: str) -> None:
    if way.startswith("mp_"):
        ctx = multiprocessing.get_context(way[3:])
        # A pipe, not an Event: a spawn context's semaphores have names in
        # /dev/shm, left behind if the test has to kill a hung case.
        go, tell = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=(views, phase, coordinator, go))
        proc.start()
        wait_for_go()
        tell.send("go")
        proc.join(CHILD_TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            fail(f"the {way} child did not exit within {CHILD_TIMEOUT} s")
        sys.exit(0 if proc.exitcode == 0 else 91)
    get_into_position(views, phase, coordinator)
    if way == "thread_exit":
        def last() -> None:
            wait_for_go()
            last_act(views, phase)
            sys.exit(5)
        threading.Thread(target=last).start()
        return
    if way == "sigterm":
        time.sleep(WAIT)  # the test sends the signal
        fail(f"no {way}")
    if way == "sigint":
        try:
            time.sleep(WAIT)  # the test sends the signal: KeyboardInterrupt
        finally:
            last_act(views, phase)
        fail(f"no {way}")
    wait_for_go()
    last_act(views, phase)
    if way == "exit":
        sys.exit(3)
    if way == "raise":
        raise RuntimeError("the end of an exit case")
    if way == "os_exit":
        os._exit(4)
    if way != "end":
        fail(f"unknown way {way!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
