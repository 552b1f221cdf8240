"""Wire protocol between the coordinator and its workers and clients.

One AF_UNIX SOCK_SEQPACKET message carries exactly one msgpack map (key "t"
is the type). File descriptors travel with it as SCM_RIGHTS. Merge and
unmerge requests carry their work as packed little-endian int64 quadruples
``(rid, page, npages, slot)`` so a large request costs one bytes object, not
thousands of Python lists (:func:`items_to_bytes`, :func:`items_from_bytes`).

Invariants this module keeps:

* Every received message is untrusted. :func:`decode` checks the framing, the
  type, the exact key set, every value's type and range (a bool is never an
  int and an int never a bool) and the number of fds; on any problem it raises
  :class:`~shmdedup.errors.ProtocolError` and closes every received fd. No
  other exception escapes it, whatever the bytes.
* Outgoing messages pass the same schema (:func:`encode`), so our own bugs
  surface as ProtocolError before anything is sent.
* No message is larger than :data:`MAX_MESSAGE`; unpacking limits keep a
  hostile header from making us allocate more than the message size.
* Received fds are close-on-exec; socket directories are 0700 and owned by
  us; socket files are 0600 unless the caller asks for a wider mode.
"""

from __future__ import annotations

import errno
import math
import os
import re
import reprlib
import select
import socket
import stat
import struct
import threading
import time
from array import array
from collections.abc import Sequence
from typing import Any, Callable

import msgpack
import numpy as np

from shmdedup._shm import close_fds
from shmdedup.errors import (
    ArgumentError,
    CoordinatorUnavailableError,
    DescriptorShortageError,
    PeerRejectedError,
    ProtocolError,
)

PROTOCOL_VERSION = 1
# A SEQPACKET message must fit the sender's socket buffer in one piece; the
# default (net.core.wmem_default) is 208 KiB, so stay under it even when our
# SO_SNDBUF request is refused.
MAX_MESSAGE = 192 * 1024
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)   # Linux 6.5; Python 3.13 names it
MAX_FDS = 4
ITEM_SIZE = 32
MAX_ITEMS = ((MAX_MESSAGE - 1024) // ITEM_SIZE) // 64 * 64  # 1 KiB for the envelope

_I31 = 2**31 - 1
_I63 = 2**63 - 1
_MAX_TEXT = 1000
_MAX_NAME = 64
_MAX_TIMEOUT = 86400
_MAX_DEPTH = 32  # reply data nests a few levels; deeper is hostile, not useful
_BACKLOG = 1024  # a flood of connects must not leave others EAGAIN (capped by somaxconn)
_RUNTIME_FALLBACK = "/tmp"  # overridable by tests
_DOMAIN_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_short = _repr.repr  # a hostile 100 KiB value must not end up in an error message


# --- schema -----------------------------------------------------------------

Check = Callable[[str, str, Any], None]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rule(what: str, ok: Callable[[Any], bool]) -> Check:
    def check(t: str, key: str, v: Any) -> None:
        if not ok(v):
            raise ProtocolError(f"{t}: {key} must be {what}, got {_short(v)}")
    return check


def _int(lo: int, hi: int = _I63) -> Check:
    what = (str(lo) if lo == hi else f"an int >= {lo}" if hi == _I63
            else f"an int in [{lo}, {hi}]")
    return _rule(what, lambda v: _is_int(v) and lo <= v <= hi)


def _str(lo: int, hi: int) -> Check:
    return _rule(f"a str of {lo}..{hi} chars",
                 lambda v: isinstance(v, str) and lo <= len(v) <= hi)


_bool = _rule("a bool", lambda v: isinstance(v, bool))
_bytes = _rule("bytes", lambda v: isinstance(v, bytes))
_role = _rule("'worker' or 'client'", lambda v: isinstance(v, str) and v in ("worker", "client"))
_page_size = _rule("a power of two in [512, 2**30]",
                   lambda v: _is_int(v) and 512 <= v <= 2**30 and not v & (v - 1))
# the chained comparison is False for NaN, so NaN is rejected too
_timeout = _rule(f"a number in [0, {_MAX_TIMEOUT}]",
                 lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and 0 <= v <= _MAX_TIMEOUT)


_PLAIN = (str, bytes, int, float, bool, type(None))


def _data(t: str, key: str, v: Any) -> None:
    # Iterative so a deep hostile value can't exhaust the Python stack.
    stack: list[tuple[Any, int]] = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, _PLAIN):
            continue
        if depth >= _MAX_DEPTH:
            raise ProtocolError(f"{t}: {key} nests deeper than {_MAX_DEPTH}")
        if isinstance(x, (list, tuple)):
            stack.extend((y, depth + 1) for y in x)
        elif isinstance(x, dict):
            for k, y in x.items():
                if not isinstance(k, str):
                    raise ProtocolError(f"{t}: {key} has a non-str map key {_short(k)}")
                stack.append((y, depth + 1))
        else:
            raise ProtocolError(f"{t}: {key} holds an unsupported {type(x).__name__}")


_SCHEMA: dict[str, dict[str, Check]] = {
    "hello": {"v": _int(PROTOCOL_VERSION, PROTOCOL_VERSION), "role": _role,
              "pid": _int(1, _I31)},
    "register": {"rid": _int(0, _I31), "npages": _int(1, _I31)},
    "advise": {"rid": _int(0, _I31), "start": _int(0, _I31), "npages": _int(1, 2**31),
               "mergeable": _bool},
    "unregister": {"rid": _int(0, _I31)},
    "merged": {"req": _int(0), "result": _bytes},
    "unmerged": {"req": _int(0), "err": _int(0, _I31), "msg": _str(0, _MAX_TEXT)},
    "stats": {},
    "set": {"name": _str(1, _MAX_NAME), "value": _int(-_I63 - 1)},
    "wait": {"full_scans": _int(0), "timeout": _timeout},
    "welcome": {"v": _int(PROTOCOL_VERSION, PROTOCOL_VERSION), "page_size": _page_size},
    "merge": {"req": _int(0), "items": _bytes},
    "unmerge": {"req": _int(0), "items": _bytes},
    # merge at write time (Region.merge_now): the worker asks, the coordinator
    # answers once every merge it sent for the range is settled.  hashes: the
    # worker's XXH64 of each page (8 bytes a page, or empty), lookup hints only.
    "merge_now": {"req": _int(0), "rid": _int(0, _I31), "start": _int(0, _I31),
                  "npages": _int(1, 2**31), "hashes": _bytes},
    "merged_now": {"req": _int(0), "err": _int(0, _I31), "msg": _str(0, _MAX_TEXT)},
    # the coordinator's last word to a connection it does not admit, sent
    # (best effort) before it closes it: why, and whether trying again soon
    # may succeed (no place free now) or not (this uid is not allowed).
    "refused": {"msg": _str(0, _MAX_TEXT), "retry": _bool},
    "reply": {"ok": _bool, "data": _data, "error": _str(0, _MAX_TEXT)},
}
MESSAGE_TYPES = frozenset(_SCHEMA)

# (min, max) fds per type; anything unlisted carries none.
_FDS: dict[str, tuple[int, int]] = {"register": (2, 2), "welcome": (0, 1)}


_ITEM_COLUMNS = ("rid", "page", "npages", "slot", "page + npages")


def _check_items(t: str, b: bytes, slot_lo: int, slot_hi: int) -> None:
    q = items_from_bytes(b, t)
    n = len(q)
    if n > MAX_ITEMS:
        raise ProtocolError(f"{t}: {n} items, at most {MAX_ITEMS} allowed")
    if n == 0:
        return
    # Every column at once; the message names the first bad one.  page +
    # npages is a fifth column: it wraps below 0 past 2**63 (both are >= 0
    # unless an earlier column is bad), so an overflow is never in range.
    cols = np.column_stack((q, q[:, 1] + q[:, 2]))
    lo, hi = (0, 0, 1, slot_lo, 1), (_I31, _I63, _I63, slot_hi, 2**31)
    bad = (cols < lo) | (cols > hi)
    if bad.any():
        c = int(np.argmax(bad.any(axis=0)))
        i = int(np.argmax(bad[:, c]))
        raise ProtocolError(f"{t}: item {i}: {_ITEM_COLUMNS[c]} is {int(cols[i, c])}, "
                            f"must be in [{lo[c]}, {hi[c]}]")


def _validate(msg: Any, check_items: bool = True) -> str:
    """Check *msg* against the schema; return its type.  ``check_items``
    False: the items of a merge or unmerge were made by ``items_to_bytes``
    from the sender's own runs, and the receiver checks them anyway."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a map, got {type(msg).__name__}")
    t = msg.get("t")
    if not isinstance(t, str):
        raise ProtocolError(f"message type 't' must be a str, got {_short(t)}")
    fields = _SCHEMA.get(t)
    if fields is None:
        raise ProtocolError(f"unknown message type {_short(t)}")
    for key in fields:
        if key not in msg:
            raise ProtocolError(f"{t}: missing key {key!r}")
    if len(msg) != len(fields) + 1:
        extra = next(k for k in msg if k != "t" and k not in fields)
        raise ProtocolError(f"{t}: unexpected key {_short(extra)}")
    for key, check in fields.items():
        check(t, key, msg[key])
    if t == "advise" and msg["start"] + msg["npages"] > 2**31:
        raise ProtocolError(f"advise: start + npages must be <= 2**31, got "
                            f"{msg['start'] + msg['npages']}")
    elif t == "merge_now" and msg["start"] + msg["npages"] > 2**31:
        raise ProtocolError(f"merge_now: start + npages must be <= 2**31, got "
                            f"{msg['start'] + msg['npages']}")
    elif t == "merge_now" and len(msg["hashes"]) not in (0, 8 * msg["npages"]):
        raise ProtocolError(f"merge_now: hashes must be empty or 8 bytes a page "
                            f"({8 * msg['npages']}), got {len(msg['hashes'])}")
    elif t == "merged" and msg["result"].translate(None, b"\x00\x01"):
        raise ProtocolError("merged: result bytes must each be 0 or 1")
    elif t == "merge" and check_items:
        _check_items(t, msg["items"], -1, _I63)
    elif t == "unmerge" and check_items:
        _check_items(t, msg["items"], 0, 0)
    elif t == "reply" and msg["ok"] and msg["error"]:
        raise ProtocolError("reply: error must be '' when ok is true")
    return t


def _check_fd_count(t: str, n: int) -> None:
    lo, hi = _FDS.get(t, (0, 0))
    if not lo <= n <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise ProtocolError(f"{t}: expects {want} fds, got {n}")


def encode(msg: dict[str, Any], nfds: int | None = None, *, own_items: bool = False) -> bytes:
    """Validate *msg* (and, if given, the number of fds it travels with) and
    pack it; raise ProtocolError if invalid or too large.  ``own_items``: the
    items come from ``items_to_bytes`` of the sender's own runs (the
    coordinator's merge requests, one per merge_now chunk): they are not
    checked again here; the receiving worker checks every message."""
    _validate(msg, not own_items)
    if nfds is not None:
        _check_fd_count(msg["t"], nfds)
    try:
        data: bytes = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{msg['t']}: cannot pack: {e}") from None
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{msg['t']}: message is {len(data)} bytes, max {MAX_MESSAGE}")
    return data


def decode(data: bytes, fds: Sequence[int] = ()) -> dict[str, Any]:
    """Unpack and validate one received message that arrived with *fds*.

    On any problem raise ProtocolError and close every fd in *fds* (the caller
    must then not close them again). On success the fds stay the caller's.
    """
    try:
        if not isinstance(data, (bytes, bytearray)):
            raise ProtocolError(f"message must be bytes, got {type(data).__name__}")
        msg = _unpack(data)
        _check_fd_count(msg["t"], len(fds))
        return msg
    except BaseException:
        close_fds(fds)
        raise


def _unpack(data: bytes) -> dict[str, Any]:
    """Unpack and validate a message, leaving its fds aside."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message is {len(data)} bytes, max {MAX_MESSAGE}")
    try:
        msg: dict[str, Any] = msgpack.unpackb(   # a map: _validate checks it below
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=MAX_MESSAGE, max_str_len=MAX_MESSAGE,
            max_array_len=MAX_MESSAGE, max_map_len=MAX_MESSAGE // 2, max_ext_len=0)
    except Exception as e:  # any unpacker failure is the peer's fault
        raise ProtocolError(f"not a msgpack message: {type(e).__name__}: "
                            f"{str(e)[:100]}") from None
    _validate(msg)
    return msg


# --- items ------------------------------------------------------------------

def items_to_bytes(rows: Any) -> bytes:
    """``(rid, page, npages, slot)`` rows (an ``(n, 4)`` integer array, or a
    sequence of 4-sequences of ints) as the items of a message: little-endian
    int64 bytes."""
    try:
        a = np.asarray(rows, dtype="<i8")
    except (TypeError, ValueError, OverflowError) as e:
        raise ArgumentError(f"items must be int64 (rid, page, npages, slot) rows: {e}") from None
    if a.size == 0:
        return b""
    if a.ndim != 2 or a.shape[1] != 4:
        raise ArgumentError(f"an item is (rid, page, npages, slot), got rows of shape {a.shape}")
    return a.tobytes()


def items_from_bytes(b: bytes, t: str = "items") -> np.ndarray:
    """The items of a message as an ``(n, 4)`` int64 array of ``(rid, page,
    npages, slot)`` rows: a read-only view of ``b``, no copy.  Ranges are not
    checked here; :func:`decode` did that for a received message."""
    if len(b) % ITEM_SIZE:
        raise ProtocolError(f"{t}: items length {len(b)} is not a multiple of {ITEM_SIZE}")
    return np.frombuffer(b, "<i8").reshape(-1, 4)


# --- connection -------------------------------------------------------------

def _set_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, opt) < 2 * MAX_MESSAGE:
                sock.setsockopt(socket.SOL_SOCKET, opt, 2 * MAX_MESSAGE)
        except OSError:
            pass  # capped by net.core.*mem_max or refused: the default still fits


class Connection:
    """A connected SEQPACKET socket speaking this protocol.

    ``send`` may be called from several threads (it holds a lock); ``recv``
    is meant for one reader thread.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            raise ArgumentError("Connection needs an AF_UNIX SOCK_SEQPACKET socket")
        self._sock = sock
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._closed = False
        self._owner_pid = os.getpid()
        self._peer: tuple[int, int, int] | None = None
        _set_buffers(sock)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer(self) -> tuple[int, int, int]:
        """``(pid, uid, gid)`` of the peer as the kernel recorded it at connect."""
        if self._peer is None:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self._peer = struct.unpack("3i", raw)
        return self._peer

    def peer_pidfd(self) -> int:
        """A pidfd of the peer process as the kernel recorded it at connect
        (SO_PEERPIDFD, Linux 6.5): it names that process whatever pid
        namespace either side is in (where SO_PEERCRED says pid 0), and never
        a later process that reuses its pid.  Close-on-exec; the caller owns
        it.  Raises OSError (ENOPROTOOPT before Linux 6.5, ESRCH once the peer
        has exited, EMFILE)."""
        fd = self._sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        os.set_inheritable(fd, False)
        return fd

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, msg: dict[str, Any], fds: Sequence[int] = (), timeout: float | None = None) -> None:
        """Validate, encode and send *msg* with *fds* attached.

        A dead peer raises a ConnectionError (BrokenPipeError or
        ConnectionResetError); MSG_NOSIGNAL keeps SIGPIPE away even when the
        embedding program has not ignored it.  With *timeout*, a peer that
        takes nothing for that long (it stopped reading: its queue and our
        buffer are full) raises TimeoutError, nothing sent.
        """
        fds = list(fds)
        data = encode(msg, len(fds))
        if timeout is None:
            self._sendmsg(data, fds, 0)
            return
        deadline = time.monotonic() + timeout
        while not self.try_send(data, fds):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the peer took nothing for {timeout} s")
            p = select.poll()
            p.register(self._sock.fileno(), select.POLLOUT)
            p.poll(max(1, math.ceil(left * 1000)))

    def try_send(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send one message already encoded (``encode(msg, len(fds))``) without
        blocking; False, with nothing sent, when the socket's buffer or the
        peer's receive queue is full.  A SEQPACKET message goes whole or not
        at all, so framing and the attached fds stay together."""
        try:
            self._sendmsg(data, list(fds), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True

    def _sendmsg(self, data: bytes, fds: list[int], flags: int) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        with self._send_lock:
            if self._closed:
                raise ConnectionError("connection is closed")
            n = self._sock.sendmsg([data], anc, socket.MSG_NOSIGNAL | flags)
        if n != len(data):  # SEQPACKET is all-or-nothing; this would be a kernel surprise
            raise ConnectionError(f"short send: {n} of {len(data)} bytes")

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]] | None:
        """Receive one message and its fds; None on orderly EOF.

        Raises TimeoutError if nothing arrives within *timeout* seconds and
        ProtocolError (with every received fd closed) for a bad message. A
        zero-length message is indistinguishable from EOF and read as EOF.
        When this process has no descriptors left for the fds that came with a
        message, raises DescriptorShortageError (an OSError, EMFILE) holding
        the checked message, its fds closed: the sender did nothing wrong.
        """
        with self._recv_lock:
            if self._closed:
                raise ConnectionError("connection is closed")
            if timeout is not None:
                p = select.poll()
                p.register(self._sock, select.POLLIN)
                if not p.poll(max(0, math.ceil(timeout * 1000))):
                    raise TimeoutError(f"no message within {timeout} s")
            data, anc, flags, _ = self._sock.recvmsg(
                MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        bad = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array("i")
                a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
            else:
                bad = f"unexpected control message ({level}, {kind})"
        if flags & socket.MSG_CTRUNC and len(fds) < MAX_FDS and data and not flags & socket.MSG_TRUNC:
            # Room for MAX_FDS was given, fewer came: the kernel could not
            # install them (EMFILE).  Our shortage, not the peer's fault.
            close_fds(fds)
            e = DescriptorShortageError(errno.EMFILE, "descriptors sent with a message were "
                                                      "dropped: this process has none left")
            e.message = _unpack(data)
            raise e
        if flags & socket.MSG_CTRUNC:
            bad = f"more than {MAX_FDS} fds attached"
        elif flags & socket.MSG_TRUNC:
            bad = f"message larger than {MAX_MESSAGE} bytes"
        elif not data and fds:
            bad = "fds without a message"
        if bad is not None:
            close_fds(fds)
            raise ProtocolError(bad)
        if not data:
            return None
        return decode(data, fds), fds

    def shutdown(self) -> None:
        """Shut the socket down both ways without closing it: a thread blocked
        in ``recv`` sees EOF, one blocked in ``send`` an error, and the thread
        that owns the connection closes it.  Idempotent; a no-op in a forked
        child (the socket is shared with the parent)."""
        if self._closed or os.getpid() != self._owner_pid:
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._owner_pid:
            # shutdown wakes a thread blocked in recv; a forked child must not
            # do it, since the socket is shared with the parent.
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_peer(conn: Connection, allow_uids: set[int] | None = None,
               allow_gids: set[int] | None = None) -> tuple[int, int, int]:
    """Accept a peer with our uid or one in the allow-lists; return its creds.

    Root peers get no free pass: a root process can reach our memory anyway,
    and refusing it by default keeps the policy one rule.
    """
    pid, uid, gid = conn.peer
    if uid == os.getuid() or uid in (allow_uids or ()) or gid in (allow_gids or ()):
        return pid, uid, gid
    raise PeerRejectedError(f"peer pid {pid} uid {uid} gid {gid} is not allowed "
                            f"(this process runs as uid {os.getuid()})")


# --- socket paths -----------------------------------------------------------

def _private_dir(path: str) -> None:
    """Create *path* 0700 or make sure the existing one is ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    # lstat, not stat: a symlink here could redirect our socket anywhere
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PeerRejectedError(f"{path} is not a directory (a symlink?)")
    if st.st_uid != os.getuid():
        raise PeerRejectedError(f"{path} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise PeerRejectedError(f"{path} is accessible by group or others "
                                f"(mode {stat.S_IMODE(st.st_mode):o}), want 0700")


def default_socket_path(domain: str = "default") -> str:
    """Return the domain's socket path, creating its private directory."""
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise ArgumentError(f"domain must match [A-Za-z0-9_.-]{{1,64}} and not start "
                            f"with '.', got {_short(domain)}")
    uid = os.getuid()
    base = None
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.stat(xdg)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                base = os.path.join(xdg, "shmdedup")
        except OSError:
            pass
    if base is None:
        base = os.path.join(_RUNTIME_FALLBACK, f"shmdedup-{uid}")
    _private_dir(base)
    path = os.path.join(base, f"{domain}.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ArgumentError(f"socket path too long for AF_UNIX: {path}")
    return path


def _new_socket() -> socket.socket:
    # Python sockets are created close-on-exec (non-inheritable) already.
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _is_live(path: str) -> bool:
    probe = _new_socket()
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # EPROTOTYPE, EAGAIN, timeout...: something owns it
    finally:
        probe.close()
    return True


def listen(path: str, mode: int = 0o600) -> socket.socket:
    """Bind a listening SEQPACKET socket at *path* (mode 0600, backlog 1024).

    A stale socket file (nobody accepts on it) is replaced; a live one raises
    OSError(EADDRINUSE). A non-socket file at *path* is never removed. A wider
    *mode* (0660, 0666) lets other uids connect; SO_PEERCRED still decides
    whom the coordinator serves.
    """
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ArgumentError(f"socket mode must be an int in [0, 0o777], got {_short(mode)}")
    for _ in range(3):  # a rival coordinator may race us through unlink+bind
        sock = _new_socket()
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            if _is_live(path):
                raise OSError(errno.EADDRINUSE,
                              f"a coordinator is already listening on {path}") from None
            try:
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        try:
            # chmod before listen(): nobody can connect until listen anyway
            os.chmod(path, mode)
            _set_buffers(sock)
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock
    raise OSError(errno.EADDRINUSE, f"could not bind {path}: another process keeps taking it")


_UNAVAILABLE = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOTDIR,
                errno.EAGAIN, errno.EPROTOTYPE)


def connect(path: str, timeout: float | None = 5.0) -> Connection:
    """Connect to the coordinator at *path*.

    A full listen backlog (EAGAIN: the coordinator is busy, or flooded with
    connections) is retried until *timeout*.  Raises
    CoordinatorUnavailableError when nobody listens there (missing or stale
    file, a backlog still full at the timeout, timeout).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.005
    while True:
        sock = _new_socket()
        try:
            sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            sock.connect(path)
            sock.settimeout(None)
            return Connection(sock)
        except OSError as e:
            sock.close()
            if e.errno == errno.EAGAIN and (deadline is None or time.monotonic() + pause < deadline):
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            if isinstance(e, TimeoutError) or e.errno in _UNAVAILABLE:
                why = e.strerror or f"connect timed out after {timeout} s"
                raise CoordinatorUnavailableError(f"no coordinator at {path}: {why}") from None
            raise


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
