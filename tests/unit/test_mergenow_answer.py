"""When a merge_now call is answered, and what a stats request sees after it.

The coordinator answers a call right behind its own merge requests (the
worker's agent reads them in order, so the call returns once they are
applied); the call stays until their replies are counted.  A call that also
waits for a scan merge already in flight is answered once everything it
waits for is settled.  A stats request reads the replies of answered calls
first.  Across real processes: tests/integration/test_merge_now.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from shmdedup.coordinator.mergenow import MergeNow
from shmdedup.coordinator.peers import InlineCall
from shmdedup.coordinator.server import CoordinatorServer


class FakeOutbox:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, dict[str, Any]]] = []

    def send(self, peer: Any, msg: dict[str, Any], fds: Any = None, own_items: bool = False) -> bool:
        self.sent.append((peer, msg))
        return True


def make() -> tuple[MergeNow, FakeOutbox]:
    out = FakeOutbox()
    return MergeNow({"run": 1}, None, None, None, out), out   # type: ignore[arg-type]


def worker() -> Any:
    return SimpleNamespace(inline={}, merged_inline=0)


def test_an_answered_call_is_counted_at_its_reply_and_not_answered_twice() -> None:
    m, out = make()
    w = worker()
    w.inline[7] = InlineCall({11}, {11}, answered=True)
    assert m.unsettled([w]) == [w]
    m.settle(w, 11, b"\x01\x01\x00\x01")
    assert w.inline == {} and out.sent == []
    assert w.merged_inline == 3 and m.pages_merged == 3
    assert m.unsettled([w]) == []


def test_a_call_waiting_for_a_scan_merge_is_answered_when_both_are_settled() -> None:
    m, out = make()
    w = worker()
    w.inline[8] = InlineCall({5, 12}, {12})        # 5: the scan's merge of pages of the range
    assert m.unsettled([w]) == []                  # not answered yet: nothing to read first
    m.settle(w, 12, b"\x01\x01")
    assert out.sent == [] and 8 in w.inline
    m.settle(w, 5, b"\x01")                        # the scan's pages are not the call's
    assert out.sent == [(w, {"t": "merged_now", "req": 8, "err": 0, "msg": ""})]
    assert w.merged_inline == 2 and w.inline == {}


def test_stats_read_the_replies_of_answered_calls_first() -> None:
    m, _ = make()
    settled, busy, idle = worker(), worker(), worker()
    busy.inline[1] = InlineCall({3}, {3}, answered=True)
    idle.inline[2] = InlineCall({4, 9}, {9})
    order: list[Any] = []
    server = SimpleNamespace(
        merge_now=m, peers={10: settled, 11: busy, 12: idle},
        inbox=SimpleNamespace(readable=lambda p: order.append(("read", p))),
        surface=SimpleNamespace(on_stats=lambda peer, msg, fds: order.append(("stats", peer))))
    client = object()
    CoordinatorServer._on_stats(server, client, {"t": "stats"}, [])  # type: ignore[arg-type]
    assert order == [("read", busy), ("stats", client)]
