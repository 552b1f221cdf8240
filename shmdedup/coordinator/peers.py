"""The coordinator's view of its connections.

A ``Peer`` is one connection (worker or client) with what it registered and
what it was asked.  A ``Ghost`` is a worker that disconnected while perhaps
still alive: its slots stay held until its pidfd says the process exited
(DESIGN invariants 6-7: a slot is freed only when no live process can map it).
A ``SendQueue`` holds the messages a peer has not read yet: the coordinator's
one thread never waits for a peer (outbox.py).

The pidfd comes from the connection itself (SO_PEERPIDFD): it names the
process that connected even when that process is in another pid namespace
(SO_PEERCRED then says pid 0) and cannot be confused with a later process
reusing its pid; ``pidfd_open(pid)`` is the fallback on kernels before 6.5.
A worker the coordinator has no pidfd for (descriptors exhausted at accept,
or no pidfd at all) gets none of its regions merged: without one, nothing
could tell when its mappings are gone, so its slots could never be freed
safely (invariant 6).  Ghosts are matched to a process by its pidfd's inode
(pidfs, Linux 6.9) or else by a pid visible here (``process_key``).
"""

from __future__ import annotations

import errno
import os
import select
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shmdedup import protocol
from shmdedup._shm import close_fds
from shmdedup.coordinator.security import TokenBucket, fs_type
from shmdedup.coordinator.scan.tracking import RegionState, Run

PIDFS_MAGIC = 0x50494446


class SendQueue:
    """Encoded messages (with the fds they carry, owned here) waiting for a
    peer's socket to take them, in order."""

    def __init__(self) -> None:
        self.queue: deque[tuple[bytes, list[int]]] = deque()
        self.bytes: int = 0
        self.fds: int = 0

    def __len__(self) -> int:
        return len(self.queue)

    def push(self, data: bytes, fds: list[int]) -> None:
        self.queue.append((data, fds))
        self.bytes += len(data)
        self.fds += len(fds)

    def pop(self) -> None:
        """Forget the head (sent): close the fds it carried."""
        data, fds = self.queue.popleft()
        self.bytes -= len(data)
        self.fds -= len(fds)
        close_fds(fds)

    def clear(self) -> int:
        """Drop everything (the peer is gone); the number of fds closed."""
        n = self.fds
        while self.queue:
            self.pop()
        return n


@dataclass(eq=False)
class Peer:
    conn: protocol.Connection
    pid: int
    uid: int
    role: str | None = None
    regions: dict[int, RegionState] = field(default_factory=dict)
    # request id -> (kind: "merge" or "unmerge", its runs, deadline)
    requests: dict[int, tuple[str, list[Run], float]] = field(default_factory=dict)
    pages: int = 0
    bucket: TokenBucket | None = None
    refused: set[int] = field(default_factory=set)  # rids refused by a cap (not an offence)
    pidfd: int | None = None     # tells when the process has exited (None: cannot tell)
    key: Any = None              # the process, across connections (process_key)
    held: bool = False           # a client request awaits its reply (a wait, a run=2)
    # (msg, fds) sent behind it, handled after it
    queued: list[tuple[dict[str, Any], list[int]]] = field(default_factory=list)
    accepted_at: float = 0.0     # time.monotonic() at accept: the hello deadline runs from it
    client_only: bool = False    # admitted past max_connections: may only be a client
    unsent: SendQueue = field(default_factory=SendQueue)  # messages its socket has not taken
    # merge_now calls in progress: the worker's token -> what it waits for
    inline: dict[int, InlineCall] = field(default_factory=dict)
    merged_inline: int = 0       # pages merged by its merge_now calls (pages_merged_inline)


@dataclass(eq=False)
class InlineCall:
    """One merge_now call of a worker: the merge requests it waits for (its
    own, and scan merges already in flight for pages of its range), which of
    them it sent, and the error to report (ENOSPC) when it is answered.
    ``answered``: the answer went out right behind its own requests (it
    waits for nothing else), and the call stays only to count their replies."""
    waits: set[int]
    own: set[int]
    err: int = 0
    msg: str = ""
    answered: bool = False


@dataclass(eq=False)
class Ghost:
    """A worker that disconnected while perhaps still alive.  Its regions
    (detached in the scanner) and its unanswered merges keep their slots until
    its pidfd says it exited: it may still map them, and a freed slot is
    punched (its pages would read zeros) and then reused."""
    pid: int
    pidfd: int
    regions: list[RegionState]
    merges: list[list[Run]]      # its merge requests in flight, each a list of runs
    uid: int = -1                # whose quota its pidfd and regions are charged to
    key: Any = None              # the process (process_key)


_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def peer_pidfd(conn: protocol.Connection, pid: int) -> int | None:
    """A pidfd of the process at the other end of ``conn`` (SO_PEERPIDFD, or
    pidfd_open(pid) where that is missing), or None when there is none (it
    exited, or neither call works here).  Raises OSError when descriptors
    are short (EMFILE, ENFILE, ENOMEM): the caller may try again later."""
    try:
        return conn.peer_pidfd()
    except OSError as e:
        if e.errno in _SHORTAGE:
            raise
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno in _SHORTAGE:
            raise
        return None


def process_key(pid: int, pidfd: int | None) -> Any:
    """What identifies a worker's process across its connections: the
    inode of its pidfd on pidfs (one per process, any pid namespace), else
    its pid when visible here (> 0); None when neither can (every
    connection then gets a ghost of its own)."""
    if pidfd is not None:
        try:
            if fs_type(pidfd) == PIDFS_MAGIC:
                return ("pidfs", os.fstat(pidfd).st_ino)
        except OSError:
            pass
    return ("pid", pid) if pid > 0 else None


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError, ValueError):
        return None  # gone already, another pid namespace (pid 0), or no pidfd


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
