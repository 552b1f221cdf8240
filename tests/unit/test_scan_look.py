"""The scanner's look for the next chunk with something to do (scanner._look),
against real shm objects with the stand-in agents of test_steady_rescan: a
region advised in many runs, each over holes with unadvised data right after
it (the look walks one run at a time), costs a step per ``LOOK_RUNS`` runs,
not one step for all of them; the batch's CPU limit holds between steps, and
the scan still gets through and merges what follows."""

from __future__ import annotations

import os

from shmdedup import _shm
from shmdedup.coordinator.scan.scanner import LOOK_RUNS
from tests.unit.test_steady_rescan import P, Fleet, W


def test_a_step_walks_at_most_look_runs_runs_of_advice(fleet: Fleet) -> None:
    runs = 3 * LOOK_RUNS + 5
    n = 2 * runs + 2
    twin = os.urandom(P)
    reg = fleet.region(W(0, 1), os.urandom((n - 2) * P) + twin + twin)
    fleet.sc.advise(reg, 0, n, False)
    for k in range(runs):                     # page 2k: an advised hole; 2k + 1: unadvised data
        _shm.punch_hole(reg.backing_fd, 2 * k * P, P)
        fleet.sc.advise(reg, 2 * k, 1, True)
    fleet.sc.advise(reg, n - 2, 2, True)      # the twins at the end: advised data
    # Each run walked ends at the data page after it (2k + 1).
    assert fleet.sc._look(reg, 0, LOOK_RUNS) == (None, 2 * LOOK_RUNS - 1)
    assert fleet.sc._look(reg, 2 * LOOK_RUNS - 1, LOOK_RUNS) == (None, 4 * LOOK_RUNS - 1)
    assert fleet.sc._look(reg, 6 * LOOK_RUNS - 1, LOOK_RUNS) == (0, None)   # the twins' chunk
    assert fleet.sc._next_chunk(reg, 0) == 0                           # unbounded: one answer
    # Batches go on from where a look gave up; the twins merge in one full scan.
    steps = 0
    while fleet.sc.full_scans < 1:
        fleet.sc.batch(3000, 0.05)
        fleet.agents()
        steps += 1
        assert steps < 100
    assert fleet.sc.stats()["pages_sharing"] == 1
