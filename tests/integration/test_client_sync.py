"""A long-lived ``Client`` stays in step with its coordinator: each request
reads its own reply, after a request interrupted by Ctrl-C, with several
threads calling at once, and in a forked child (after a timeout:
``test_coordinator.py::test_client_after_a_timeout_never_takes_a_late_reply_for_the_next_answer``).  And
Ctrl-C in a worker's ``merge_now`` leaves nothing behind.  Real processes: a
coordinator process and a script that uses one client throughout."""

from __future__ import annotations

import json

from tests.helpers import child_env, run_python

# A script holding one client: it interrupts its own wait for full scans
# with a real SIGINT (a timer thread, 0.3 s after the request went out, the
# scan stopped so no reply is due for 30 s), then uses the same client.
INTERRUPTED = r"""
import json, os, signal, sys, threading, time
import shmdedup
c = shmdedup.Client(sys.argv[1], timeout=10)
c.set("run", 0)
send = c._conn.send
def send_then_ctrl_c(msg, fds=(), **kw):
    send(msg, fds, **kw)
    if msg["t"] == "wait":
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
c._conn.send = send_then_ctrl_c
try:
    c.wait_full_scans(1, timeout=30)
    print("not interrupted", file=sys.stderr)
    sys.exit(1)
except KeyboardInterrupt:
    pass
t = time.monotonic()
s = c.stats()                       # at once: not after the wait's 30 s
took = time.monotonic() - t
c.set("pages_to_scan", 321)
c.set("run", 1)
print(json.dumps({"took": took, "stats_keys": sorted(s), "run": s["run"],
                  "after": {k: c.stats()[k] for k in ("pages_to_scan", "run")}}))
c.close()
"""


def test_a_request_interrupted_by_ctrl_c_leaves_the_client_in_step(coordinator) -> None:
    c = coordinator(process=True)
    r = run_python(INTERRUPTED, args=(c.socket_path,), timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "full_scans" in out["stats_keys"] and out["run"] == 0, out
    assert out["took"] < 9, out            # its own reply, not the wait's at 30 s (or a timeout)
    assert out["after"] == {"pages_to_scan": 321, "run": 1}, out


THREADS = r"""
import json, sys, threading
import shmdedup
c = shmdedup.Client(sys.argv[1], timeout=30)
bad = []
def reader():
    for _ in range(500):
        s = c.stats()
        if not isinstance(s, dict) or "full_scans" not in s:
            bad.append(repr(s)[:80])
def writer(v):
    for _ in range(500):
        c.set("pages_to_scan", v)
ts = [threading.Thread(target=reader), threading.Thread(target=reader),
      threading.Thread(target=writer, args=(100,)), threading.Thread(target=writer, args=(200,))]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps({"bad": bad[:5], "pages_to_scan": c.stats()["pages_to_scan"]}))
"""


def test_threads_sharing_one_client_each_read_their_own_replies(coordinator) -> None:
    c = coordinator(process=True)
    r = run_python(THREADS, args=(c.socket_path,), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bad"] == [] and out["pages_to_scan"] in (100, 200), out


FORKED = r"""
import json, os, sys
import shmdedup
c = shmdedup.Client(sys.argv[1], timeout=30)
c.stats()
r, w = os.pipe()
pid = os.fork()
bad = []
for i in range(500):
    if pid == 0:                    # the child sets, the parent reads
        c.set("pages_to_scan", 100 + i % 7)
        continue
    s = c.stats()
    if not isinstance(s, dict) or "full_scans" not in s:
        bad.append(repr(s)[:80])
if pid == 0:
    os.write(w, json.dumps(bad).encode())
    os._exit(0)
os.close(w)
child_bad = json.loads(os.read(r, 1 << 16) or b'["no answer from the child"]')
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent": bad[:5], "child": child_bad[:5], "status": status}))
"""


def test_a_forked_child_using_its_parents_client_gets_its_own_connection(coordinator) -> None:
    """A client made before fork (a module-level client in a fork pool):
    parent and child call at the same time, each reading its own replies
    (the parent's stats() never returns the reply to the child's set)."""
    c = coordinator(process=True)
    r = run_python(FORKED, args=(c.socket_path,), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"parent": [], "child": [], "status": 0}, r.stdout


MERGE_NOW_CTRL_C = r"""
import json, os, signal, sys, threading
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P
from shmdedup.worker import agent
cpid, n = int(sys.argv[1]), 4096
small = shmdedup.Region(P)
small.ndarray(np.uint8, (P,))[:] = 120
small.merge_now()                              # connected and welcomed
r = shmdedup.Region(n * P)
a = r.ndarray(np.uint8, (n, P))
a[:] = np.random.default_rng(5).integers(0, 256, (n // 2, P), dtype=np.uint8).repeat(2, axis=0)
want = a.copy()
os.kill(cpid, signal.SIGSTOP)                  # the reply cannot come: the wait is interrupted
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    r.merge_now()
    sys.exit("not interrupted")
except KeyboardInterrupt:
    pass
finally:
    os.kill(cpid, signal.SIGCONT)
left = len(agent._agent._inline) if agent._agent is not None else -1
r.merge_now()
print(json.dumps({"left": left, "intact": bool((a == want).all()), "merged": r.merged_pages()}))
"""


def test_ctrl_c_in_merge_now_loses_nothing_and_the_next_call_merges(coordinator) -> None:
    """Ctrl-C while merge_now waits for the coordinator's answer: the call
    raises KeyboardInterrupt, forgets its wait, and the bytes stay; the next
    merge_now merges the range; the script ends cleanly."""
    c = coordinator(process=True)
    r = run_python(MERGE_NOW_CTRL_C, args=(str(c._proc.pid),),
                   env=child_env({"SHMDEDUP_SOCKET": c.socket_path}), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["left"] == 0 and out["intact"], out
    assert out["merged"] == 4096, out


def test_a_long_lived_client_outlives_a_coordinator_restart(coordinator, socket_dir) -> None:
    """A client kept across a restart of its coordinator (killed, another
    started at the same path, no request meanwhile): the first request after
    it is answered by the new one (its send found the old connection dead,
    nothing was delivered, so it is sent again on a new one); with no
    coordinator left, it raises CoordinatorUnavailableError, never a bare
    BrokenPipeError."""
    import os
    import shmdedup
    path = os.path.join(socket_dir, "c.sock")
    first = coordinator(socket_path=path, process=True)
    c = shmdedup.Client(path, timeout=30)
    try:
        assert c.stats()["coordinator_pid"] == first._proc.pid
        first.stop()
        second = coordinator(socket_path=path, process=True)
        assert c.stats()["coordinator_pid"] == second._proc.pid
        second.stop()
        try:
            c.stats()
            raise AssertionError("no coordinator, and stats() answered")
        except shmdedup.CoordinatorUnavailableError:
            pass
    finally:
        c.close()
