"""``pages_inherited`` (coordinator/scan/tracking.py ``count_inherited``):
pages merged by a previous coordinator exist only from a region's
registration on, and only fewer later.  A statistics request used to read
every state byte of every merged page to count them (1-20 ms a request at
1-8 GiB); once a region has none left it is not read for them again."""

from __future__ import annotations

import os
from typing import Any

from shmdedup import _native
from shmdedup.coordinator.scan import tracking
from tests.unit.test_steady_rescan import P, Fleet, W

N = 600


def test_a_region_without_inherited_pages_is_not_read_for_them_again(fleet: Fleet, monkeypatch) -> None:
    data = os.urandom(N * P)
    a = fleet.region(W(0, 1), data)
    fleet.region(W(0, 2), data)
    fleet.converge()
    s = fleet.sc.stats()
    assert s["pages_sharing"] == N and s["pages_inherited"] == 0
    assert not a.inherits

    def no_read(reg: Any) -> Any:
        raise AssertionError("state bytes read for inherited pages")
    monkeypatch.setattr(tracking, "_inherited_pieces", no_read)
    assert fleet.sc.stats()["pages_inherited"] == 0
    assert len(tracking.inherited_pages(a)) == 0


def test_inherited_pages_are_counted_until_the_last_one_is_broken(fleet: Fleet) -> None:
    data = os.urandom(N * P)
    # A region whose first 40 pages a previous coordinator merged: MERGED
    # state bytes, backing punched (written here before this scanner first
    # looks at the region, as they are before a real worker registers).
    old = bytearray(data)
    old[:40 * P] = bytes(40 * P)
    c = fleet.region(W(0, 3), bytes(old))
    os.pwrite(c.meta_fd, bytes([_native.MERGED]) * 40, 0)
    assert fleet.sc.stats()["pages_inherited"] == 40
    fleet.full_scans(2)
    assert fleet.sc.stats()["pages_inherited"] == 40 and c.inherits
    for page in range(40):                         # the worker writes them: breaks
        fleet.write(c, page, data[page * P:(page + 1) * P])
    assert fleet.sc.stats()["pages_inherited"] == 0
    assert not c.inherits
