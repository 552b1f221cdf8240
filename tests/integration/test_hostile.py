"""Hostile peers against a live coordinator (DESIGN "Security model").

Every test runs a real coordinator (tests/integration/hostile.py) with real
worker processes merging beside the hostile peer, and checks the three
promises: the hostile connection is closed with a logged reason, the
coordinator keeps serving (the real workers keep merging: their pages merge
again after they rewrite them), and nothing else changes (their bytes, their
counters).  The coverage-guided fuzzer (tests/fuzz) runs under the ``stress``
marker at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shmdedup import protocol
from shmdedup.errors import ProtocolError
from shmdedup.coordinator.quotas import CLIENT_RESERVE
from tests.helpers import REPO_ROOT, Worker, child_env, no_shm_leftovers, reaper, wait_for  # noqa: F401
from tests.integration.hostile import (
    PAGE,
    Domain,
    RawPeer,
    memfd,
    register_raw,
    rewrite,
    spawn_worker,
)

NPAGES = 32


@pytest.fixture
def domain(no_shm_leftovers: None) -> Iterator[Domain]:
    d = Domain()
    yield d
    d.close()


@pytest.fixture
def bystanders(domain: Domain) -> Iterator[list[tuple[Worker, str]]]:
    """Two real workers, merged, whose bytes and counters must not change."""
    ws = [spawn_worker(domain.path, NPAGES, seed) for seed in (1, 2)]
    for w, _ in ws:
        domain.wait_merging(w.pid, NPAGES)
    yield ws
    for w, _ in ws:
        w.close()


def check_bystanders(domain: Domain, ws: list[tuple[Worker, str]]) -> None:
    """Unchanged bytes and counters, and still merging: rewrite, merge again."""
    assert domain.alive()
    for w, sha in ws:
        assert w.call("result = digest()") == sha
        assert domain.wait_merging(w.pid, NPAGES)["regions"] == 1
    w, _ = ws[0]
    scanned = domain.stats()["pages_scanned"]
    new_sha = rewrite(w, seed=99)  # every page written: broken (the worker's state bytes)
    wait_for(lambda: w.call("result = region.merged_pages()") == NPAGES, 30,
             what="the rewritten pages to merge again")
    domain.wait_merging(w.pid, NPAGES)
    assert domain.stats()["pages_scanned"] > scanned
    assert w.call("result = digest()") == new_sha
    ws[0] = (w, new_sha)


def closes(domain: Domain, peer: RawPeer, reason: str) -> None:
    assert peer.wait_closed(), "the coordinator kept a hostile connection open"
    domain.wait_logged(reason)


def hello_msg(role: str = "worker") -> dict:
    return {"t": "hello", "v": protocol.PROTOCOL_VERSION, "role": role, "pid": os.getpid()}


# ---- property-based: anything malformed closes the connection ---------------------

_VALID = [
    hello_msg(), hello_msg("client"),
    {"t": "register", "rid": 1, "npages": 4},
    {"t": "advise", "rid": 1, "start": 0, "npages": 4, "mergeable": True},
    {"t": "unregister", "rid": 1},
    {"t": "merged", "req": 1, "result": b"\x01\x01"},
    {"t": "unmerged", "req": 1, "err": 0, "msg": ""},
    {"t": "stats"}, {"t": "set", "name": "run", "value": 1},
    {"t": "wait", "full_scans": 1, "timeout": 1},
    {"t": "welcome", "v": 1, "page_size": 4096},
    {"t": "merge", "req": 1, "items": protocol.items_to_bytes([(1, 0, 1, 0)])},
    {"t": "unmerge", "req": 1, "items": protocol.items_to_bytes([(1, 0, 1, 0)])},
    {"t": "merge_now", "req": 1, "rid": 1, "start": 0, "npages": 2, "hashes": b"\x01" * 16},
    {"t": "merged_now", "req": 1, "err": 0, "msg": ""},
    {"t": "reply", "ok": True, "data": None, "error": ""},
]
_EDGE_INTS = [-(2**63), -(2**31) - 1, -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1]
_values = st.one_of(
    st.sampled_from(_EDGE_INTS), st.integers(-(2**63), 2**64 - 1), st.booleans(), st.none(),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=64),
    st.lists(st.integers(-9, 2**40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-9, 2**40), max_size=3),
    st.binary(min_size=protocol.MAX_MESSAGE // 2, max_size=protocol.MAX_MESSAGE // 2),
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid message with one field changed, dropped or added, maybe then
    truncated or with a byte flipped; and a fd count."""
    msg = dict(draw(st.sampled_from(_VALID)))
    op = draw(st.sampled_from(["change", "drop", "add", "type", "none"]))
    keys = sorted(k for k in msg if k != "t")
    if op == "change" and keys:
        msg[draw(st.sampled_from(keys))] = draw(_values)
    elif op == "drop":
        del msg[draw(st.sampled_from(sorted(msg)))]
    elif op == "add":
        msg[draw(st.text(max_size=8))] = draw(_values)
    elif op == "type":
        msg["t"] = draw(st.one_of(st.text(max_size=10), _values))
    data = msgpack.packb(msg, use_bin_type=True)
    cut = draw(st.sampled_from(["whole", "truncate", "flip"]))
    if cut == "truncate" and len(data) > 1:
        data = data[:draw(st.integers(1, len(data) - 1))]
    elif cut == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return data, draw(st.integers(0, protocol.MAX_FDS))


_ALLOWED = {"client": {"stats", "set", "wait"}, "worker": set()}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(role=st.sampled_from([None, "worker", "client"]),
       raw=st.one_of(mutated(), st.tuples(st.binary(max_size=200), st.integers(0, 4))))
def _fuzz_one(domain: Domain, role: str | None, raw: tuple[bytes, int]) -> None:
    data, nfds = raw
    fds = [memfd() for _ in range(nfds)]
    try:
        assume(data and not _would_keep(role, data, nfds))
        peer = RawPeer(domain.path)
        try:
            if role is not None:
                peer.hello(role)
            before = len(domain.messages())
            peer.send_raw(data, fds)
            assert peer.wait_closed(), f"kept open after {data[:80]!r} with {nfds} fds"
            wait_for(lambda: len(domain.messages()) > before, what="a logged reason")
            assert any("closing connection" in m for m in domain.messages()[before:])
        finally:
            peer.close()
    finally:
        for fd in fds:
            os.close(fd)


def _would_keep(role: str | None, data: bytes, nfds: int) -> bool:
    fds = [memfd() for _ in range(nfds)]
    try:
        msg = protocol.decode(data, fds)
    except ProtocolError:
        return False  # decode closed the fds
    for fd in fds:
        os.close(fd)
    t = msg["t"]
    return (role is None and t == "hello") or (role is not None and t in _ALLOWED[role])


def test_fuzzed_messages_close_the_connection_and_nothing_else(domain: Domain, bystanders) -> None:
    _fuzz_one(domain)
    check_bystanders(domain, bystanders)


# ---- each hostile case by name ---------------------------------------------------

def test_message_before_hello_closes(domain: Domain, bystanders) -> None:
    backing, meta = memfd(PAGE), memfd(PAGE)
    peer = RawPeer(domain.path)
    peer.send({"t": "register", "rid": 1, "npages": 1}, [backing, meta])
    closes(domain, peer, "expected hello, got register")
    peer.close()
    os.close(backing), os.close(meta)
    check_bystanders(domain, bystanders)


@pytest.mark.parametrize("msg, fds, reason", [
    ({"t": "register", "rid": 1, "npages": 1}, 1, "register: expects 2 fds, got 1"),
    ({"t": "register", "rid": 1, "npages": 1}, 3, "register: expects 2 fds, got 3"),
    ({"t": "advise", "rid": 1, "start": 0, "npages": 1, "mergeable": True}, 1, "advise: expects 0 fds"),
    ({"t": "register", "rid": 1, "npages": 2**31}, 2, "npages must be an int in [1, 2147483647]"),
    ({"t": "register", "rid": -1, "npages": 1}, 2, "rid must be an int in [0, 2147483647]"),
    ({"t": "advise", "rid": 1, "start": -5, "npages": 1, "mergeable": True}, 0, "start must be"),
    ({"t": "advise", "rid": 1, "start": 2**31 - 1, "npages": 2, "mergeable": True}, 0,
     "start + npages must be <= 2**31"),
    ({"t": "advise", "rid": 1, "start": 0, "npages": 1, "mergeable": 1}, 0, "mergeable must be a bool"),
    ({"t": "advise", "rid": 77, "start": 0, "npages": 1, "mergeable": True}, 0,
     "region 77 is not registered by this worker"),
    ({"t": "unregister", "rid": 5}, 0, "region 5 is not registered"),
    ({"t": "merged", "req": 12345, "result": b"\x01"}, 0, "no merge request 12345 is outstanding"),
    ({"t": "unmerged", "req": 3, "err": 0, "msg": ""}, 0, "no unmerge request 3"),
    ({"t": "stats"}, 0, "a worker may not send stats"),
    ({"t": "merge", "req": 1, "items": b""}, 0, "a worker may not send merge"),
    ({"t": "hello", "v": 1, "role": "worker", "pid": 1}, 0, "a worker may not send hello"),
    ({"t": "nonsense"}, 0, "unknown message type 'nonsense'"),
    ({"t": "merged", "req": 1, "result": b"\x02"}, 0, "result bytes must each be 0 or 1"),
    ({"t": "merge_now", "req": 1, "rid": 77, "start": 0, "npages": 1, "hashes": b""}, 0,
     "region 77 is not registered by this worker"),
    ({"t": "merge_now", "req": 1, "rid": 1, "start": 0, "npages": 2, "hashes": b"\x00" * 8}, 0,
     "hashes must be empty or 8 bytes a page"),
    ({"t": "merged_now", "req": 1, "err": 0, "msg": ""}, 0, "a worker may not send merged_now"),
])
def test_bad_worker_message_closes_with_reason(domain: Domain, msg: dict, fds: int, reason: str) -> None:
    peer = RawPeer(domain.path)
    peer.hello()
    sent = [memfd(PAGE) for _ in range(fds)]
    peer.send(msg, sent)
    closes(domain, peer, reason)
    peer.close()
    for fd in sent:
        os.close(fd)
    assert domain.alive()


def test_truncated_oversized_and_garbage_frames(domain: Domain, bystanders) -> None:
    good = msgpack.packb({"t": "advise", "rid": 1, "start": 0, "npages": 1, "mergeable": True})
    cases = [
        (good[:-3], "not a msgpack message"),
        (b"\xc1", "not a msgpack message"),
        (msgpack.packb([1, 2, 3]), "message must be a map"),
        (msgpack.packb({"t": "stats", "x": b"a" * (protocol.MAX_MESSAGE + 10)}),
         f"message larger than {protocol.MAX_MESSAGE} bytes"),
        (b"\xdd\xff\xff\xff\xff", "not a msgpack message"),  # array32 claiming 4G items
        (msgpack.packb({"t": "merged", "req": 1, "result": b"\x01" * 1000}) + b"\x00",
         "not a msgpack message"),
    ]
    for data, reason in cases:
        peer = RawPeer(domain.path)
        peer.hello()
        peer.send_raw(data)
        closes(domain, peer, reason)
        peer.close()
    # fds without a message, and more fds than a message may carry
    peer = RawPeer(domain.path)
    fds = [memfd() for _ in range(protocol.MAX_FDS + 2)]
    peer.send_raw(b"\x80", fds)
    closes(domain, peer, f"more than {protocol.MAX_FDS} fds attached")
    peer.close()
    for fd in fds:
        os.close(fd)
    check_bystanders(domain, bystanders)


def test_other_workers_region_ids(domain: Domain, bystanders) -> None:
    """A peer naming a real worker's region id is closed; the real worker is not."""
    w, _ = bystanders[0]
    rid = w.call("result = region.id")
    for msg in ({"t": "advise", "rid": rid, "start": 0, "npages": NPAGES, "mergeable": False},
                {"t": "unregister", "rid": rid}):
        peer = RawPeer(domain.path)
        peer.hello()
        peer.send(msg)
        closes(domain, peer, f"region {rid} is not registered by this worker")
        peer.close()
    # and a real merge request of the hostile peer answered for pages it does not own
    check_bystanders(domain, bystanders)


def test_duplicate_and_forged_merge_replies(domain: Domain, bystanders) -> None:
    """A raw worker gets a real merge request; answering it twice closes it."""
    page = os.urandom(PAGE)
    peer = RawPeer(domain.path)
    peer.hello()
    backing, meta = register_raw(peer, 7, page * 4)
    req = peer.recv(timeout=30)
    assert req is not None and req["t"] == "merge", req
    n = int(protocol.items_from_bytes(req["items"])[:, 2].sum())
    # a wrong-length result is refused and closes; so does the same reply twice
    reply = {"t": "merged", "req": req["req"], "result": b"\x00" * n}
    assert peer.send(reply)
    assert peer.send(reply)
    closes(domain, peer, f"no merge request {req['req']} is outstanding")
    peer.close()
    os.close(backing), os.close(meta)
    assert domain.stats()["stable_pages_allocated"] >= 0
    check_bystanders(domain, bystanders)


def test_hostile_merge_now(domain: Domain, bystanders) -> None:
    """merge_now from a raw worker: a range outside its region, the same
    call twice while the first waits for its merge, and lying checksums
    (naming the bystanders' stable pages) each close that connection or
    merge nothing; the coordinator and the real workers go on."""
    page = os.urandom(PAGE)
    peer = RawPeer(domain.path)
    peer.hello()
    backing, meta = register_raw(peer, 3, page * 2 + os.urandom(2 * PAGE), advise=False)
    peer.send({"t": "merge_now", "req": 9, "rid": 3, "start": 2, "npages": 4, "hashes": b""})
    closes(domain, peer, "merge_now [2, +4) is outside region 3 of 4 pages")
    peer.close()
    os.close(backing), os.close(meta)

    peer = RawPeer(domain.path)
    peer.hello()
    backing, meta = register_raw(peer, 4, page * 4)
    # Checksums that are not the pages': the coordinator reads the pages
    # itself; what it makes stable is what it read.
    peer.send({"t": "merge_now", "req": 5, "rid": 4, "start": 0, "npages": 4, "hashes": b"\x07" * 32})
    req = peer.recv(timeout=30)
    while req is not None and req["t"] != "merge":
        req = peer.recv(timeout=30)
    assert req is not None, "no merge request for the merge_now"
    slots = set(protocol.items_from_bytes(req["items"])[:, 3].tolist())
    assert len(slots) == 1, req          # four equal pages: one new stable page
    peer.send({"t": "merge_now", "req": 5, "rid": 4, "start": 0, "npages": 4, "hashes": b""})
    closes(domain, peer, "merge_now 5 is already in progress")
    peer.close()
    os.close(backing), os.close(meta)
    assert domain.alive()
    check_bystanders(domain, bystanders)


# ---- resource limits -------------------------------------------------------------

@pytest.fixture
def capped(request: pytest.FixtureRequest, no_shm_leftovers: None) -> Iterator[Domain]:
    d = Domain(**request.param)
    yield d
    d.close()


@pytest.mark.parametrize("capped", [{"max_connections": 3}], indirect=True)
def test_connection_cap(capped: Domain) -> None:
    """Past max_connections a worker is refused; the coordinator's own uid may
    still connect as a client (CLIENT_RESERVE of them), so its CLI gets in."""
    peers = [RawPeer(capped.path) for _ in range(3)]
    for p in peers:
        p.hello()
    extra = RawPeer(capped.path)
    extra.send(hello_msg())
    assert extra.wait_closed()
    capped.wait_logged("max_connections (3) reached: only a client may connect past it")
    extra.close()
    assert capped.stats()["max_connections"] == 3       # the Domain's client: past the cap
    clients = [RawPeer(capped.path) for _ in range(CLIENT_RESERVE - 1)]
    for c in clients:
        c.hello("client")
    refused = RawPeer(capped.path)
    assert refused.wait_closed()
    capped.wait_logged(f"{3 + CLIENT_RESERVE} connections already (max_connections)")
    refused.close()
    for c in clients:
        c.close()
    peers.pop().close()
    # a freed place is taken again
    wait_for(lambda: len(capped.server.peers) == 3, what="the closed peers to be dropped")
    again = RawPeer(capped.path)
    again.hello()
    for p in peers + [again]:
        p.close()


WORKER_LOG = """
import logging
agent_warnings = []
class _H(logging.Handler):
    def emit(self, r): agent_warnings.append(r.getMessage())
logging.getLogger("shmdedup.agent").addHandler(_H(logging.WARNING))
"""


@pytest.mark.parametrize("capped, extra_pages, reason", [
    ({"max_regions_per_worker": 1}, NPAGES, "1 regions already (max_regions_per_worker)"),
    ({"max_pages_per_worker": NPAGES + 8}, 16, f"{NPAGES} + 16 pages is over max_pages_per_worker"),
], indirect=["capped"])
def test_registration_caps_refuse_the_region_and_keep_the_worker(
        capped: Domain, extra_pages: int, reason: str) -> None:
    w = Worker(setup=WORKER_LOG)
    w.run(__import__("tests.integration.hostile", fromlist=["x"]).WORKER_SETUP,
          SOCKET=capped.path, NPAGES=NPAGES, SEED=1)
    capped.wait_merging(w.pid, NPAGES)
    # a second region of duplicate pages, over the cap: refused, never merged
    w.run("""
        r2 = shmdedup.Region(N2 * P)
        a2 = r2.ndarray(np.uint8)
        a2[:] = content(N2, 5)
        sha2 = hashlib.sha256(memoryview(r2)).hexdigest()
        r2.advise(shmdedup.MERGEABLE)
    """, N2=extra_pages)
    capped.wait_logged(reason)
    warning = wait_for(lambda: next((m for m in w.call("result = agent_warnings")
                                     if "refused a region" in m), None), what="the agent's warning")
    assert reason in warning and "keeps working, unmerged" in warning
    capped.wait_full_scans(2)
    st = capped.worker_stats(w.pid)
    assert st["regions"] == 1 and st["ksm_merging_pages"] == NPAGES  # the connection lives on
    assert w.call("result = r2.merged_pages()") == 0
    assert w.call("v = a2[0]; a2[0] = v ^ 1; a2[0] = v; "
                  "result = hashlib.sha256(memoryview(r2)).hexdigest() == sha2")
    # advice and close of the refused region are harmless; the first region keeps merging
    w.call("r2.advise(shmdedup.UNMERGEABLE); r2.advise(shmdedup.MERGEABLE); del a2; r2.close()")
    sha = rewrite(w, 42)
    wait_for(lambda: w.call("result = region.merged_pages()") == NPAGES, 30, what="merging again")
    assert w.call("result = digest()") == sha
    assert not any("closing connection" in m for m in capped.messages())
    w.close()


@pytest.mark.parametrize("capped", [{"max_msgs_per_sec": 200, "max_msgs_burst": 50}], indirect=True)
def test_message_rate_cap(capped: Domain) -> None:
    honest, sha = spawn_worker(capped.path, NPAGES, 3)
    capped.wait_merging(honest.pid, NPAGES)
    peer = RawPeer(capped.path)
    peer.hello()
    backing, meta = register_raw(peer, 1, os.urandom(PAGE) * 2, advise=False)
    flood = {"t": "advise", "rid": 1, "start": 0, "npages": 1, "mergeable": False}
    sent = 0
    while sent < 5000 and peer.send(flood):
        sent += 1
    assert sent < 5000, "the coordinator never closed a flooding peer"
    closes(capped, peer, "more than 200 messages/s (burst 50)")
    peer.close()
    os.close(backing), os.close(meta)
    assert honest.call("result = digest()") == sha
    rewrite(honest, 8)
    wait_for(lambda: honest.call("result = region.merged_pages()") == NPAGES, 30, what="merging")
    honest.close()


def test_outstanding_waits_are_capped(domain: Domain) -> None:
    peer = RawPeer(domain.path)
    peer.hello("client")
    far = {"t": "wait", "full_scans": 2**62, "timeout": 3600}
    for _ in range(100):
        if not peer.send(far):
            break
    # One wait is outstanding; the others queue behind it (replies stay in
    # order), and past MAX_QUEUED_REQUESTS the client is closed.
    closes(domain, peer, "requests outstanding")
    peer.close()
    wait_for(lambda: domain.server.waits.waiting == [], what="its waits to be dropped")


# ---- coverage-guided fuzzing (atheris) --------------------------------------------

@pytest.mark.stress
def test_atheris_fuzz_decode_and_dispatch(tmp_path) -> None:
    """tests/fuzz/fuzz_protocol.py for 20 s: only ProtocolError and the closing path."""
    pytest.importorskip("atheris")
    target = REPO_ROOT / "tests" / "fuzz" / "fuzz_protocol.py"
    proc = subprocess.run(
        [sys.executable, str(target), "-max_total_time=20", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=180, env=child_env(), cwd=str(tmp_path))
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"fuzzer failed (exit {proc.returncode}):\n{tail}"
    assert "Done" in proc.stderr and "stat::number_of_executed_units" in proc.stderr, tail
    runs = int(proc.stderr.split("stat::number_of_executed_units:")[1].split()[0])
    assert runs > 1000, tail
    assert not list(tmp_path.glob("crash-*"))
