"""The scan attacks, as code for ``loop_harness.start_attacker`` (a child that
drops to another uid), and a monitor of the coordinator's event loop.

* ``TRUNCATE_ATTACK``: a registered, advised object truncated to 0, grown back
  and written, as fast as it goes: every seek of the scan may race it (with
  ``now``: merge_now calls too, whose copies race it).
* ``SPARSE_ATTACK``: connections that each register 2**26 pages (the default
  ``max_pages_per_worker``) of one sparse object, free for the attacker;
  advised whole (``advice="on"``), not at all (``"off"``), flipped off and
  on over the whole range (``"flip"``), or asked to be merged now, whole
  (``"now"``: ``merge_now`` over 2**26 pages of holes, again and again).
* ``SPARSE_DATA_ATTACK``: such a region with one page of data every ``step``
  pages, ``count`` of them: data the attacker pays for (a page of tmpfs
  each), spread to make the scanner keep a block for each.
* ``TINY_ATTACK``: ``connections`` x ``regions`` one-page regions of unique
  data, each its own object.

Each drains what the coordinator sends it (a slow reader is another attack,
tests/hostile/test_loop_attacks.py) and counts refusals in ``out``.
:class:`Monitor` times a client's ``stats`` round trip every 0.2 s: the loop
answers it between batches, so its latency bounds how long any message (a
merge reply, a ``merge_now``) waits for the loop.
"""

from __future__ import annotations

import threading
import time

from shmdedup.tools.client import Client
from tests.hostile.loop_harness import DRAIN

HUGE = 2**26

_REGISTER = DRAIN + """
def register(s, rid, npages, backing, meta, advise=True):
    send(s, {"t": "register", "rid": rid, "npages": npages}, [backing, meta])
    if advise:
        send(s, {"t": "advise", "rid": rid, "start": 0, "npages": npages, "mergeable": True})

def worker():
    s = connect()
    assert hello(s)
    return s

out.update(refused=0)
"""

TRUNCATE_ATTACK = _REGISTER + """
n = 64
s = worker()
b, m = memfd(n * PAGE), memfd(PAGE)
os.pwrite(b, os.urandom(n * PAGE), 0)
register(s, 1, n, b, m)
data = os.urandom(4 * PAGE)
out.update(cycles=0, reconnects=0, calls=0, answered=0)
# ARGS["now"]: also merge_now the whole object every 64 cycles, with
# checksums that name nothing (so the coordinator copies every page into new
# stable slots while the object is cut and grown under it), and answer every
# merge with "nothing merged".
NOW = bool(ARGS.get("now"))
WRONG = (1).to_bytes(8, "little") * n

while not STOP.is_set():
    os.ftruncate(b, 0)
    os.ftruncate(b, n * PAGE)
    os.pwrite(b, data, 0)
    out["cycles"] += 1
    if NOW and out["cycles"] % 64 == 0:
        send(s, {"t": "merge_now", "req": out["cycles"], "rid": 1, "start": 0, "npages": n,
                 "hashes": WRONG})
        out["calls"] += 1
    if out["cycles"] % (64 if NOW else 512) == 0 and not drain(s, answer=NOW):
        # A truncation raced the registration (the object was too short when
        # the coordinator looked: a protocol error, and the connection closed).
        s.close()
        s = worker()
        register(s, 1, n, b, m)
        out["reconnects"] += 1
"""

SPARSE_ATTACK = _REGISTER + f"""
HUGE = {HUGE}
b, m = memfd(HUGE * PAGE), memfd(HUGE)
conns = []
for _ in range(ARGS["connections"]):
    s = worker()
    register(s, 1, HUGE, b, m, advise=ARGS["advice"] != "off")
    conns.append(s)
out.update(flips=0)
state = False
while not STOP.is_set():
    for s in conns:
        drain(s)
    if ARGS["advice"] == "flip":
        for s in conns:
            send(s, {{"t": "advise", "rid": 1, "start": 0, "npages": HUGE, "mergeable": state}})
        state = not state
        out["flips"] += 1
    elif ARGS["advice"] == "now":
        for s in conns:
            out["flips"] += 1
            send(s, {{"t": "merge_now", "req": out["flips"], "rid": 1, "start": 0, "npages": HUGE,
                      "hashes": b""}})
    STOP.wait(0.02)
"""

SPARSE_DATA_ATTACK = _REGISTER + f"""
HUGE = {HUGE}
b, m = memfd(HUGE * PAGE), memfd(HUGE)
for i in range(ARGS["count"]):
    os.pwrite(b, os.urandom(64), i * ARGS["step"] * PAGE)
s = worker()
register(s, 1, HUGE, b, m)
out.update(closed=False)
while not STOP.is_set():
    if not drain(s):
        out["closed"] = True
        break
    STOP.wait(0.05)
STOP.wait()
"""

TINY_ATTACK = _REGISTER + """
conns = []
for c in range(ARGS["connections"]):
    s = worker()
    for rid in range(ARGS["regions"]):
        b, m = memfd(PAGE), memfd(PAGE)
        os.pwrite(b, os.urandom(PAGE), 0)
        register(s, rid, 1, b, m)
        os.close(b)
        os.close(m)
        if rid % 256 == 0:
            drain(s)
    conns.append(s)
while not STOP.is_set():
    for s in conns:
        drain(s)
    STOP.wait(0.05)
"""


class Monitor:
    """A client's stats round trip every 0.2 s (five times what ``shmdedup
    top`` and the metrics server ask), in a thread."""

    def __init__(self, path: str) -> None:
        self.client = Client(path, timeout=60)
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            t0 = time.monotonic()
            try:
                self.client.stats()
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
                return
            self.latencies.append(time.monotonic() - t0)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(60)
        self.client.close()
        return self.latencies
