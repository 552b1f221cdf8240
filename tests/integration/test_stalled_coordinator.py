"""A coordinator that stops answering (SIGSTOP here: hung, overloaded, paused
in a debugger) must not hold up the program using the library.

* advise / close from the program's thread: a send that finds no room (the
  coordinator's queue and our buffer full) waits ``agent.SEND_TIMEOUT`` at
  most, then the connection is dropped and the calls go on unmerged; used to
  block until the coordinator read again.
* merge_now: once one call got no answer within ``MERGE_NOW_TIMEOUT``, the
  calls after it return 0 at once for ``STALL_WINDOW`` (a streaming loader
  makes one call per 8 MiB chunk: each used to wait the whole timeout again,
  two hours for 1 GiB).
* Once the coordinator runs again, the agent reconnects and the regions merge.

A real coordinator process and a plain script; the timeouts are shortened in
the script so that the test takes seconds.
"""

from __future__ import annotations

import json
import os
import signal

from tests.helpers import run_python

STALLED = r"""
import json, os, signal, sys, time
import numpy as np
import shmdedup
from shmdedup.worker import agent
agent.SEND_TIMEOUT = 0.5
agent.MERGE_NOW_TIMEOUT = 1.0
path, coord = sys.argv[1], int(sys.argv[2])
shmdedup.set_socket(path)
P = shmdedup.PAGE_SIZE

def wait(cond):
    t = time.monotonic()
    while not cond() and time.monotonic() - t < 30:
        time.sleep(0.02)
    return cond()

data = shmdedup.Region(16 * P)
data.ndarray()[:] = 7
assert data.merge_now(0, P) == 1            # connected: it becomes a stable page
out = {}
os.kill(coord, signal.SIGSTOP)
try:
    # merge_now: the first waits for its answer, the rest return at once
    calls = []
    for k in range(1, 7):
        t = time.monotonic()
        got = data.merge_now(k * P, P)
        calls.append((got, round(time.monotonic() - t, 3)))
    out["calls"] = calls
finally:
    os.kill(coord, signal.SIGCONT)
data.advise(shmdedup.MERGEABLE)
out["merged_after_calls"] = wait(lambda: data.merged_pages() == 16) and data.merged_pages()
os.kill(coord, signal.SIGSTOP)
try:
    # advise / close in a loop: thousands of messages the coordinator never reads
    t = time.monotonic()
    for i in range(3000):
        r = shmdedup.Region(P)
        r.ndarray()[:] = i % 251
        r.advise(shmdedup.MERGEABLE)
        r.close()
    out["churn_s"] = time.monotonic() - t
finally:
    os.kill(coord, signal.SIGCONT)
late = shmdedup.Region(4 * P)
late.ndarray()[:] = 7
late.advise(shmdedup.MERGEABLE)
out["late_merged"] = wait(lambda: late.merged_pages() == 4) and late.merged_pages()
out["bytes_ok"] = bool((data.ndarray() == 7).all() and (late.ndarray() == 7).all())
print(json.dumps(out))
"""


def test_a_stopped_coordinator_holds_up_nothing(coordinator) -> None:
    c = coordinator(process=True)
    pid = c._proc.pid
    try:
        r = run_python(STALLED, args=(c.socket_path, str(pid)), timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.returncode == 0 and not r.timed_out, (r.returncode, r.stderr[-3000:])
    out = json.loads(r.stdout)
    first, rest = out["calls"][0], out["calls"][1:]
    assert first[0] == 0 and 0.9 <= first[1] < 30, out   # waited for its answer, got none
    assert all(got == 0 and took < 0.5 for got, took in rest), out
    assert out["merged_after_calls"] == 16, out           # reconnected once it ran again
    assert out["churn_s"] < 10, out                      # a bounded send, then none
    assert out["late_merged"] == 4 and out["bytes_ok"], out
