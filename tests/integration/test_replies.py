"""One reply per client request, in order, on a long-lived connection.

A ``Client`` sends a request and takes the next reply as its answer, so a
request answered twice (or never) shifts every later answer by one.  run=2
and ``wait`` are answered late (when the unmerge ends, when the scans end);
the coordinator holds the connection meanwhile, so what the client sent after
them is answered after them.  These tests send requests from one thread and
read replies from another (pipelined: never waiting for a reply before the
next request), against a coordinator with a worker whose pages merge.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import shmdedup
from shmdedup import protocol
from tests.integration.conftest import FAST, counts, merged_counts, wait_stats


def test_run2_with_nothing_merged_is_answered_once(coordinator):
    """Through a Client and through Coordinator.set: the next call gets its
    own answer, not a second answer to the set."""
    c = coordinator()
    with shmdedup.Client(c.socket_path) as cl:
        cl.set("run", 2)
        s = cl.stats()
        assert s["run"] == 2 and "full_scans" in s, s
        cl.set("run", 1)
        assert cl.stats()["run"] == 1
        cl.set("run", 2)
        cl.set("run", 2)            # already 2: answered at once
        assert cl.stats()["run"] == 2
    c.set("run", 1)
    c.set("run", 2)
    s = c.stats()
    assert s["run"] == 2 and "pages_shared" in s, s
    c.set("pages_to_scan", 123)
    assert c.stats()["pages_to_scan"] == 123


def _raw_client(path: str) -> protocol.Connection:
    conn = protocol.connect(path, timeout=10)
    conn.send({"t": "hello", "v": protocol.PROTOCOL_VERSION, "role": "client", "pid": os.getpid()})
    got = conn.recv(timeout=30)
    assert got is not None and got[0]["t"] == "welcome"
    return conn


def _pipeline(conn: protocol.Connection, requests: list[dict], timeout: float = 120) -> list[dict]:
    """Send every request from a thread, without waiting; read the replies
    here.  Returns them in arrival order (exactly len(requests) of them, or
    the test fails: a missing one times out, an extra one shows at the end)."""
    sent = threading.Event()
    errors: list[BaseException] = []

    def send_all() -> None:
        try:
            for r in requests:
                conn.send(r)
        except BaseException as e:  # noqa: BLE001  reported by the reader
            errors.append(e)
        finally:
            sent.set()

    t = threading.Thread(target=send_all, daemon=True)
    t.start()
    replies = []
    for i in range(len(requests)):
        got = conn.recv(timeout=timeout)
        assert got is not None, f"connection closed after {i} replies"
        msg, fds = got
        assert not fds
        assert msg["t"] == "reply", msg
        replies.append(msg)
    t.join(timeout)
    assert sent.is_set() and not errors, errors
    # Nothing more: no request was answered twice.
    conn.send({"t": "stats"})
    got = conn.recv(timeout=timeout)
    assert got is not None and isinstance(got[0]["data"], dict) and "full_scans" in got[0]["data"], \
        f"an extra reply: {got}"
    return replies


def _check(req: dict, rep: dict, state: dict[str, Any]) -> None:
    """The reply answers this request (and the controls set before it)."""
    t = req["t"]
    if t == "stats":
        assert rep["ok"], rep
        d = rep["data"]
        assert isinstance(d, dict) and "full_scans" in d, rep
        for k, v in state.items():
            assert d[k] == v, (k, d[k], v, rep)
    elif t == "set" and req["name"] == "no_such_control":
        assert not rep["ok"] and "no_such_control" in rep["error"], rep
    elif t == "set":
        assert rep["ok"] and rep["data"] == {req["name"]: req["value"]}, (req, rep)
        state[req["name"]] = req["value"]
    elif t == "wait":
        assert rep["ok"] and isinstance(rep["data"], int) and rep["data"] >= req["full_scans"], (req, rep)
    else:
        raise AssertionError(t)


def test_pipelined_requests_get_one_reply_each_in_order(coordinator, spawn_workers):
    """Rounds of stats / set / run=2 (with pages merged, and with none) /
    wait / a bad control, sent back to back on one connection: every reply
    answers its own request.  A stats after a set sees the value just set, a
    set run=1 right after run=2 is not refused as 'unmerge in progress' (it
    is read only once the unmerge has ended), and the connection stays in
    step for the next round."""
    npages = 1024
    c = coordinator(**FAST)
    workers = spawn_workers(2, npages, shared_seed=701)
    want = merged_counts(npages, 2)
    conn = _raw_client(c.socket_path)
    try:
        state: dict[str, Any] = {}
        for rnd in range(4):
            if rnd % 2 == 0:        # something merged: run=2 is answered late
                wait_stats(c, lambda s: counts(s) == want, 60, f"convergence to {want}")
            else:                   # nothing merged: run=2 is done at once
                c.set("run", 2)
                c.set("run", 0)
                state["run"] = 0
            reqs: list[dict] = []
            for i in range(20):
                reqs += [{"t": "stats"},
                         {"t": "set", "name": "sleep_millisecs", "value": i % 3},
                         {"t": "stats"}]
            reqs += [{"t": "set", "name": "run", "value": 2},
                     {"t": "stats"},
                     {"t": "set", "name": "run", "value": 2},
                     {"t": "set", "name": "no_such_control", "value": 1},
                     {"t": "set", "name": "run", "value": 1},
                     {"t": "stats"},
                     {"t": "wait", "full_scans": 1, "timeout": 60},
                     {"t": "set", "name": "pages_to_scan", "value": 5000 + rnd},
                     {"t": "wait", "full_scans": 0, "timeout": 60},
                     {"t": "stats"}]
            reqs += [{"t": "stats"}] * 30
            replies = _pipeline(conn, reqs)
            for req, rep in zip(reqs, replies):
                _check(req, rep, state)
            # run=2 was done when its reply came: its stats saw nothing merged.
            i = reqs.index({"t": "set", "name": "run", "value": 2})
            after = replies[i + 1]["data"]
            assert after["run"] == 2 and counts(after) == {"pages_shared": 0, "pages_sharing": 0}
            c.set("pages_to_scan", FAST["pages_to_scan"])
            state["pages_to_scan"] = FAST["pages_to_scan"]
    finally:
        conn.close()
    for w in workers:
        w.assert_intact()
