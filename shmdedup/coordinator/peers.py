"""The coordinator's view of its connections.

A ``Peer`` is one connection (worker or client) with what it registered and
what it was asked.  A ``Ghost`` is a worker that disconnected while perhaps
still alive: its slots stay held until its pidfd says the process exited
(DESIGN invariants 6-7: a slot is freed only when no live process can map it).
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass, field

from shmdedup import protocol
from shmdedup.coordinator.security import TokenBucket
from shmdedup.coordinator.scan.tracking import RegionState


@dataclass(eq=False)
class Peer:
    conn: protocol.Connection
    pid: int
    uid: int
    role: str | None = None
    regions: dict[int, RegionState] = field(default_factory=dict)
    requests: dict[int, tuple[str, list, float]] = field(default_factory=dict)
    pages: int = 0
    bucket: TokenBucket | None = None
    refused: set[int] = field(default_factory=set)  # rids refused by a cap (not an offence)
    pidfd: int | None = None     # tells when the process has exited (None: cannot tell)
    # merge_now calls in progress: the worker's token -> what it waits for
    inline: dict[int, InlineCall] = field(default_factory=dict)
    merged_inline: int = 0       # pages merged by its merge_now calls (pages_merged_inline)


@dataclass(eq=False)
class InlineCall:
    """One merge_now call of a worker: the merge requests it waits for (its
    own, and scan merges already in flight for pages of its range), which of
    them it sent, and the error to report (ENOSPC) when it is answered."""
    waits: set[int]
    own: set[int]
    err: int = 0
    msg: str = ""


@dataclass(eq=False)
class Ghost:
    """A worker that disconnected while perhaps still alive.  Its regions
    (detached in the scanner) and its unanswered merges keep their slots until
    its pidfd says it exited: it may still map them, and a freed slot is
    punched (its pages would read zeros) and then reused."""
    pid: int
    pidfd: int
    regions: list[RegionState]
    merges: list


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
