"""Tests of shmdedup.protocol over real AF_UNIX SEQPACKET sockets.

Paths are per-test temporary directories so the suite runs under pytest -n.
"""

from __future__ import annotations

import array
import errno
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmdedup import protocol as p
from shmdedup.errors import (
    ArgumentError,
    CoordinatorUnavailableError,
    PeerRejectedError,
    ProtocolError,
)

I31 = 2**31 - 1
ITEMS = p.items_to_bytes([(0, 0, 1, -1), (I31, 5, 3, 7), (3, 2**31 - 4, 4, 0)])

VALID: list[dict] = [
    {"t": "hello", "v": p.PROTOCOL_VERSION, "role": "worker", "pid": 1234},
    {"t": "hello", "v": p.PROTOCOL_VERSION, "role": "client", "pid": I31},
    {"t": "register", "rid": 0, "npages": I31},
    {"t": "advise", "rid": 7, "start": 2**31 - 1, "npages": 1, "mergeable": False},
    {"t": "unregister", "rid": I31},
    {"t": "merged", "req": 2**63 - 1, "result": b"\x00\x01\x01"},
    {"t": "unmerged", "req": 0, "err": errno.ENOMEM, "msg": "no memory" * 100},
    {"t": "stats"},
    {"t": "set", "name": "pages_to_scan", "value": -(2**63)},
    {"t": "wait", "full_scans": 2, "timeout": 86400},
    {"t": "wait", "full_scans": 0, "timeout": 0.25},
    {"t": "welcome", "v": p.PROTOCOL_VERSION, "page_size": 4096},
    {"t": "merge", "req": 3, "items": ITEMS},
    {"t": "merge", "req": 4, "items": b""},
    {"t": "unmerge", "req": 5, "items": p.items_to_bytes([(1, 2, 3, 0)])},
    {"t": "merge_now", "req": 6, "rid": 1, "start": 2**31 - 2, "npages": 2, "hashes": b"\x01" * 16},
    {"t": "merge_now", "req": 2**63 - 1, "rid": I31, "start": 0, "npages": 2**31, "hashes": b""},
    {"t": "merged_now", "req": 6, "err": 0, "msg": ""},
    {"t": "merged_now", "req": 7, "err": errno.ENOSPC, "msg": "no space" * 100},
    {"t": "refused", "msg": "uid 65534 is not allowed", "retry": False},
    {"t": "refused", "msg": "", "retry": True},
    {"t": "reply", "ok": True, "data": {"pages": [1, 2.5, None, "x", b"y", True]}, "error": ""},
    {"t": "reply", "ok": False, "data": None, "error": "no such control"},
]
FDS = {"register": 2, "welcome": 1}


def valid(t: str) -> dict:
    return dict(next(m for m in VALID if m["t"] == t))


def fd_set() -> set[str]:
    """Our open fds, minus the one listdir used (closed again by now)."""
    return {n for n in os.listdir("/proc/self/fd") if os.path.lexists(f"/proc/self/fd/{n}")}


def make_fds(n: int) -> list[int]:
    return [os.memfd_create(f"t{i}", os.MFD_CLOEXEC) for i in range(n)]


def assert_closed(fds: list[int], before: set[str]) -> None:
    assert fd_set() == before - {str(fd) for fd in fds}
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF


@pytest.fixture
def pair() -> Iterator[tuple[p.Connection, p.Connection]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ca, cb = p.Connection(a), p.Connection(b)
    yield ca, cb
    ca.close()
    cb.close()


@pytest.fixture
def raw_pair() -> Iterator[tuple[socket.socket, p.Connection]]:
    """A raw sender (to send what encode() refuses) and a Connection receiver."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    cb = p.Connection(b)
    yield a, cb
    a.close()
    cb.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    # short, unique: AF_UNIX paths are limited to 107 bytes
    d = tempfile.mkdtemp(prefix="sdp-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def raw_send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


# --- round trips ------------------------------------------------------------

@pytest.mark.parametrize("msg", VALID, ids=lambda m: m["t"])
def test_round_trip(msg: dict, pair) -> None:
    a, b = pair
    fds = make_fds(FDS.get(msg["t"], 0))
    try:
        assert p.decode(p.encode(msg), fds) == msg
        a.send(msg, fds)
        got, rfds = b.recv(timeout=5)
        assert got == msg and len(rfds) == len(fds)
        for fd in rfds:
            os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def test_fds_arrive_working(pair) -> None:
    a, b = pair
    backing = os.memfd_create("backing")
    r, w = os.pipe()
    try:
        os.ftruncate(backing, 4096)
        a.send({"t": "register", "rid": 1, "npages": 1}, [backing, w])
        msg, (rbacking, rw) = b.recv(timeout=5)
        assert not os.get_inheritable(rbacking)  # MSG_CMSG_CLOEXEC
        os.pwrite(rbacking, b"hello", 100)
        assert os.pread(backing, 5, 100) == b"hello"
        os.write(rw, b"ping")
        assert os.read(r, 4) == b"ping"
        a.send({"t": "welcome", "v": 1, "page_size": 4096})
        assert b.recv(timeout=5) == ({"t": "welcome", "v": 1, "page_size": 4096}, [])
        os.close(rbacking)
        os.close(rw)
    finally:
        for fd in (backing, r, w):
            os.close(fd)


def test_items_layout() -> None:
    b = p.items_to_bytes([(1, 2, 3, -1), (4, 5, 6, 7)])
    assert b == struct.pack("<8q", 1, 2, 3, -1, 4, 5, 6, 7)
    assert p.items_to_bytes(np.array([(1, 2, 3, -1), (4, 5, 6, 7)], np.int32)) == b
    v = p.items_from_bytes(b)
    assert v.shape == (2, 4) and v[1, 3] == 7 and v.tolist() == [[1, 2, 3, -1], [4, 5, 6, 7]]
    assert p.items_from_bytes(b"").shape == (0, 4) and p.items_to_bytes([]) == b""
    for bad in ([(1, 2, 3)], [(1, 2, 3, 2**63)], [(1, 2, 3, "x")], [1, 2, 3, 4]):
        with pytest.raises(ArgumentError):
            p.items_to_bytes(bad)
    with pytest.raises(ProtocolError):
        p.items_from_bytes(b"\0" * 33)


# --- malformed messages -----------------------------------------------------

def mod(t: str, **kw) -> dict:
    m = valid(t)
    for k, v in kw.items():
        if v is DEL:
            del m[k]
        else:
            m[k] = v
    return m


DEL = object()


def nested(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


BIG = 2**31
BAD_MSGS: list[tuple[dict, str]] = [
    ({"x": 1}, "'t'"),
    ({"t": 1}, "'t'"),
    ({"t": "bogus"}, "unknown message type"),
    (mod("hello", pid=DEL), "hello: missing key 'pid'"),
    (mod("stats", extra=1), "stats: unexpected key 'extra'"),
    (mod("hello", v=2), "hello: v must be 1, got 2"),
    (mod("hello", v=True), "hello: v"),
    (mod("hello", role="admin"), "hello: role"),
    (mod("hello", pid=0), "hello: pid"),
    (mod("hello", pid=True), "hello: pid"),
    (mod("register", rid=BIG), "register: rid"),
    (mod("register", rid=False), "register: rid"),
    (mod("register", npages=0), "register: npages"),
    (mod("register", npages=BIG), "register: npages"),
    (mod("register", npages=1.0), "register: npages"),
    (mod("advise", start=-1), "advise: start must be an int in [0, 2147483647], got -1"),
    (mod("advise", npages=0), "advise: npages"),
    (mod("advise", start=BIG - 1, npages=2), "advise: start + npages"),
    (mod("advise", mergeable=1), "advise: mergeable must be a bool"),
    (mod("unregister", rid=-1), "unregister: rid"),
    (mod("merged", req=-1), "merged: req"),
    (mod("merged", result="\x00"), "merged: result must be bytes"),
    (mod("merged", result=b"\x00\x02"), "merged: result bytes"),
    (mod("unmerged", err=-1), "unmerged: err"),
    (mod("unmerged", msg="x" * 1001), "unmerged: msg"),
    (mod("unmerged", msg=b"x"), "unmerged: msg"),
    (mod("set", name=""), "set: name"),
    (mod("set", name="n" * 65), "set: name"),
    (mod("set", value=True), "set: value"),
    (mod("wait", full_scans=-1), "wait: full_scans"),
    (mod("wait", timeout=-0.5), "wait: timeout"),
    (mod("wait", timeout=86400.5), "wait: timeout"),
    (mod("wait", timeout=float("nan")), "wait: timeout"),
    (mod("wait", timeout=float("inf")), "wait: timeout"),
    (mod("wait", timeout=True), "wait: timeout"),
    (mod("welcome", page_size=3000), "welcome: page_size"),
    (mod("merge", items=ITEMS[:-1]), "not a multiple of 32"),
    (mod("merge", items=p.items_to_bytes([(-1, 0, 1, 0)])), "merge: item 0: rid"),
    (mod("merge", items=p.items_to_bytes([(0, 0, 1, 0), (BIG, 0, 1, 0)])), "merge: item 1: rid"),
    (mod("merge", items=p.items_to_bytes([(0, -1, 1, 0)])), "merge: item 0: page"),
    (mod("merge", items=p.items_to_bytes([(0, 0, 0, 0)])), "merge: item 0: npages"),
    (mod("merge", items=p.items_to_bytes([(0, BIG - 1, 2, 0)])), "merge: item 0: page + npages"),
    (mod("merge", items=p.items_to_bytes([(0, 0, 1, -2)])), "merge: item 0: slot"),
    (mod("merge", items=p.items_to_bytes([(0, 0, 1, 0)] * (p.MAX_ITEMS + 1))), "items, at most"),
    (mod("unmerge", items=p.items_to_bytes([(0, 0, 1, 0), (0, 0, 1, -1)])), "unmerge: item 1: slot"),
    (mod("unmerge", items="abc"), "unmerge: items must be bytes"),
    (mod("merge_now", npages=0), "merge_now: npages"),
    (mod("merge_now", start=-1), "merge_now: start"),
    (mod("merge_now", rid=BIG), "merge_now: rid"),
    (mod("merge_now", start=BIG - 1, npages=2, hashes=b""), "merge_now: start + npages"),
    (mod("merge_now", hashes=b"\x00" * 15), "merge_now: hashes must be empty or 8 bytes a page (16), got 15"),
    (mod("merge_now", hashes=b"\x00" * 24), "merge_now: hashes must be empty or 8 bytes a page"),
    (mod("merge_now", hashes="x"), "merge_now: hashes must be bytes"),
    (mod("merged_now", err=-1), "merged_now: err"),
    (mod("merged_now", msg="x" * 1001), "merged_now: msg"),
    (mod("refused", retry=1), "refused: retry must be a bool"),
    (mod("refused", msg="x" * 1001), "refused: msg"),
    (mod("reply", ok=1), "reply: ok"),
    (mod("reply", ok=True, error="oops"), "reply: error must be ''"),
    (mod("reply", data={1: 2}), "map key"),
    (mod("reply", data=nested(40)), "nests deeper"),
]


def fd_case_bytes() -> list[tuple[bytes, int, str]]:
    """Raw messages that only decode (not encode) can see, plus fd-count errors."""
    good = p.encode(valid("stats"))
    return [
        (b"", 0, "not a msgpack"),
        (b"\xc1", 0, "not a msgpack"),
        (good[:-1], 0, "not a msgpack"),
        (p.encode(valid("hello"))[:-3], 1, "not a msgpack"),
        (good + b"\x00", 2, "not a msgpack"),
        (msgpack.packb([1, 2]), 1, "must be a map"),
        (msgpack.packb("stats"), 0, "must be a map"),
        (b"\xdd\xff\xff\xff\xff", 0, "not a msgpack"),  # array of 2**32-1 elements
        (b"\xdf\xff\xff\xff\xff", 0, "not a msgpack"),  # map of 2**32-1 pairs
        (b"\x81\xa1t\xa5st\xffts", 0, "not a msgpack"),  # invalid UTF-8
        (msgpack.packb({"t": "stats", b"t": 1}), 0, "unexpected key b't'"),
        (msgpack.packb({("t",): 1}), 0, "not a msgpack"),  # tuple key, strict_map_key
        (msgpack.packb({"t": "reply", "ok": True, "error": "",
                        "data": msgpack.ExtType(5, b"xx")}), 0, "not a msgpack"),
        (msgpack.packb({"t": "reply", "ok": True, "error": "",
                        "data": msgpack.Timestamp(1, 2)}), 0, "not a msgpack"),
        (b"\xc4\x80" + b"\x00" * 128, 0, "must be a map"),  # a bin, not a map
        (b"\x80" * (p.MAX_MESSAGE + 1), 0, "max 196608"),
        (p.encode(valid("register")), 0, "register: expects 2 fds, got 0"),
        (p.encode(valid("register")), 1, "register: expects 2 fds, got 1"),
        (p.encode(valid("register")), 3, "register: expects 2 fds, got 3"),
        (p.encode(valid("welcome")), 2, "welcome: expects 0..1 fds, got 2"),
        (p.encode(valid("hello")), 1, "hello: expects 0 fds, got 1"),
        (p.encode(valid("merge")), 4, "merge: expects 0 fds, got 4"),
    ]


@pytest.mark.parametrize("msg,why", BAD_MSGS, ids=[w[:30] for _, w in BAD_MSGS])
def test_bad_message(msg: dict, why: str) -> None:
    with pytest.raises(ProtocolError) as e:
        p.encode(msg)  # our own bugs are caught before sending...
    assert why in str(e.value)
    data = msgpack.packb(msg, use_bin_type=True)
    fds = make_fds(2)
    before = fd_set()
    with pytest.raises(ProtocolError) as e:
        p.decode(data, fds)  # ...and a hostile peer's on receipt, fds closed
    assert why in str(e.value)
    assert_closed(fds, before)


BAD_BYTES = fd_case_bytes()


@pytest.mark.parametrize("data,nfds,why", BAD_BYTES,
                         ids=[f"{i}-{why[:25]}" for i, (_, _, why) in enumerate(BAD_BYTES)])
def test_bad_bytes(data: bytes, nfds: int, why: str) -> None:
    fds = make_fds(nfds)
    before = fd_set()
    with pytest.raises(ProtocolError) as e:
        p.decode(data, fds)
    assert why in str(e.value)
    assert_closed(fds, before)


def test_bad_message_over_socket_closes_fds(raw_pair) -> None:
    a, b = raw_pair
    cases = [(msgpack.packb(mod("hello", pid=True)), 2), (p.encode(valid("register")), 1),
             (b"\xc1garbage", 3), (b"", 1)]
    for data, n in cases:
        fds = make_fds(n)
        raw_send(a, data, fds)
        for fd in fds:
            os.close(fd)
        before = fd_set()
        with pytest.raises(ProtocolError):
            b.recv(timeout=5)
        assert fd_set() == before  # the received duplicates were closed
    raw_send(a, p.encode(valid("stats")))
    assert b.recv(timeout=5) == (valid("stats"), [])  # connection still usable


def test_too_many_fds_is_ctrunc(raw_pair) -> None:
    a, b = raw_pair
    fds = make_fds(p.MAX_FDS + 3)
    raw_send(a, p.encode(valid("register")), fds)
    for fd in fds:
        os.close(fd)
    before = fd_set()
    with pytest.raises(ProtocolError, match="more than 4 fds"):
        b.recv(timeout=5)
    assert fd_set() == before


# --- exact limits -----------------------------------------------------------

def sized_reply(size: int) -> dict:
    base = len(p.encode({"t": "reply", "ok": True, "data": "", "error": ""}))
    return {"t": "reply", "ok": True, "data": "x" * (size - base - 4), "error": ""}  # str32 header


def test_message_size_limit(pair, raw_pair) -> None:
    msg = sized_reply(p.MAX_MESSAGE)
    data = p.encode(msg)
    assert len(data) == p.MAX_MESSAGE
    assert p.decode(data, []) == msg
    a, b = pair
    a.send(msg)
    assert b.recv(timeout=5) == (msg, [])
    with pytest.raises(ProtocolError, match="196609 bytes"):
        p.encode(sized_reply(p.MAX_MESSAGE + 1))
    over = msgpack.packb(sized_reply(p.MAX_MESSAGE + 1))
    assert len(over) == p.MAX_MESSAGE + 1
    with pytest.raises(ProtocolError, match="196609 bytes"):
        p.decode(over, [])
    ra, rb = raw_pair
    raw_send(ra, over)
    with pytest.raises(ProtocolError, match="196609 bytes"):
        rb.recv(timeout=5)
    raw_send(ra, over + b"x" * 1000)  # larger than the receive buffer: MSG_TRUNC
    with pytest.raises(ProtocolError, match="larger than"):
        rb.recv(timeout=5)


def test_int_limits() -> None:
    p.encode({"t": "register", "rid": I31, "npages": I31})
    p.encode({"t": "advise", "rid": 0, "start": 0, "npages": 2**31, "mergeable": True})
    full = p.items_to_bytes([(I31, 0, 2**31, 5)] * p.MAX_ITEMS)
    assert len(p.encode({"t": "merge", "req": 0, "items": full})) <= p.MAX_MESSAGE
    for bad in ({"t": "register", "rid": 0, "npages": 2**31},
                {"t": "register", "rid": True, "npages": 1},
                {"t": "merged", "req": 2**64, "result": b""},
                {"t": "set", "name": "x", "value": 2**63}):
        with pytest.raises(ProtocolError):
            p.encode(bad)


# --- fuzzing ----------------------------------------------------------------

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=70),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=20)
KEYS = sorted({k for fields in p._SCHEMA.values() for k in fields} | {"x"})


def only_protocol_errors(data: bytes) -> None:
    try:
        msg = p.decode(data, [])
    except ProtocolError:
        return
    assert isinstance(msg, dict) and msg["t"] in p.MESSAGE_TYPES
    again = p.encode(msg)  # whatever we accept, we can also send (NaN != NaN: compare bytes)
    assert p.encode(p.decode(again, [])) == again


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes(data: bytes) -> None:
    only_protocol_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.MESSAGE_TYPES)),
       st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_fuzz_maps(t: str, body: dict) -> None:
    only_protocol_errors(msgpack.packb({**body, "t": t}, use_bin_type=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.data())
def test_fuzz_near_valid(msg: dict, data: st.DataObject) -> None:
    msg = dict(msg)
    key = data.draw(st.sampled_from(sorted(msg)))
    msg[key] = data.draw(values | st.binary(min_size=32, max_size=96).filter(lambda b: len(b) % 32 == 0))
    only_protocol_errors(msgpack.packb(msg, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 20))
def test_fuzz_mutations(msg: dict, pos: int, byte: int, cut: int) -> None:
    data = bytearray(p.encode(msg))
    data[pos % len(data)] = byte
    only_protocol_errors(bytes(data))
    only_protocol_errors(bytes(data[:len(data) - cut]))


# --- connection behaviour ---------------------------------------------------

def test_connection_eof_timeout_close(pair) -> None:
    a, b = pair
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.05)
    fds = make_fds(1)
    with pytest.raises(ProtocolError, match="stats: expects 0 fds"):
        a.send(valid("stats"), fds)  # refused before anything is sent
    with pytest.raises(ProtocolError):
        a.send({"t": "stats", "x": 1})
    os.close(fds[0])
    with pytest.raises(TimeoutError):
        b.recv(timeout=0)
    a.close()
    a.close()  # idempotent
    assert a.closed
    with pytest.raises(ConnectionError):
        a.send(valid("stats"))
    assert b.recv(timeout=5) is None
    with pytest.raises(ConnectionError):  # BrokenPipeError, no SIGPIPE
        b.send(valid("stats"))


def test_concurrent_senders(pair) -> None:
    a, b = pair
    n_threads, n_each = 4, 200
    got: list[dict] = []

    def reader() -> None:
        for _ in range(n_threads * n_each):
            got.append(b.recv(timeout=10)[0])

    def sender(k: int) -> None:
        for i in range(n_each):
            a.send({"t": "unmerged", "req": k * n_each + i, "err": 0, "msg": "m" * (i % 50)})

    threads = [threading.Thread(target=reader)] + [
        threading.Thread(target=sender, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(m["req"] for m in got) == list(range(n_threads * n_each))


def test_connection_needs_seqpacket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, pytest.raises(ArgumentError):
        p.Connection(a)


# --- peer credentials -------------------------------------------------------

def test_peer_check(pair, monkeypatch) -> None:
    a, _ = pair
    me = (os.getpid(), os.getuid(), os.getgid())
    assert a.peer == me
    assert p.check_peer(a) == me
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 4242)
    with pytest.raises(PeerRejectedError, match=f"pid {me[0]} uid {real}"):
        p.check_peer(a)
    with pytest.raises(PermissionError):
        p.check_peer(a, allow_uids={real + 1}, allow_gids={me[2] + 1})
    assert p.check_peer(a, allow_uids={real}) == me
    assert p.check_peer(a, allow_gids={me[2]}) == me


# --- socket paths -----------------------------------------------------------

def test_path_xdg(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = p.default_socket_path()
    assert path == str(tmp_path / "shmdedup" / "default.sock")
    assert stat.S_IMODE(os.stat(tmp_path / "shmdedup").st_mode) == 0o700
    assert p.default_socket_path("a.b-c_1") == str(tmp_path / "shmdedup" / "a.b-c_1.sock")
    os.chmod(tmp_path / "shmdedup", 0o777)
    with pytest.raises(PeerRejectedError, match="group or others"):
        p.default_socket_path()
    os.chmod(tmp_path / "shmdedup", 0o750)
    with pytest.raises(PeerRejectedError):
        p.default_socket_path()


def test_path_fallback(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(p, "_RUNTIME_FALLBACK", str(tmp_path))
    d = tmp_path / f"shmdedup-{os.getuid()}"
    assert p.default_socket_path("x") == str(d / "x.sock")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert p.default_socket_path("x") == str(d / "x.sock")


def test_path_rejects_symlink_and_foreign(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(p, "_RUNTIME_FALLBACK", str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, tmp_path / f"shmdedup-{os.getuid()}")
    with pytest.raises(PeerRejectedError, match="not a directory"):
        p.default_socket_path()
    # a directory made by "someone else": our uid no longer matches its owner;
    # the XDG dir is then not ours either, so the fallback is used and refused
    real = os.getuid()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(os, "getuid", lambda: real + 4242)
    (tmp_path / f"shmdedup-{real + 4242}").mkdir(mode=0o700)
    with pytest.raises(PeerRejectedError, match="owned by uid"):
        p.default_socket_path()


@pytest.mark.parametrize("domain", ["", ".hidden", "..", "a/b", "a b", "x" * 65, "a\n", "é", None])
def test_bad_domain(domain) -> None:
    with pytest.raises(ArgumentError):
        p.default_socket_path(domain)


# --- listen / connect -------------------------------------------------------

def test_listen_connect(sockdir) -> None:
    path = os.path.join(sockdir, "c.sock")
    with p.listen(path) as lsock:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        client = p.connect(path)
        server = p.Connection(lsock.accept()[0])
        with client, server:
            assert p.check_peer(server)[0] == os.getpid()
            client.send({"t": "hello", "v": 1, "role": "worker", "pid": os.getpid()})
            assert server.recv(timeout=5)[0]["role"] == "worker"
            fd = os.memfd_create("stable")
            server.send({"t": "welcome", "v": 1, "page_size": 4096}, [fd])
            os.close(fd)
            msg, fds = client.recv(timeout=5)
            assert msg["page_size"] == 4096 and len(fds) == 1
            os.close(fds[0])
        with pytest.raises(OSError) as e:  # a live coordinator is never displaced
            p.listen(path)
        assert e.value.errno == errno.EADDRINUSE and "already listening" in str(e.value)
    # the listener is closed but its file remains: stale
    with pytest.raises(CoordinatorUnavailableError, match=path):
        p.connect(path)
    p.listen(path).close()


def test_listen_keeps_non_socket(sockdir) -> None:
    path = os.path.join(sockdir, "f.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(OSError):
        p.listen(path)
    with open(path) as f:
        assert f.read() == "precious"


def test_connect_missing(sockdir) -> None:
    path = os.path.join(sockdir, "nobody.sock")
    with pytest.raises(CoordinatorUnavailableError, match="nobody.sock"):
        p.connect(path, timeout=1)
    with pytest.raises(ConnectionError):
        p.connect(os.path.join(sockdir, "no", "dir.sock"))


def test_own_items_are_packed_unchecked_and_still_refused_on_receipt() -> None:
    """The coordinator packs the items it built from its own runs without
    checking them again (encode(own_items=True)); the receiver's decode
    checks every message, so a bad item never reaches a worker's merge."""
    bad = {"t": "merge", "req": 1, "items": p.items_to_bytes([(0, 0, 1, -2)])}
    with pytest.raises(ProtocolError, match="merge: item 0: slot"):
        p.encode(bad)
    data = p.encode(bad, own_items=True)
    with pytest.raises(ProtocolError, match="merge: item 0: slot"):
        p.decode(data)
    # The rest of the message is checked as always.
    with pytest.raises(ProtocolError, match="merge: missing key"):
        p.encode({"t": "merge", "items": b""}, own_items=True)
