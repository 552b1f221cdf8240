"""Socket activation: a listening socket handed over by systemd (or any
service manager speaking the same protocol, see sd_listen_fds(3)).

The manager binds the domain's socket itself (a ``.socket`` unit with
``ListenSequentialPacket=``), starts the coordinator on the first connection
and passes the socket as descriptor 3 onwards, with ``LISTEN_PID`` (our pid)
and ``LISTEN_FDS`` (how many) in the environment.  Connections that arrive
while no coordinator runs (before the first start, across a restart) wait in
the socket's backlog instead of being refused.

Only a descriptor that is an AF_UNIX SOCK_SEQPACKET socket, listening, and
bound at the coordinator's own socket path is taken: an application that
embeds a coordinator may have been activated for sockets of its own.  The
socket's file, owner and mode are the manager's (``SocketMode=``,
``SocketUser=``, ``SocketGroup=``): the coordinator neither chmods nor
unlinks a socket it inherited.
"""

from __future__ import annotations

import logging
import os
import socket

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _bound_at(sock: socket.socket, path: str) -> bool:
    try:
        name = sock.getsockname()
    except OSError:
        return False
    if not name or not isinstance(name, (str, bytes)):
        return False  # unnamed, or in the abstract namespace
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    try:
        return os.path.samefile(name, path)
    except OSError:
        return False  # our path or theirs is gone: not the same socket


def _ours(sock: socket.socket, path: str) -> bool:
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False
    return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET
            and listening and _bound_at(sock, path))


def inherited_listener(path: str) -> socket.socket | None:
    """The listening socket passed to this process for *path*, or None.

    None when the environment passes nothing to this process (no
    ``LISTEN_FDS``, or a ``LISTEN_PID`` that is not ours: a variable inherited
    from a parent), or when no passed descriptor is our socket; those are
    left alone.  The socket taken is made close-on-exec, and the variables
    are removed (as ``sd_listen_fds(1)`` does) so that no child of ours takes
    them for its own.
    """
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return None
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + max(0, min(count, 64))):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # closed, or not a socket
        if not _ours(sock, path):
            sock.detach()  # someone else's: leave the descriptor open
            continue
        sock.set_inheritable(False)
        for name in _ENV:
            os.environ.pop(name, None)
        log.info("listening on %s, passed by the service manager (fd %d)", path, fd)
        return sock
    log.warning("LISTEN_FDS=%d passed no listening SOCK_SEQPACKET socket bound at %s; "
                "binding it here", count, path)
    return None


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
