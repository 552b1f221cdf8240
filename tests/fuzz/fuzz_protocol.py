"""Coverage-guided fuzz target (atheris): protocol.decode and the coordinator's dispatch.

    python tests/fuzz/fuzz_protocol.py -max_total_time=20 [libFuzzer flags] [corpus dir]

Each input is one hostile connection: up to eight messages, each either raw
bytes or a message built from the schema with fuzzed field values (small
region ids and request ids so registration, advice, merge replies and their
ordering really get exercised), sent with 0-4 descriptors of fuzzed kinds
(tmpfs objects of fuzzed sizes holding duplicate pages, a pipe, a directory,
/dev/null, write-only and O_PATH descriptors).  Each message goes through
``protocol.decode`` and then ``CoordinatorServer.inbox.dispatch`` of a real
coordinator (its socket bound, its event loop not running: this process
drives it), exactly as ``Inbox.readable`` does, with a scan batch after each
message so merge requests are sent and answered.

Allowed outcomes: ProtocolError from decode, or one of the exceptions
``Inbox._handle`` turns into "close this connection with a logged reason".
Anything else escapes and libFuzzer reports a crash.  After each input the
peer is dropped and this process must hold exactly the descriptors it held
before (a leaked fd is a crash too).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import atheris
import msgpack

with atheris.instrument_imports(include=["shmdedup"]):
    from shmdedup import protocol
    from shmdedup.coordinator import server as coordinator
    from shmdedup.coordinator.server import CoordinatorServer, Peer
    from shmdedup.coordinator.unmergeall import Phase
    from shmdedup.errors import ProtocolError

PAGE = os.sysconf("SC_PAGE_SIZE")
# What Inbox._handle turns into a logged close of the connection.
CLOSING = (ProtocolError, ValueError, OSError, MemoryError)
TYPES = sorted(protocol.MESSAGE_TYPES) + ["bogus", ""]
BASE = {"sleep_millisecs": 0, "pages_to_scan": 256, "max_pages_per_worker": 4096}

_tmp = tempfile.mkdtemp(prefix="shmdedup-fuzz-")
server = CoordinatorServer(os.path.join(_tmp, "c.sock"), BASE)
# Inputs reach it through socket pairs, never the path; and the fuzzer ends
# with exit() (no Python shutdown): remove the socket and its directory now,
# keeping a descriptor of the directory to send as a wrong kind of fd.
_DIR_FD = os.open(_tmp, os.O_RDONLY | os.O_CLOEXEC)
os.unlink(server.socket_path)
os.rmdir(_tmp)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _value(fdp: atheris.FuzzedDataProvider, key: str, peer: Peer) -> object:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 3:  # the right type, mostly small: registered ids, real sizes
        if key in ("rid", "start"):
            return fdp.ConsumeIntInRange(0, 4)
        if key == "npages":
            return fdp.ConsumeIntInRange(1, 16)
        if key == "req":
            reqs = sorted(peer.requests) or [0]
            return fdp.PickValueInList(reqs + [reqs[-1] + 1])
        if key == "items":
            rows = [(fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(0, 16),
                     fdp.ConsumeIntInRange(0, 16), fdp.ConsumeIntInRange(-1, 8))
                    for _ in range(fdp.ConsumeIntInRange(0, 4))]
            return protocol.items_to_bytes(rows)
        if key == "result":  # the length of an outstanding request, mostly
            lengths = [sum(n for _, _, n, _ in r[1]) for r in peer.requests.values()]
            n = fdp.PickValueInList(lengths) if lengths and fdp.ConsumeBool() \
                else fdp.ConsumeIntInRange(0, 40)
            return bytes(fdp.ConsumeIntInRange(0, 1) for _ in range(n))
        if key in ("mergeable", "ok"):
            return fdp.ConsumeBool()
        if key == "role":
            return fdp.PickValueInList(["worker", "client", "root"])
        if key == "v":
            return protocol.PROTOCOL_VERSION
        if key == "name":
            return fdp.PickValueInList(sorted(coordinator.CONTROLS) + ["nope"])
        if key in ("msg", "error"):
            return fdp.ConsumeUnicodeNoSurrogates(8)
        return fdp.ConsumeIntInRange(0, 8)
    if kind == 4:
        return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
    if kind == 5:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if kind == 6:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 16))
    if kind == 7:
        return fdp.ConsumeFloat()
    if kind == 8:
        return [fdp.ConsumeIntInRange(-2, 2) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return None


def _message(fdp: atheris.FuzzedDataProvider, peer: Peer) -> bytes:
    if fdp.ConsumeIntInRange(0, 4) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    t = fdp.PickValueInList(TYPES)
    msg: dict[object, object] = {"t": t}
    for key in protocol._SCHEMA.get(t, {}):
        if fdp.ConsumeIntInRange(0, 15):
            msg[key] = _value(fdp, key, peer)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        msg[fdp.ConsumeUnicodeNoSurrogates(4)] = _value(fdp, "x", peer)
    try:
        data = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b""
    if fdp.ConsumeIntInRange(0, 15) == 0 and data:
        data = data[:fdp.ConsumeIntInRange(0, len(data) - 1)]
    return data


def _fds(fdp: atheris.FuzzedDataProvider, n: int) -> list[int]:
    out = []
    for _ in range(n):
        kind = fdp.ConsumeIntInRange(0, 7)
        if kind <= 2:  # a tmpfs object of 0..16 pages whose pages repeat (so they merge)
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            pages = fdp.ConsumeIntInRange(0, 16)
            os.ftruncate(fd, pages * PAGE + fdp.ConsumeIntInRange(0, 1) * 100)
            for i in range(pages):
                b = fdp.ConsumeIntInRange(0, 3)
                if b:
                    os.pwrite(fd, bytes([b]) * PAGE, i * PAGE)
            out.append(fd)
        elif kind == 3:
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            out.append(r)
        elif kind == 4:
            out.append(os.dup(_DIR_FD))
        elif kind == 5:
            out.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        else:
            m = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(m, 16 * PAGE)
            flags = os.O_WRONLY if kind == 6 else os.O_PATH
            out.append(os.open(f"/proc/self/fd/{m}", flags | os.O_CLOEXEC))
            os.close(m)
    return out


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            _, anc, _, _ = sock.recvmsg(protocol.MAX_MESSAGE + 1, socket.CMSG_SPACE(16),
                                        socket.MSG_DONTWAIT)
        except (BlockingIOError, ConnectionError):
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for i in range(0, len(payload) - len(payload) % 4, 4):
                    os.close(int.from_bytes(payload[i:i + 4], sys.byteorder))
        if not anc and not _:
            return


def _registered_worker(fdp: atheris.FuzzedDataProvider, peer: Peer, sock: socket.socket) -> None:
    """Bring the peer to a worker with a registered, advised region of
    repeating pages and merge requests outstanding (the deep states)."""
    peer.role = "worker"
    npages = fdp.ConsumeIntInRange(1, 16)
    backing = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    os.ftruncate(backing, npages * PAGE)
    for i in range(npages):
        b = fdp.ConsumeIntInRange(0, 3)
        if b:
            os.pwrite(backing, bytes([b]) * PAGE, i * PAGE)
    meta = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    os.ftruncate(meta, PAGE)
    server.inbox.dispatch(peer, protocol.decode(protocol.encode(
        {"t": "register", "rid": 1, "npages": npages}), [backing, meta]), [backing, meta])
    server.inbox.dispatch(peer, {"t": "advise", "rid": 1, "start": 0, "npages": npages,
                            "mergeable": True}, [])
    for _ in range(3):
        server.scanner.batch(server.controls["pages_to_scan"])
    _drain(sock)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    before = _fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)  # a full buffer is a send failure (a logged drop), never a hang
    peer = Peer(protocol.Connection(a), os.getpid(), os.getuid())
    server.peers[a.fileno()] = peer
    try:
        start = fdp.ConsumeIntInRange(0, 3)
        if start == 1:
            _registered_worker(fdp, peer, b)
        elif start:
            peer.role = fdp.PickValueInList(["worker", "client"])
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            raw = _message(fdp, peer)
            fds = _fds(fdp, fdp.ConsumeIntInRange(0, 4))
            try:
                msg = protocol.decode(raw, fds)
            except ProtocolError:
                break  # decode closed the fds; Inbox.readable drops the peer
            try:
                server.inbox.dispatch(peer, msg, fds)
            except CLOSING:
                for fd in fds:
                    os.close(fd)
                break
            for _ in range(fdp.ConsumeIntInRange(0, 3)):  # two visits make a merge
                server.scanner.batch(server.controls["pages_to_scan"])
            _drain(b)
            if peer.conn.closed or server.outbox.dropping(peer):
                break
    finally:
        server.outbox.drops.clear()
        server._drop_peer(peer, "")
        # The peer is this (live) process, so its regions went to a ghost
        # (its pidfd comes from the connection): bury it as if it had exited.
        for ghost in list(server.workers.ghosts.values()):
            server.workers.bury(ghost)
        server.waits.waiting.clear()
        ua = server.unmerge_all
        ua.phase, ua.client, ua.error = Phase.IDLE, None, None
        ua.reqs.clear()
        server.controls.update({k: v[0] for k, v in coordinator.CONTROLS.items()}, **BASE)
        server.surface.apply_scan_controls()
        _drain(b)
        b.close()
    after = _fd_count()
    if after != before:
        raise AssertionError(f"descriptor leak: {before} open before the input, {after} after")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
