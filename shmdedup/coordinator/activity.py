"""What a coordinator logs about its activity (``shmdedup coordinator -v``).

On the ``shmdedup.coordinator`` logger, at INFO: connections (hello, with
pid, uid and role), disconnections (with the reason), control changes (old
and new value, and who set them) and full scans (number, duration, the page
counters and how many more pages share than at the previous line).  A peer
dropped for a reason is a WARNING, as before, and never rate-limited (every
such drop is logged: the hostile-peer tests count them).

Cheap by construction: nothing is logged per page or per batch, and nothing
is computed unless INFO is enabled.  Rate-limited where a peer or a tiny
domain could flood the log:

* connect/disconnect lines: a token bucket (``CONN_LINES_PER_SEC``, bursts of
  ``CONN_BURST``); the next line that passes says how many were suppressed;
* full scans: at most one line per ``SCAN_LINE_INTERVAL`` while the counters
  change, one per ``SCAN_QUIET_INTERVAL`` while they stay the same (a line
  covers every full scan since the previous one).  At DEBUG (``-vv``) every
  full scan has its line.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.security import TokenBucket

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

CONN_LINES_PER_SEC = 20
CONN_BURST = 100
SCAN_LINE_INTERVAL = 1.0        # s, while pages_shared/sharing/unshared change
SCAN_QUIET_INTERVAL = 60.0      # s, while they do not
_SCAN_KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


class Activity:
    """The coordinator's activity log: one method per kind of event."""

    def __init__(self) -> None:
        self._bucket = TokenBucket(CONN_BURST)
        self._suppressed = 0
        # the last full-scan line: when, at which full_scans, with which counters
        self._scan_line_at = float("-inf")
        self._scan_line_n = 0
        self._scan_line_counts: tuple[int, ...] | None = None

    # -- connections -------------------------------------------------------

    def _conn_line(self, fmt: str, *args: Any) -> None:
        if not self._bucket.take(CONN_LINES_PER_SEC, CONN_BURST):
            self._suppressed += 1
            return
        if self._suppressed:
            fmt += " (%d connection lines suppressed before this one)"
            args += (self._suppressed,)
            self._suppressed = 0
        log.info(fmt, *args)

    def connected(self, peer: Peer) -> None:
        if log.isEnabledFor(logging.INFO):
            self._conn_line("pid %d uid %d connected as a %s", peer.pid, peer.uid, peer.role)

    def disconnected(self, peer: Peer, why: str, stopping: bool = False) -> None:
        """``why`` non-empty: dropped by us (a WARNING); empty: the peer closed
        the connection.  ``stopping``: closed by our shutdown (one line for all,
        by the caller)."""
        if why:
            log.warning("closing connection of pid %d uid %d (%s): %s", peer.pid, peer.uid,
                        peer.role or "no hello", why)
        elif not stopping and log.isEnabledFor(logging.INFO):
            held = f", {len(peer.regions)} regions registered" if peer.regions else ""
            self._conn_line("pid %d uid %d (%s) disconnected: connection closed by the peer%s",
                            peer.pid, peer.uid, peer.role or "no hello", held)

    # -- controls ----------------------------------------------------------

    def control(self, name: str, old: int, new: int, peer: Peer | None) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        who = f"pid {peer.pid} uid {peer.uid}" if peer is not None else "an in-process call"
        if old == new:
            log.info("control %s = %d (unchanged), set by %s", name, new, who)
        else:
            log.info("control %s: %d -> %d, set by %s", name, old, new, who)

    # -- full scans --------------------------------------------------------

    def full_scan(self, full_scans: int, seconds: float, stats: Callable[[], dict[str, Any]],
                  pages_to_scan: int, advisor: bool) -> None:
        """A full scan ended (``full_scans`` is its number, ``seconds`` how
        long it took); ``stats`` is called only when a line is written."""
        if not log.isEnabledFor(logging.INFO):
            return
        now = time.monotonic()
        debug = log.isEnabledFor(logging.DEBUG)
        since = now - self._scan_line_at
        if not debug and since < SCAN_LINE_INTERVAL:
            return
        s = stats()
        counts = tuple(int(s[k]) for k in _SCAN_KEYS)
        if not debug and counts == self._scan_line_counts and since < SCAN_QUIET_INTERVAL:
            return
        if full_scans <= self._scan_line_n:      # full_scans restarted from 0 (run=2)
            self._scan_line_n = full_scans - 1
        prev = self._scan_line_counts
        delta = counts[1] - prev[1] if prev is not None else counts[1]
        n = full_scans - self._scan_line_n
        head = (f"full scan {full_scans} took {seconds:.3f} s" if n <= 1 else
                f"full scans {self._scan_line_n + 1}-{full_scans} ({n} since the last line), "
                f"the last took {seconds:.3f} s")
        pacing = f"pages_to_scan {pages_to_scan}{' (advisor)' if advisor else ''}"
        (log.debug if debug and since < SCAN_LINE_INTERVAL else log.info)(
            "%s: pages_shared %d, pages_sharing %d (%+d), pages_unshared %d, pages_volatile %d; %s",
            head, counts[0], counts[1], delta, counts[2], counts[3], pacing)
        self._scan_line_at, self._scan_line_n, self._scan_line_counts = now, full_scans, counts


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
