"""The advice of a merge_now call travels with its requests: a registration
of the region while the call runs (its first message, or a reconnect) leaves
out the part of the range not requested yet, so no advise message wakes the
coordinator's scan for pages the call is about to merge itself; and however
the call ends, the advice of the part it never requested is sent."""

from __future__ import annotations

from typing import Any

import pytest

from shmdedup.worker import agent as _agent
from shmdedup.worker.region import PAGE_SIZE, Region
from tests.helpers import no_shm_leftovers, reaper  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")


class FakeConn:
    """Records what the agent sends; answers merge_now requests (all merged)
    unless told not to, and may re-register the region on a request (a
    reconnect while the call waits)."""

    def __init__(self, agent: _agent.Agent, answer: bool = True,
                 reregister: Region | None = None) -> None:
        self.agent, self.answer, self.reregister = agent, answer, reregister
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any], fds: list[int], timeout: float | None = None) -> None:
        self.sent.append({k: v for k, v in msg.items() if k != "hashes"})
        if msg["t"] != "merge_now":
            return
        if self.reregister is not None:
            region, self.reregister = self.reregister, None
            self.agent.registered.discard(region.id)
            self.agent._register(region)
        if self.answer:
            w = self.agent._inline[msg["req"]]
            w.merged = w.n
            w.done.set()

    def close(self) -> None:
        pass


def advised(sent: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(m["start"], m["npages"]) for m in sent if m["t"] == "advise"]


@pytest.fixture
def agent():
    a = _agent.Agent()
    a._stopping = True               # no thread, no real connection
    a.connected.set()
    yield a


@pytest.fixture
def region():
    r = Region(8 * PAGE_SIZE)
    yield r
    r.close()


def test_the_first_request_registers_without_the_calls_range(agent, region) -> None:
    region.set_mergeable(0, 1)       # advised before the call: sent with the registration
    agent.conn = conn = FakeConn(agent)
    assert agent.merge_now(region, 2, 4) == 4
    assert [m["t"] for m in conn.sent] == ["register", "advise", "merge_now"]
    assert advised(conn.sent) == [(0, 1)]
    assert region.advice_runs() == [(0, 1), (2, 4)]      # advised here all the same
    assert agent._unsent == {}


def test_a_call_that_ends_early_sends_the_advice_of_what_it_did_not_request(
        agent, region, monkeypatch) -> None:
    monkeypatch.setattr(_agent, "MERGE_NOW_PAGES", 2)
    monkeypatch.setattr(_agent, "MERGE_NOW_TIMEOUT", 0.05)
    # No answer to the first request (a stalled coordinator); meanwhile the
    # connection is registered again: its advice has the requested chunk,
    # not the rest.
    agent.conn = conn = FakeConn(agent, answer=False, reregister=region)
    assert agent.merge_now(region, 1, 6) == 0
    kinds = [m["t"] for m in conn.sent]
    assert kinds == ["register", "merge_now", "register", "advise", "advise"], conn.sent
    assert conn.sent[1]["start"] == 1 and conn.sent[1]["npages"] == 2
    assert advised(conn.sent) == [(1, 2), (3, 4)]
    assert agent._unsent == {}


def test_concurrent_calls_leave_each_others_unsent_ranges_to_each_other(agent, region) -> None:
    agent.conn = conn = FakeConn(agent)
    other = [0, 8]                   # another call of the same region, not sent yet
    agent._unsent[region.id] = [other]
    region.set_mergeable(0, 8)
    assert agent.merge_now(region, 2, 2) == 2
    assert advised(conn.sent) == []  # the registration left out both calls' ranges
    assert agent._unsent == {region.id: [other]}
    assert region.advice_runs(without=[(0, 3)]) == [(3, 5)]
    assert region.advice_runs(2, 4, without=[(3, 4)]) == [(2, 1), (4, 2)]
