"""The scanner's first look at a new or changed page (scanner._visit,
Matcher.cmp_stable), against real shm objects with the stand-in agents of
test_steady_rescan: such a page merges at that visit onto an equal stable
page (Linux searches the stable tree before its checksum test), while the
unstable index still takes a page only at its second unchanged visit."""

from __future__ import annotations

import os
from typing import Any

import pytest

from shmdedup.coordinator.scan.tracking import MERGED
from tests.unit.test_steady_rescan import P, Fleet, W

N = 600


@pytest.fixture
def fleet() -> Any:
    f = Fleet()
    yield f
    f.close()


def test_new_and_changed_pages_merge_onto_stable_pages_at_one_visit(fleet: Fleet) -> None:
    data = os.urandom(N * P)
    fleet.region(W(0, 1), data)
    fleet.region(W(0, 2), data)
    fleet.converge()
    assert fleet.sc.stats()["pages_sharing"] == N
    late = fleet.region(W(0, 3), data)             # a late worker: every page new
    changed = fleet.region(W(0, 4), os.urandom(N * P))
    fleet.full_scans(1)                            # one visit each
    assert fleet.sc.stats()["pages_sharing"] == 2 * N
    assert all(late.status[:N] == MERGED)
    fleet.full_scans(1)                            # the other's pages: unique and steady
    fleet.write(changed, 5, data[9 * P:10 * P])    # now equal to a stable page
    fleet.full_scans(1)
    s = fleet.sc.stats()
    assert s["pages_sharing"] == 2 * N + 1 and s["pages_shared"] == N
    assert changed.status[5] == MERGED and changed.slot[5] == late.slot[9]


def test_two_new_twins_still_wait_for_their_second_visit(fleet: Fleet) -> None:
    data = os.urandom(N * P)
    fleet.region(W(0, 1), data)
    fleet.region(W(0, 2), data)
    fleet.full_scans(1)                            # first visits: recorded only
    assert fleet.sc.stats()["pages_sharing"] == 0
    fleet.full_scans(1)
    assert fleet.sc.stats()["pages_sharing"] == N
