"""run=2 (``coordinator/unmergeall.py``) through its phases, with the real
request tracker and a recording outbox and scanner (the end-to-end behaviour
is tested across processes in tests/integration: test_coordinator.py
``test_run2_*``, test_replies.py, test_cli.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from shmdedup import protocol
from shmdedup.coordinator.inflight import RequestTracker
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.scan.tracking import Run
from shmdedup.coordinator.unmergeall import Phase, UnmergeAll


class Outbox:
    """Records what the parts send instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[tuple[Peer, dict[str, Any]]] = []
        self.replies: list[tuple[Peer, bool, Any, str]] = []
        self.unheld: list[Peer] = []

    def send(self, peer: Peer, msg: dict[str, Any], fds: list[int] | None = None,
             own_items: bool = False) -> bool:
        self.sent.append((peer, msg))
        return True

    def reply(self, peer: Peer, ok: bool, data: Any = None, error: str = "") -> None:
        self.replies.append((peer, ok, data, error))

    def unhold(self, peer: Peer) -> None:
        self.unheld.append(peer)


class Region:
    def __init__(self, rid: int) -> None:
        self.rid = rid


class Scanner:
    """What the scanner says is merged, per region (as runs); what it was told."""

    def __init__(self) -> None:
        self.merged: dict[Any, list[tuple[Any, int, int, int]]] = {}
        self.resets: list[bool] = []

    def merged_items(self, reg: Any) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        """As the scanner's: (region, pages, slots) arrays."""
        return [(r, np.arange(first, first + n), np.arange(slot, slot + n))
                for r, first, n, slot in self.merged.get(reg, [])]

    def reset_after_unmerge(self, ok: bool) -> None:
        self.resets.append(ok)


@pytest.fixture
def parts() -> Iterator[SimpleNamespace]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = Peer(protocol.Connection(a), 100, 0, role="worker")
    client = Peer(protocol.Connection(c), 200, 0, role="client")
    reg = Region(1)
    worker.regions[1] = reg  # type: ignore[assignment]
    peers = {a.fileno(): worker, c.fileno(): client}
    outbox, scanner = Outbox(), Scanner()
    controls = {"run": 2}
    requests = RequestTracker(peers, outbox)  # type: ignore[arg-type]
    ua = UnmergeAll(peers, controls, scanner, requests, outbox)  # type: ignore[arg-type]
    yield SimpleNamespace(worker=worker, client=client, reg=reg, outbox=outbox, scanner=scanner,
                          controls=controls, requests=requests, ua=ua)
    for s in (a, b, c, d):
        s.close()


def _sent(p: SimpleNamespace, kind: str) -> list[int]:
    return [m["req"] for peer, m in p.outbox.sent if m["t"] == kind]


def test_with_nothing_merged_it_ends_at_once(parts: SimpleNamespace) -> None:
    p = parts
    p.ua.start(p.client)
    assert p.ua.phase is Phase.IDLE and not p.ua.active
    assert p.outbox.replies == [(p.client, True, {"run": 2}, "")]
    assert p.outbox.unheld == [p.client]
    assert p.scanner.resets == [True]


def test_merges_in_flight_are_drained_then_unmerged(parts: SimpleNamespace) -> None:
    p = parts
    p.scanner.merged[p.reg] = [(p.reg, 0, 4, 10)]
    in_flight = p.requests.send(p.worker, "merge", [Run(p.reg, 8, 2, 20)])   # sent before run=2
    p.ua.start(p.client)
    assert p.ua.phase is Phase.UNMERGING
    [unmerge] = _sent(p, "unmerge")
    p.requests.take(p.worker, unmerge, "unmerge")
    p.ua.unmerge_answered(unmerge, None)
    assert p.ua.phase is Phase.DRAINING and p.outbox.replies == []
    # The merge lands: what it merged is unmerged in turn.
    p.scanner.merged[p.reg] = [(p.reg, 8, 2, 20)]
    p.requests.take(p.worker, in_flight[0], "merge")
    p.ua.merge_landed(p.worker)
    assert p.ua.phase is Phase.UNMERGING
    again = _sent(p, "unmerge")[-1]
    assert again != unmerge
    p.requests.take(p.worker, again, "unmerge")
    p.ua.unmerge_answered(again, None)
    assert p.ua.phase is Phase.IDLE
    assert p.outbox.replies == [(p.client, True, {"run": 2}, "")]
    assert p.scanner.resets == [True]


def test_a_failed_unmerge_leaves_run_0_and_says_why(parts: SimpleNamespace) -> None:
    p = parts
    p.scanner.merged[p.reg] = [(p.reg, 0, 4, 10)]
    p.ua.start(p.client)
    [unmerge] = _sent(p, "unmerge")
    p.requests.take(p.worker, unmerge, "unmerge")
    p.ua.unmerge_answered(unmerge, "unmerge in pid 100 failed: No space left on device")
    assert p.ua.phase is Phase.IDLE
    assert p.controls["run"] == 0
    assert p.ua.last_error.startswith("unmerge in pid 100 failed")
    assert p.outbox.replies == [(p.client, False, None, p.ua.last_error)]
    assert p.scanner.resets == [False]


def test_a_worker_gone_takes_its_requests_and_a_client_gone_is_not_answered(
        parts: SimpleNamespace) -> None:
    p = parts
    p.scanner.merged[p.reg] = [(p.reg, 0, 4, 10)]
    p.ua.start(p.client)
    p.ua.client_gone(p.client)
    assert p.ua.phase is Phase.UNMERGING
    p.ua.forget_requests(p.worker.requests)
    p.worker.requests.clear()
    p.ua.client_gone(p.worker)
    assert p.ua.phase is Phase.IDLE
    assert p.outbox.replies == [] and p.scanner.resets == [True]
