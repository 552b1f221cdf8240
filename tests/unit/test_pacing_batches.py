"""Pacing (coordinator/pacing.py) with a fake clock: what the advisor is told a
full scan cost, and how many pages a batch covers and how long the next waits."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shmdedup.controls import CONTROLS
from shmdedup.coordinator import pacing as pacing_mod
from shmdedup.coordinator.pacing import MIN_BATCH_PAGES, MULTI_LANE_PERIOD, QUIET_STRETCH, Pacing
from shmdedup.coordinator.scan import advisor


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.cpu = 5.0

    def monotonic(self) -> float:
        return self.t

    def thread_time(self) -> float:
        return self.cpu


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> tuple[Pacing, dict[str, int], Any, Clock, list]:
    clock = Clock()
    monkeypatch.setattr(pacing_mod, "time", clock)
    samples: list[advisor.ScanSample] = []
    real = advisor.advise

    def spy(pages: int, sample: advisor.ScanSample, *args: Any) -> int:
        samples.append(sample)
        return real(pages, sample, *args)

    monkeypatch.setattr(pacing_mod.advisor, "advise", spy)
    controls = {name: spec[0] for name, spec in CONTROLS.items()}
    scanner = SimpleNamespace(pages_scanned=0, full_scans=0, stats=lambda: {}, lanes={0: None},
                              regions=[None], changes=0)
    activity = SimpleNamespace(full_scan=lambda *a, **k: None)
    p = Pacing(controls, scanner, activity)  # type: ignore[arg-type]
    return p, controls, scanner, clock, samples


def test_time_the_scan_could_not_run_is_not_the_first_scans(setup) -> None:
    """A coordinator that waits at run=0 (or with nothing to scan) for 60 s,
    then scans for 2 s: the advisor is told the scan took 2 s (it was told
    62 s, and raised pages_to_scan after a fast first scan)."""
    p, controls, scanner, clock, samples = setup
    p.idle(clock.t)
    clock.t += 60.0
    p.idle(clock.t)                      # still idle: the first idle moment counts
    p.batch_pages(clock.t)
    clock.t += 2.0
    clock.cpu += 0.5
    scanner.pages_scanned = 262144
    scanner.full_scans = 1
    p.full_scan_done()
    assert samples[-1].wall_s == pytest.approx(2.0)
    assert samples[-1].cpu_s == pytest.approx(0.5)
    assert controls["pages_to_scan"] < CONTROLS["pages_to_scan"][0]   # faster than the target: fewer
    # A stop in the middle of the next scan does not count either.
    p.batch_pages(clock.t)
    clock.t += 1.0
    p.idle(clock.t)
    clock.t += 30.0
    p.batch_pages(clock.t)
    clock.t += 1.0
    scanner.full_scans = 2
    p.full_scan_done()
    assert samples[-1].wall_s == pytest.approx(2.0)


def batch_after(p: Pacing, controls: dict[str, int], clock: Clock, pages: int = 500) -> int:
    """The pages of the batch that runs now, with pages_to_scan set to
    ``pages`` first (the advisor moves it at every full scan)."""
    controls["pages_to_scan"] = pages
    return p.batch_pages(clock.t)


def full_scan(p: Pacing, scanner: Any, clock: Clock, pages: int, changed: bool = True) -> None:
    """One batch that visits ``pages`` and ends a full scan (a converged
    domain: pages visited, none read, so pages_scanned stays); ``changed``:
    the scan found something to do (a domain still converging)."""
    p.batch_pages(clock.t)
    scanner.changes += int(changed)
    clock.t += 1.0
    p.batch_done(0.001, pages, ended=True)
    scanner.full_scans += 1
    p.full_scan_done()


def test_advisor_batches_are_big_and_keep_its_pace(setup) -> None:
    """A converged domain of 262144 pages, the advisor at a few hundred pages
    per 20 ms: one batch of MIN_BATCH_PAGES, that many sleeps later."""
    p, controls, scanner, clock, _ = setup
    assert batch_after(p, controls, clock) == 500            # no full scan yet: nothing to go by
    full_scan(p, scanner, clock, 262144)
    assert batch_after(p, controls, clock) == 500            # the first began before the region came
    full_scan(p, scanner, clock, 262144)
    controls["pages_to_scan"] = 500
    k = -(-MIN_BATCH_PAGES // 500)
    assert p.batch_pages(clock.t) == 500 * k
    p.batch_done(0.001)
    assert p.due() == pytest.approx(clock.t + k * controls["sleep_millisecs"] / 1000)
    # Big enough already: one batch, one sleep.
    controls["pages_to_scan"] = MIN_BATCH_PAGES + 1
    assert p.batch_pages(clock.t) == MIN_BATCH_PAGES + 1
    p.batch_done(0.001)
    assert p.due() == pytest.approx(clock.t + controls["sleep_millisecs"] / 1000)


def test_a_small_domain_keeps_its_quick_scans(setup) -> None:
    """64 pages: a batch ends at the end of the full scan anyway, so more
    sleeps would only space the scans out (a fresh merge took 1.3 s)."""
    p, controls, scanner, clock, _ = setup
    full_scan(p, scanner, clock, 64)
    assert batch_after(p, controls, clock) == 500
    full_scan(p, scanner, clock, 2000)
    assert batch_after(p, controls, clock) == 2000
    # A big domain whose big worker went: its last full scan says nothing
    # of what is left (a fresh merge waited 2.9 s for one long period),
    # nor does a full scan it left in the middle of.
    full_scan(p, scanner, clock, 262144)
    scanner.regions = []
    assert batch_after(p, controls, clock) == 500
    full_scan(p, scanner, clock, 262144)
    assert batch_after(p, controls, clock) == 500
    # A worker that came and went within one full scan: its pages are in
    # that scan's count, not in the next one.
    full_scan(p, scanner, clock, 64)
    full_scan(p, scanner, clock, 64)
    scanner.regions = [None, None]
    p.batch_pages(clock.t)
    scanner.regions = []
    full_scan(p, scanner, clock, 262144)
    assert batch_after(p, controls, clock) == 500


def test_with_several_uids_a_batch_period_stays_short(setup) -> None:
    """Another uid's small region is seen again at every batch: batches stay
    at most MULTI_LANE_PERIOD apart."""
    p, controls, scanner, clock, _ = setup
    scanner.lanes = {0: None, 1000: None}
    full_scan(p, scanner, clock, 0)
    full_scan(p, scanner, clock, 262144)
    controls["pages_to_scan"] = 500
    k = int(MULTI_LANE_PERIOD / (controls["sleep_millisecs"] / 1000))
    assert p.batch_pages(clock.t) == 500 * k
    p.batch_done(0.001)
    assert p.due() - clock.t <= MULTI_LANE_PERIOD + 1e-9


def test_manual_pages_to_scan_is_kept_as_ksmd_would(setup) -> None:
    """advisor_mode 0 (pages_to_scan set by hand): ksmd's pacing, unchanged."""
    p, controls, _, clock, _ = setup
    controls["advisor_mode"] = 0
    controls["pages_to_scan"] = 100
    assert p.batch_pages(clock.t) == 100
    p.batch_done(0.001)
    assert p.due() == pytest.approx(clock.t + controls["sleep_millisecs"] / 1000)


def test_a_quiet_domain_is_scanned_in_one_batch_per_full_scan(setup) -> None:
    """Converged and unchanging: after a full scan that found nothing to do,
    one batch covers the last full scan's pages, QUIET_STRETCH times the
    advisor's period apart (the advisor is told the period they stand for);
    the first change, or a wake, ends it."""
    p, controls, scanner, clock, samples = setup
    controls["pages_to_scan"] = 500
    sleep = controls["sleep_millisecs"] / 1000
    k = -(-MIN_BATCH_PAGES // 500)
    full_scan(p, scanner, clock, 262144)
    full_scan(p, scanner, clock, 262144)
    assert batch_after(p, controls, clock) == 500 * k               # the last scan merged: not quiet
    full_scan(p, scanner, clock, 262144, changed=False)
    controls["pages_to_scan"] = 500
    quiet = -(-262144 // 500) * QUIET_STRETCH
    # From the full scan that found nothing, the next batch comes a quiet
    # period later, not the few sleeps of a busy batch.
    assert p.due() >= clock.t + (quiet - 2 * QUIET_STRETCH) * sleep
    assert p.batch_pages(clock.t) == 500 * quiet
    clock.t += quiet * sleep
    p.batch_done(0.01, 262144, ended=True)
    assert p.due() == pytest.approx(clock.t + quiet * sleep)
    scanner.full_scans += 1
    p.full_scan_done()
    assert samples[-1].wall_s == pytest.approx(quiet * sleep / QUIET_STRETCH)
    assert batch_after(p, controls, clock) == 500 * quiet
    # A page written (or anything the scan finds to do) ends it at once.
    scanner.changes += 1
    assert p.batch_pages(clock.t) == 500 * k
    full_scan(p, scanner, clock, 262144, changed=False)      # that scan saw the change
    assert batch_after(p, controls, clock) == 500 * k
    full_scan(p, scanner, clock, 262144, changed=False)
    assert batch_after(p, controls, clock) == 500 * quiet
    # A client's wait ends it (and only then does a wait move the next batch).
    due = p.due()
    p.unquiet()
    assert p.due() < due and p.batch_pages(clock.t) == 500 * k
    p.batch_done(0.001, 500 * k)
    due = p.due()
    p.unquiet()
    assert p.due() == due
    full_scan(p, scanner, clock, 262144, changed=False)
    controls["pages_to_scan"] = 500
    full_scan(p, scanner, clock, 262144, changed=False)
    assert batch_after(p, controls, clock) == 500 * quiet
    # A wake (a control set, a range advised) ends it too, until a full scan
    # that began after it found nothing.
    p.wake()
    assert p.batch_pages(clock.t) == 500 * k
    full_scan(p, scanner, clock, 262144, changed=False)
    assert batch_after(p, controls, clock) == 500 * k
    full_scan(p, scanner, clock, 262144, changed=False)
    assert batch_after(p, controls, clock) == 500 * quiet


def test_a_quiet_domain_with_several_uids_keeps_the_short_period(setup) -> None:
    p, controls, scanner, clock, samples = setup
    scanner.lanes = {0: None, 1000: None}
    for _ in range(3):
        full_scan(p, scanner, clock, 262144, changed=False)
    controls["pages_to_scan"] = 500
    k = int(MULTI_LANE_PERIOD / (controls["sleep_millisecs"] / 1000))
    assert p.batch_pages(clock.t) == 500 * k
    # Nor is the advisor told a quarter of their time: they were not stretched.
    full_scan(p, scanner, clock, 262144, changed=False)
    assert samples[-1].wall_s == pytest.approx(1.0)


def test_a_batch_cut_short_is_followed_at_the_pace_of_what_it_visited(setup) -> None:
    """A quiet domain's one batch, cold after a long sleep, may end at its CPU
    limit: the rest of the full scan follows after as many sleeps as the pages
    it visited stand for, not a whole period later (the full scan keeps the
    advisor's time)."""
    p, controls, scanner, clock, _ = setup
    sleep = controls["sleep_millisecs"] / 1000
    for _ in range(3):
        full_scan(p, scanner, clock, 262144, changed=False)
    controls["pages_to_scan"] = 500
    quiet = -(-262144 // 500) * QUIET_STRETCH
    assert p.batch_pages(clock.t) == 500 * quiet
    p.batch_done(0.05, 100000)
    assert p.due() == pytest.approx(clock.t + 200 * sleep)
    # The batch that ends the full scan is followed a whole quiet period
    # later: the next full scan does not begin at once.
    assert p.batch_pages(clock.t) == 500 * quiet
    p.batch_done(0.05, 162144, ended=True)
    assert p.due() == pytest.approx(clock.t + quiet * sleep)
