"""The scan-time advisor (Linux 6.8's ``advisor_mode = scan-time``).

Instead of a fixed ``pages_to_scan``, the user states how long one full scan
should take (``advisor_target_scan_time``, seconds) and how much of one CPU
the coordinator may use (``advisor_max_cpu``, percent); after every full scan
the advisor derives the next ``pages_to_scan`` from what the last scan cost.
Like Linux it smooths with an exponentially weighted average and clamps to
``advisor_min_pages_to_scan`` .. ``advisor_max_pages_to_scan``.  Setting
``pages_to_scan`` by hand switches the advisor off.

Pure policy: no I/O, so it is tested with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

EWMA_WEIGHT = 0.3   # weight of the newest observation (Linux uses 30%)


@dataclass
class ScanSample:
    """What one full scan cost."""

    wall_s: float       # time from the start of the scan to its end
    cpu_s: float        # coordinator CPU spent in it
    pages: int          # pages visited


def advise(pages_to_scan: int, sample: ScanSample, target_scan_time: float, max_cpu_percent: float,
           min_pages: int, max_pages: int) -> int:
    """The next pages_to_scan."""
    if sample.wall_s <= 0 or sample.pages <= 0:
        return max(min_pages, min(max_pages, pages_to_scan))
    # Scan speed scales with pages per batch: aim the next scan at the target.
    want = pages_to_scan * sample.wall_s / max(target_scan_time, 1e-3)
    # CPU cap: CPU use scales with pages per batch too.
    cpu_percent = 100.0 * sample.cpu_s / sample.wall_s
    if cpu_percent > 0:
        want = min(want, pages_to_scan * max_cpu_percent / cpu_percent)
    smoothed = (1 - EWMA_WEIGHT) * pages_to_scan + EWMA_WEIGHT * want
    return int(max(min_pages, min(max_pages, round(smoothed))))


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
