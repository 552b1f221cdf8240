"""When the coordinator's next scan batch runs, and what a full scan costs.

``Pacing`` is the part of the server (``server.py``) that times the scan;
it runs in the coordinator's single thread.

* A batch runs ``sleep_millisecs`` after the previous one (ksmd's pacing),
  or at once when something changes what it would do (``wake``: a control
  set, a range advised).
* With the scan-time advisor on (``advisor_mode`` 1), the next batch also
  waits until the scan's CPU is within ``advisor_max_cpu`` percent, and each
  full scan's cost sets ``pages_to_scan`` (``scan/advisor.py``).
* With the advisor on, batches are few and big: when the advisor asks for
  fewer than ``MIN_BATCH_PAGES`` pages per ``sleep_millisecs``, k of its
  batches run as one, k sleeps apart, so the pace (pages per second) is the
  advisor's and a wakeup's cost is paid once per k.  That cost is most of
  a converged domain's: a process that slept runs its first milliseconds
  of Python several times slower (measured here: 0.57 ms of work costs
  2.7 ms after 0.66 s asleep), and the advisor asks for a few hundred pages
  per 20 ms.  k stops where a batch would cover more than the last full
  scan visited (a batch ends at the end of a full scan: a small domain keeps
  its quick scans; after a worker or region went, one batch at a time until
  the next full scan), and with more than one lane (uid) where k sleeps pass
  ``MULTI_LANE_PERIOD``: a uid with few pages is seen again at every batch
  while another uid's many are scanned, and its fresh pages must not wait
  for long batches of the other's.
* A quiet domain is scanned in one batch per full scan, ``QUIET_STRETCH``
  times slower.  Once a whole full scan found nothing to do (no page seen
  first or changed, no merge or unmerge queued, no merged page broken:
  ``Scanner.changes``) and nothing woke the scan meanwhile, the advisor's
  batches are joined up to the last full scan's pages, not only to
  ``MIN_BATCH_PAGES``, and the batch that covers them all comes
  ``QUIET_STRETCH`` times the advisor's period later: one wakeup per full
  scan instead of one per ``MIN_BATCH_PAGES``, and fewer full scans.  What
  a wakeup costs grows far more slowly than the sleep before it (measured
  here: 4.3 ms of CPU for the same work after 0.66 s asleep, 8.7 ms after
  10 s).  The advisor is told a quiet scan's time divided by
  ``QUIET_STRETCH``: it keeps steering the busy pace to its target.
  The first change (a page written, a merge found, a control set, a range
  advised, a region registered, a client's ``wait`` for full scans) ends
  it at the next batch, so a page written into a quiet domain is seen at
  most ``QUIET_STRETCH`` advisor periods later (ksmd at its defaults takes
  ~52 s a full scan of 1 GiB), and a changed page's second visit comes
  at the advisor's pace.  With several lanes the ``MULTI_LANE_PERIOD``
  bound still holds (no stretch), and so does the batch's CPU limit.
* A full scan's time, which the advisor steers, counts only while the scan
  could run: not while ``run`` is not 1 or there is nothing to scan (at start
  before the first region, after ``run=0``).
* At the end of a full scan, the heap's free memory is given back.
"""

from __future__ import annotations

import time

from shmdedup import _native
from shmdedup.coordinator.activity import Activity
from shmdedup.coordinator.scan import advisor
from shmdedup.coordinator.scan.scanner import Scanner

TRIM_AFTER_SCAN = 0.1           # s: a full scan this long gives the heap back at its end
TRIM_INTERVAL = 1.0             # s: shorter ones, at most this often
MIN_BATCH_PAGES = 16384         # with the advisor on: pages per batch, at least (see above)
MULTI_LANE_PERIOD = 0.25        # s: the longest batch period then, with several lanes
QUIET_STRETCH = 4               # a quiet domain's full scans take this many advisor periods


class Pacing:
    """The time of the next batch, and the bookkeeping of full scans."""

    def __init__(self, controls: dict[str, int], scanner: Scanner, activity: Activity) -> None:
        self.controls = controls
        self.scanner = scanner
        self.activity = activity
        self._next_batch = 0.0
        # advisor_max_cpu: no batch before this (see batch_done), and when
        # the previous batch ended.
        self._cpu_gate = 0.0
        self._batch_end = time.monotonic()
        self._scan_mark = (time.monotonic(), time.thread_time(), 0)
        self._idle_since: float | None = None     # the scan could not run since then
        self._batches = 1                         # advisor batches the last batch stood for
        self._scan_pages = 0                      # pages the last full scan visited
        self._visited = 0                         # pages the current one has visited so far
        self._scan_shape = (0, 0)                 # (lanes, regions) at its end, the current one's start
        self._reshaped = False                    # they changed during the current one
        self._last_trim = 0.0
        self._changes = 0                         # Scanner.changes at the last full scan's end
        self._quiet = False                       # that full scan found nothing to do
        self._stirred = False                     # woken since the current full scan began
        self._quiet_scan = False                  # the current full scan began quiet

    def due(self) -> float:
        """When the next batch may run (time.monotonic())."""
        return max(self._next_batch, self._cpu_gate)

    def wake(self) -> None:
        """The next batch may run now (what it would do changed)."""
        self._next_batch = min(self._next_batch, time.monotonic())
        self._quiet, self._stirred = False, True

    def unquiet(self) -> None:
        """End a quiet domain's stretched pace now (a client waits for full
        scans); otherwise nothing: a wait does not hurry a busy scan."""
        if self._quiet:
            self.wake()

    def idle(self, now: float) -> None:
        """The scan cannot run now (``run`` is not 1, or nothing to scan):
        this time is not the current full scan's."""
        if self._idle_since is None:
            self._idle_since = now

    def batch_pages(self, now: float) -> int:
        """Pages for the batch that runs now: ``pages_to_scan``, or with the
        advisor on, as many of its batches as make ``MIN_BATCH_PAGES``, no
        more than the last full scan visited (all of it in a quiet domain),
        and with several lanes no more than ``MULTI_LANE_PERIOD`` of sleeps."""
        if self._idle_since is not None:
            t0, cpu0, pages0 = self._scan_mark
            self._scan_mark = (t0 + (now - self._idle_since), cpu0, pages0)
            self._idle_since = None
        # The last full scan's size holds while its lanes and regions do;
        # after a change (a worker gone, a region closed) it may be far too
        # big: one batch at a time until a full scan that saw none says.
        if self._shape() != self._scan_shape:
            self._reshaped = True
        pages = self.controls["pages_to_scan"]
        quiet = self._quiet and self.scanner.changes == self._changes
        self._batches = self._join(pages, quiet)
        return pages * self._batches

    def _join(self, pages: int, quiet: bool) -> int:
        """How many advisor batches of ``pages`` the next batch stands for."""
        if self.controls["advisor_mode"] != 1 or pages >= MIN_BATCH_PAGES:
            return 1
        known = 0 if self._reshaped else self._scan_pages
        whole = max(1, -(-known // pages))
        if quiet and self._stretches():
            return whole * QUIET_STRETCH
        k = whole if quiet else min(-(-MIN_BATCH_PAGES // pages), whole)
        sleep = self.controls["sleep_millisecs"] / 1000
        if len(self.scanner.lanes) > 1 and sleep > 0:
            k = min(k, max(1, int(MULTI_LANE_PERIOD / sleep)))
        return k

    def _stretches(self) -> bool:
        """A quiet full scan may come QUIET_STRETCH periods apart: one lane
        (with several, MULTI_LANE_PERIOD bounds a batch period), and sleeps."""
        return len(self.scanner.lanes) <= 1 and self.controls["sleep_millisecs"] > 0

    def _shape(self) -> tuple[int, int]:
        return len(self.scanner.lanes), len(self.scanner.regions)

    def pause(self, seconds: float) -> None:
        """No batch for this long (the loop failed: do not spin on it)."""
        self._next_batch = time.monotonic() + seconds

    def batch_done(self, cpu: float, visited: int = 0, ended: bool = False) -> None:
        """A batch ended, having used *cpu* seconds of this thread.  The next
        one may run ``sleep_millisecs`` after it (for a batch that stood for
        k, see ``batch_pages``, k times that; or, if it ended at its CPU
        limit, not at the end of a full scan (``ended``), as many times as
        the pages it *visited* stand for: a quiet domain's one batch, cold
        after a long sleep, may end there, and the rest of its full scan
        follows at the advisor's pace, not a whole period later), and with
        the advisor on, not before the ``cpu`` seconds this batch
        took are at most ``advisor_max_cpu`` percent of the time since the
        previous batch ended.  The cap is the scan's, as ksmd's is (messages
        are paced by their own limits): a peer's messages cannot starve the
        scan, nor its regions make the scan take more.  The scan's includes
        settling the replies to its own merges and unmerges (the server adds
        ``Replies.take_scan_cpu()`` to *cpu*)."""
        now = time.monotonic()
        self._visited += visited
        t0, self._batch_end = self._batch_end, now
        if self.controls["advisor_mode"] == 1:
            cap = self.controls["advisor_max_cpu"] / 100
            self._cpu_gate = now + max(0.0, cpu / cap - (now - t0))
        else:
            self._cpu_gate = 0.0
        sleeps = self._batches
        if visited > 0 and sleeps > 1 and not ended:
            sleeps = min(sleeps, -(-visited // self.controls["pages_to_scan"]))
        self._next_batch = now + sleeps * self.controls["sleep_millisecs"] / 1000

    def full_scan_done(self) -> None:
        """Feed the scan-time advisor what the last full scan cost; give the
        heap's free memory back."""
        t0, cpu0, pages0 = self._scan_mark
        now, cpu, pages = time.monotonic(), time.thread_time(), self.scanner.pages_scanned
        self._scan_mark = (now, cpu, pages)
        # Its size says what the next one will visit only if its lanes and
        # regions stayed the same from start to end (a worker dropped in the
        # middle took its pages' share of the count away with it).
        shape = self._shape()
        steady = shape == self._scan_shape and not self._reshaped
        # Visited, not scanned: a converged domain's merged pages count
        # against pages_to_scan but are not read (pages_scanned).
        self._scan_pages = self._visited if steady else 0
        changes = self.scanner.changes
        began_quiet = self._quiet_scan and not self._stirred    # and no wake cut it short
        self._quiet = steady and changes == self._changes and not self._stirred
        self._quiet_scan = self._quiet and self._stretches()
        self._changes, self._stirred = changes, False
        self._visited = 0
        self._scan_shape, self._reshaped = shape, False
        # A busy scan's numpy temporaries (MiBs per chunk) leave freed memory
        # in glibc's heap: give it back (~0.2 ms; ~5 us when there is none).
        # malloc_trim walks (and locks) every arena of the process, an
        # embedding application's too: after a long scan, else once a second.
        if now - t0 >= TRIM_AFTER_SCAN or now - self._last_trim >= TRIM_INTERVAL:
            _native.trim_heap()
            self._last_trim = now
        c = self.controls
        if c["advisor_mode"] == 1:
            # A quiet scan took QUIET_STRETCH periods by design: the advisor
            # is told the period it stood for, and keeps the busy pace.
            wall = (now - t0) / (QUIET_STRETCH if began_quiet else 1)
            c["pages_to_scan"] = advisor.advise(
                c["pages_to_scan"], advisor.ScanSample(wall, cpu - cpu0, pages - pages0),
                c["advisor_target_scan_time"], c["advisor_max_cpu"],
                c["advisor_min_pages_to_scan"], c["advisor_max_pages_to_scan"])
        if c["advisor_mode"] == 1 and self._quiet:
            # Quiet from now: the next batch is the whole next full scan, a
            # quiet period after this one (not the sleeps of a busy one).
            k = self._join(c["pages_to_scan"], True)
            self._next_batch = max(self._next_batch, self._batch_end + k * c["sleep_millisecs"] / 1000)
        self.activity.full_scan(self.scanner.full_scans, now - t0, self.scanner.stats,
                                c["pages_to_scan"], c["advisor_mode"] == 1)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
