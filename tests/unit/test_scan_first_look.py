"""The scanner's first look at a new or changed page (scanner._visit,
Matcher.cmp_stable), against real shm objects with the stand-in agents of
test_steady_rescan: such a page merges at that visit onto an equal stable
page (Linux searches the stable tree before its checksum test); a new page
goes on to the unstable index at once, a changed one only at its next
unchanged visit (amendment 15)."""

from __future__ import annotations

import os

from shmdedup.coordinator.scan.tracking import MERGED
from tests.unit.test_steady_rescan import P, Fleet, W

N = 600


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


def test_new_twins_merge_at_their_first_visit(fleet: Fleet) -> None:
    """A page seen for the first time goes on to the unstable index at once
    (amendment 15): two new twins merge in one full scan, not two."""
    data = os.urandom(N * P)
    fleet.region(W(0, 1), data)
    fleet.region(W(0, 2), data)
    fleet.full_scans(1)
    s = fleet.sc.stats()
    assert s["pages_sharing"] == N and s["pages_shared"] == N


def test_changed_twins_still_wait_for_a_second_unchanged_visit(fleet: Fleet) -> None:
    """The two-visit rule still keeps a page that changed since its last
    visit out of the unstable index until its checksum holds."""
    a = fleet.region(W(0, 1), os.urandom(N * P))
    b = fleet.region(W(0, 2), os.urandom(N * P))
    fleet.full_scans(1)                            # unique: in the unstable index
    assert fleet.sc.stats()["pages_sharing"] == 0
    twin = os.urandom(P)
    fleet.write(a, 5, twin)
    fleet.write(b, 7, twin)
    fleet.full_scans(1)                            # changed: recorded only
    assert fleet.sc.stats()["pages_sharing"] == 0
    fleet.full_scans(1)                            # unchanged since: they merge
    s = fleet.sc.stats()
    assert s["pages_sharing"] == 1 and s["pages_shared"] == 1
    assert a.status[5] == MERGED and b.status[7] == MERGED and a.slot[5] == b.slot[7]
