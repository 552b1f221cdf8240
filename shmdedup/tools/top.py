"""``shmdedup top``: a live terminal view of one coordinator.

Every ``--interval`` seconds it asks the coordinator for ``stats()`` (one
request on a client connection) and redraws: the KSM counters, the controls,
the scan rate (pages_scanned per second, full scans per minute), the memory
saved over time (pages_sharing x page size, as a sparkline) and one row per
worker with what ``/proc/<pid>/ksm_stat`` shows.

Rules it keeps, so it works over ssh and on any terminal:

* plain curses: no mouse, no colours required (bold and reverse only), ASCII
  unless the locale is UTF-8, nothing written to the bottom-right cell;
* every line is cut to the terminal's width and sections are dropped from the
  bottom when it is short; below ``MIN_COLS`` x ``MIN_LINES`` it says so;
* ``q`` and Ctrl-C quit with exit status 0 and the terminal restored
  (``curses.wrapper`` ends curses on any exit, SIGTERM included);
* no coordinator (never, or lost): a message saying where it looked and why it
  failed, retried every interval, never a traceback.

Drawing is a pure function (:func:`render`) of the last stats and the
:class:`History`, so it can be checked without a terminal.
"""

from __future__ import annotations

import locale
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from shmdedup.tools.client import Client
from shmdedup.paths import resolve_socket_path
from shmdedup.controls import CONTROLS
from shmdedup.errors import Error
from shmdedup.stats import Stats
from shmdedup.pages import PAGE_SIZE

MIN_COLS, MIN_LINES = 30, 4
RATE_WINDOW = 60.0           # seconds of samples kept for full scans per minute
HISTORY = 512                # saved-memory samples kept for the sparkline

# (stats key, label): left and right columns of the counter block.
LEFT = [("pages_shared", "pages_shared"), ("pages_sharing", "pages_sharing"),
        ("pages_unshared", "pages_unshared"), ("pages_volatile", "pages_volatile"),
        ("ksm_zero_pages", "ksm_zero_pages")]
RIGHT = [("pages_scanned", "pages_scanned"), ("full_scans", "full_scans"),
         ("general_profit", "general_profit"), ("stable_pages_allocated", "stable pages"),
         ("rmap_items", "rmap_items")]
WORKER_COLUMNS = ["ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit"]
# Keys shown elsewhere (or not numbers): everything else numeric goes to "other".
_SHOWN = {k for k, _ in LEFT + RIGHT} | set(CONTROLS) | {
    "workers", "socket", "last_error", "coordinator_pid", "metrics_port"}

Line = tuple[str, str]       # (text, style: "" | "title" | "head" | "warn")


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def sparkline(values: list[float], width: int, ascii_only: bool) -> str:
    """The last ``width`` values as one character each, scaled 0..max."""
    chars = " .:-=+*#%@" if ascii_only else "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
    vals = values[-width:] if width > 0 else []
    top = max(vals, default=0)
    if top <= 0:
        return chars[0] * len(vals)
    return "".join(chars[min(len(chars) - 1, int(v / top * (len(chars) - 1) + 0.5))] if v > 0
                   else chars[0] for v in vals)


class History:
    """Samples of one coordinator's counters: scan rates and memory saved."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int]] = deque()   # (t, pages_scanned, full_scans)
        self.saved: deque[int] = deque(maxlen=HISTORY)
        self.coordinator: Any = None

    def add(self, t: float, stats: Mapping[str, Any]) -> None:
        scanned, full = int(stats.get("pages_scanned", 0)), int(stats.get("full_scans", 0))
        ident = (stats.get("coordinator_pid"), stats.get("socket"))
        if self.samples:
            _, s0, f0 = self.samples[-1]
            # Another coordinator, a restart, or run=2 (full_scans back to 0):
            # deltas across that are meaningless.
            if ident != self.coordinator or scanned < s0 or full < f0:
                self.samples.clear()
        self.coordinator = ident
        self.samples.append((t, scanned, full))
        while len(self.samples) > 2 and t - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        self.saved.append(int(stats.get("pages_sharing", 0)) * PAGE_SIZE)

    def scan_rate(self) -> float | None:
        """pages_scanned per second between the last two samples."""
        if len(self.samples) < 2:
            return None
        (t0, s0, _), (t1, s1, _) = self.samples[-2], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def full_scans_per_minute(self) -> float | None:
        """Full scans per minute over the samples of the last minute."""
        if len(self.samples) < 2:
            return None
        (t0, _, f0), (t1, _, f1) = self.samples[0], self.samples[-1]
        return (f1 - f0) * 60.0 / (t1 - t0) if t1 > t0 else None


def _counter_text(key: str, stats: Mapping[str, Any], hist: History) -> str:
    v = stats.get(key)
    if v is None:
        return "-"
    if key == "general_profit":
        return fmt_bytes(v)
    if key == "pages_scanned":
        r = hist.scan_rate()
        return f"{v}" + (f" ({r:,.0f}/s)" if r is not None else "")
    if key == "full_scans":
        r = hist.full_scans_per_minute()
        return f"{v}" + (f" ({r:.1f}/min)" if r is not None else "")
    return str(v)


def _controls_lines(stats: Mapping[str, Any], width: int) -> list[Line]:
    parts = [f"{k}={stats[k]}" for k in CONTROLS if k in stats]
    lines, cur = [], "controls:"
    for p in parts:
        if len(cur) + 1 + len(p) > width and cur.strip():
            lines.append((cur, ""))
            cur = "         "
        cur += " " + p
    lines.append((cur, ""))
    return lines


def _counter_lines(stats: Mapping[str, Any], hist: History, width: int) -> list[Line]:
    def cell(key: str, label: str, vw: int) -> str:
        return f"  {label:<16}{_counter_text(key, stats, hist):>{vw}}"
    if width >= 30 + 2 + 38:
        return [(cell(*a, 12) + "  " + cell(*b, 20), "") for a, b in zip(LEFT, RIGHT)]
    return [(cell(*a, 12), "") for a in LEFT + RIGHT]


def _worker_lines(stats: Mapping[str, Any], room: int) -> list[Line]:
    workers = sorted(stats.get("workers", []), key=lambda w: -w.get("ksm_process_profit", 0))
    out: list[Line] = [(f"workers: {len(workers)}", "head")]
    if not workers or room < 3:
        return out[:max(room, 0)]
    widths = [len(c) + 2 for c in WORKER_COLUMNS]
    out.append((f"{'pid':>8}" + "".join(f"{c:>{n}}" for c, n in zip(WORKER_COLUMNS, widths)), "head"))
    rows = room - 2
    shown = workers if len(workers) <= rows else workers[:rows - 1]
    for w in shown:
        cells = [fmt_bytes(w.get(c, 0)) if c == "ksm_process_profit" else str(w.get(c, "-"))
                 for c in WORKER_COLUMNS]
        out.append((f"{w.get('pid', '?'):>8}" + "".join(f"{c:>{n}}" for c, n in zip(cells, widths)), ""))
    if len(shown) < len(workers):
        out.append((f"  ... {len(workers) - len(shown)} more", ""))
    return out


def render(stats: Mapping[str, Any] | None, hist: History, *, path: str, interval: float,
           error: str | None, width: int, height: int, ascii_only: bool = True,
           clock: str = "") -> list[Line]:
    """The screen as lines (each at most width-1 characters, at most height lines)."""
    if width < MIN_COLS or height < MIN_LINES:
        return [(f"{width}x{height}: too small"[:max(width - 1, 0)], "warn")][:height]
    w = width - 1                       # never the last column (bottom-right cell)
    out: list[Line] = []
    pid = f"  pid {stats.get('coordinator_pid')}" if stats else ""
    out.append((f"shmdedup top  {path}{pid}  every {interval:g} s  {clock}  q quits", "title"))
    if error is not None:
        out.append((f"no coordinator answers (retrying every {interval:g} s"
                    + ("; last values below)" if stats else ")"), "warn"))
        out.append((f"  {error}", "warn"))
    if stats is None:
        return [(t[:w], s) for t, s in out][:height]
    if stats.get("last_error"):
        out.append((f"last_error: {stats['last_error']}", "warn"))
    out += _counter_lines(stats, hist, w)
    other = [f"{k}={v}" for k, v in sorted(stats.items())
             if k not in _SHOWN and isinstance(v, int) and not isinstance(v, bool)]
    if other:
        out.append(("  " + "  ".join(other), ""))
    out += _controls_lines(stats, w)
    saved = hist.saved[-1] if hist.saved else 0
    peak = max(hist.saved, default=0)
    if height - len(out) >= 3:
        out.append(("", ""))
        out.append((f"saved (pages_sharing x {fmt_bytes(PAGE_SIZE)}): {fmt_bytes(saved)}"
                    f"   peak {fmt_bytes(peak)}   last {len(hist.saved)} samples", "head"))
        out.append(("  " + sparkline(list(hist.saved), w - 2, ascii_only), ""))
    if height - len(out) >= 2:
        out.append(("", ""))
        out += _worker_lines(stats, height - len(out))
    return [(t[:w], s) for t, s in out][:height]


class TopView:
    """The polling state: one client connection, kept while it works."""

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.client: Client | None = None
        self.stats: Stats | None = None
        self.error: str | None = None
        self.history: History = History()

    def poll(self) -> None:
        try:
            if self.client is None:
                self.client = Client(self.path, timeout=max(2.0, 2 * self.interval))
            stats = self.client.stats()
        except (Error, OSError) as e:   # CoordinatorUnavailableError, closed, timed out
            self.close()
            self.error = str(e) or type(e).__name__
            return
        self.error = None
        self.stats = stats
        self.history.add(time.monotonic(), stats)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _draw(stdscr: Any, view: TopView, ascii_only: bool) -> None:
    import curses
    height, width = stdscr.getmaxyx()
    lines = render(view.stats, view.history, path=view.path, interval=view.interval,
                   error=view.error, width=width, height=height, ascii_only=ascii_only,
                   clock=time.strftime("%H:%M:%S"))
    styles = {"title": curses.A_REVERSE, "head": curses.A_BOLD, "warn": curses.A_BOLD, "": curses.A_NORMAL}
    stdscr.erase()
    for y, (text, style) in enumerate(lines):
        try:
            stdscr.addstr(y, 0, text, styles[style])
        except curses.error:
            pass  # a resize raced us: the next frame fits
    stdscr.noutrefresh()
    curses.doupdate()


def _loop(stdscr: Any, view: TopView, ascii_only: bool) -> None:
    import curses
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # terminals without cursor visibility control
    next_poll = 0.0
    while True:
        now = time.monotonic()
        if now >= next_poll:
            view.poll()
            next_poll = max(next_poll + view.interval, time.monotonic())
            _draw(stdscr, view, ascii_only)
        stdscr.timeout(max(1, int((next_poll - time.monotonic()) * 1000) + 1))
        ch = stdscr.getch()
        if ch in (ord("q"), ord("Q")):
            return
        if ch in (curses.KEY_RESIZE, 12):
            # Resize: a frame drawn for the old size may have wrapped on the
            # terminal, so repaint every cell.  Ctrl-L: the same, as in top.
            stdscr.clear()
            _draw(stdscr, view, ascii_only)


def run_top(socket_path: str | None = None, *, domain: str | None = None, interval: float = 1.0) -> int:
    """Run the live view until q or Ctrl-C; returns the exit status."""
    import curses
    path = resolve_socket_path(socket_path, domain)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("shmdedup top: needs a terminal (try: shmdedup stats)", file=sys.stderr)
        return 1
    try:
        locale.setlocale(locale.LC_ALL, "")
    except locale.Error:
        pass
    ascii_only = "utf" not in locale.getpreferredencoding(False).lower().replace("-", "")
    view = TopView(path, interval)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        curses.wrapper(_loop, view, ascii_only)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how many people quit top: not an error
    except curses.error as e:
        print(f"shmdedup top: cannot use this terminal (TERM={os.environ.get('TERM', '')!r}): {e}",
              file=sys.stderr)
        return 1
    finally:
        view.close()
        signal.signal(signal.SIGTERM, old_term)
    return 0


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
