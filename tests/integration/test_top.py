"""``shmdedup top`` in a real pseudo-terminal against a real coordinator.

An embedded coordinator runs in this process, a spawned worker holds 48 pages
of 16 distinct contents (so 16 stable pages and 32 pages saved), and
``python -m shmdedup top`` runs on a pty with TERM=xterm and an 80x24 window.
curses draws only what changed between frames, so the test does not grep the
byte stream: a small VT100 emulator (:class:`Screen`) replays it into a grid of
cells and the assertions read that grid, as a person reads the terminal.

The child is started with subprocess on the pty's slave and makes it its
controlling terminal (TIOCSCTTY) before exec'ing ``python -m shmdedup top``:
pty.fork() would fork this multithreaded process (the coordinator thread).
Ctrl-C is a real \\x03 typed into the master, turned into SIGINT by the tty.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmdedup
from tests.helpers import (  # noqa: F401
    REPEATING_WORKER_SETUP,
    Worker,
    allocated_bytes,
    child_env,
    no_shm_leftovers,
    reaper,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")

ROWS, COLS = 24, 80
NPAGES, DISTINCT = 48, 16          # -> pages_shared 16, pages_sharing 32
TIMEOUT = 30.0



# ---- a small VT100/xterm screen, enough for what ncurses sends ----------------

class Screen:
    """Cells of a ROWS x COLS terminal, fed with the child's output."""

    CSI = re.compile(rb"\x1b\[([?>=]?)([0-9;]*)([ -/]*)([@-~])")

    def __init__(self, rows: int = ROWS, cols: int = COLS) -> None:
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.y = self.x = 0
        self.top, self.bottom = 0, rows - 1
        self.saved = (0, 0)
        self.last = " "
        self.raw = b""

    def resize(self, rows: int, cols: int) -> None:
        """What a terminal window does when it changes size: cells kept where they fit."""
        self.grid = [(r + [" "] * cols)[:cols] for r in self.grid[:rows]]
        self.grid += [[" "] * cols for _ in range(rows - len(self.grid))]
        self.rows, self.cols = rows, cols
        self.top, self.bottom = 0, rows - 1
        self.y, self.x = min(self.y, rows - 1), min(self.x, cols - 1)

    def text(self) -> str:
        return "\n".join("".join(r).rstrip() for r in self.grid)

    def _scroll(self, n: int, up: bool = True) -> None:
        for _ in range(n):
            blank = [" "] * self.cols
            if up:
                del self.grid[self.top]
                self.grid.insert(self.bottom, blank)
            else:
                del self.grid[self.bottom]
                self.grid.insert(self.top, blank)

    def _put(self, ch: str) -> None:
        if self.x >= self.cols:
            self.x = 0
            self._linefeed()
        self.grid[self.y][self.x] = ch
        self.last = ch
        self.x += 1

    def _linefeed(self) -> None:
        if self.y == self.bottom:
            self._scroll(1)
        elif self.y < self.rows - 1:
            self.y += 1

    def feed(self, data: bytes) -> None:
        self.raw += data
        text = data
        i = 0
        while i < len(text):
            b = text[i]
            if b == 0x1b:
                m = self.CSI.match(text, i)
                if m:
                    self._csi(m.group(1), m.group(2), m.group(4))
                    i = m.end()
                    continue
                nxt = text[i + 1:i + 2]
                if nxt == b"]":                       # OSC ... BEL or ST
                    end = min((p for p in (text.find(b"\x07", i), text.find(b"\x1b\\", i)) if p >= 0),
                              default=len(text))
                    i = end + (2 if text[end:end + 2] == b"\x1b\\" else 1)
                    continue
                if nxt in (b"(", b")", b"*", b"+"):   # charset designation
                    i += 3
                    continue
                if nxt == b"M":                       # reverse index
                    if self.y == self.top:
                        self._scroll(1, up=False)
                    elif self.y > 0:
                        self.y -= 1
                elif nxt == b"7":
                    self.saved = (self.y, self.x)
                elif nxt == b"8":
                    self.y, self.x = self.saved
                i += 2                                # ESC = > and the rest: no effect on cells
                continue
            if b == 0x0d:
                self.x = 0
            elif b == 0x0a:
                self._linefeed()
            elif b == 0x08:
                self.x = max(0, self.x - 1)
            elif b == 0x09:
                self.x = min(self.cols - 1, (self.x // 8 + 1) * 8)
            elif b >= 0x20:
                # UTF-8: take the whole sequence as one cell
                n = 1 if b < 0x80 else 2 if b < 0xe0 else 3 if b < 0xf0 else 4
                self._put(text[i:i + n].decode("utf-8", "replace"))
                i += n
                continue
            i += 1

    def _csi(self, private: bytes, params: bytes, final: bytes) -> None:
        args = [int(p) if p else 0 for p in params.split(b";")] if params else []
        n = args[0] if args and args[0] else 1
        f = final.decode()
        if private:
            return                                    # modes (?1049h, ?25l...): no cells change
        if f in "Hf":
            self.y = min(self.rows - 1, (args[0] if args and args[0] else 1) - 1)
            self.x = min(self.cols - 1, (args[1] if len(args) > 1 and args[1] else 1) - 1)
        elif f == "A":
            self.y = max(0, self.y - n)
        elif f == "B":
            self.y = min(self.rows - 1, self.y + n)
        elif f == "C":
            self.x = min(self.cols - 1, self.x + n)
        elif f == "D":
            self.x = max(0, self.x - n)
        elif f == "G":
            self.x = min(self.cols - 1, n - 1)
        elif f == "d":
            self.y = min(self.rows - 1, n - 1)
        elif f == "K":
            mode = args[0] if args else 0
            row = self.grid[self.y]
            lo, hi = {0: (self.x, self.cols), 1: (0, self.x + 1), 2: (0, self.cols)}[mode]
            row[lo:hi] = [" "] * (hi - lo)
        elif f == "J":
            mode = args[0] if args else 0
            rows = {0: range(self.y + 1, self.rows), 1: range(0, self.y), 2: range(self.rows)}[mode]
            for r in rows:
                self.grid[r] = [" "] * self.cols
            if mode == 0:
                self.grid[self.y][self.x:] = [" "] * (self.cols - self.x)
            elif mode == 1:
                self.grid[self.y][:self.x + 1] = [" "] * (self.x + 1)
        elif f == "X":
            end = min(self.cols, self.x + n)
            self.grid[self.y][self.x:end] = [" "] * (end - self.x)
        elif f == "b":
            for _ in range(n):
                self._put(self.last)
        elif f == "@":
            row = self.grid[self.y]
            row[self.x:self.x] = [" "] * n
            del row[self.cols:]
        elif f == "P":
            row = self.grid[self.y]
            del row[self.x:self.x + n]
            row.extend([" "] * (self.cols - len(row)))
        elif f in "LM" and self.top <= self.y <= self.bottom:
            saved_top, self.top = self.top, self.y
            self._scroll(n, up=(f == "M"))
            self.top = saved_top
        elif f == "S":
            self._scroll(n)
        elif f == "T":
            self._scroll(n, up=False)
        elif f == "r":
            self.top = (args[0] if args and args[0] else 1) - 1
            self.bottom = (args[1] if len(args) > 1 and args[1] else self.rows) - 1
            self.y, self.x = 0, 0
        # "m" (attributes), "t" (window ops), "c", "n": no cells change


# ---- running top on a pty ----------------------------------------------------

# Run in the child: take the pty as controlling terminal, then become `python -m shmdedup top`.
LAUNCH = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
          "os.execv(sys.argv[1], sys.argv[1:])")


class Top:
    """``python -m shmdedup top`` on a fresh pty (ROWS x COLS, TERM=xterm)."""

    def __init__(self, socket_path: str, interval: float = 0.2) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.modes = termios.tcgetattr(self.slave)
        env = child_env({"TERM": "xterm", "LINES": "", "COLUMNS": ""})
        env.pop("LINES")
        env.pop("COLUMNS")
        cmd = [sys.executable, "-c", LAUNCH, sys.executable, "-m", "shmdedup", "top",
               "--socket", socket_path, "--interval", str(interval)]
        self.proc = subprocess.Popen(cmd, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env=env, cwd=str(os.path.dirname(os.path.dirname(os.path.dirname(
                                         os.path.abspath(__file__))))),
                                     start_new_session=True, close_fds=True)
        self.screen = Screen()

    def pump(self, timeout: float = 0.05) -> None:
        r, _, _ = select.select([self.master], [], [], timeout)
        if r:
            try:
                data = os.read(self.master, 65536)
            except OSError:                           # EIO: nothing left on the slave side
                return
            self.screen.feed(data)

    def wait_screen(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        rx = re.compile(pattern, re.M)
        return self.wait_until(lambda text: rx.search(text), pattern, timeout)

    def wait_until(self, cond: Callable[[str], Any], what: str, timeout: float = TIMEOUT) -> Any:
        """Read output until cond(screen text) is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            got = cond(self.screen.text())
            if got:
                return got
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.drain()
                raise AssertionError(f"screen never showed {what!r} (exit {self.proc.poll()}):\n"
                                     f"{self.screen.text()}\nraw tail: {self.screen.raw[-2000:]!r}")
            self.pump()

    def resize(self, rows: int, cols: int) -> None:
        """Resize the window: the kernel sends SIGWINCH to top's process group."""
        self.drain()
        self.screen.resize(rows, cols)
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump()
        self.drain()
        rc = self.proc.poll()
        assert rc is not None, f"top did not exit within {timeout} s:\n{self.screen.text()}"
        return rc

    def drain(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.screen.feed(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="sd-top-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_merging(path: str) -> tuple[shmdedup.Coordinator, Worker, int]:
    """A coordinator at path and a worker whose 48 pages have merged (checked from
    outside: its backing object holds no page any more)."""
    coord = shmdedup.Coordinator(path, export_env=False, sleep_millisecs=5).start()
    worker = Worker()
    pid, fds = worker.run(REPEATING_WORKER_SETUP, path=path, npages=NPAGES, distinct=DISTINCT)
    try:
        wait_for(lambda: coord.stats()["pages_sharing"] == NPAGES - DISTINCT, TIMEOUT,
                 "the worker's pages to merge")
        wait_for(lambda: allocated_bytes(fds[0]) == 0, TIMEOUT, "the backing object to be punched")
    finally:
        os.close(fds[0])
    return coord, worker, pid


def assert_restored(top: Top) -> None:
    """The tty modes are back (echo, canonical input) and the alternate screen was left."""
    assert termios.tcgetattr(top.slave) == top.modes
    assert b"\x1b[?1049l" in top.screen.raw
    assert b"Traceback" not in top.screen.raw, top.screen.raw.decode("utf-8", "replace")


def test_top_shows_counters_and_quits_on_q(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    coord, worker, pid = start_merging(path)
    top = Top(path)
    try:
        m = top.wait_screen(r"^\s*pages_sharing\s+(\d+)")
        assert int(m.group(1)) == NPAGES - DISTINCT
        assert int(top.wait_screen(r"^\s*pages_shared\s+(\d+)").group(1)) == DISTINCT
        # the worker's row: pid, ksm_rmap_items, ksm_merging_pages, ksm_zero_pages
        row = top.wait_screen(rf"^\s*{pid}\s+(\d+)\s+(\d+)\s+(\d+)\s")
        assert (int(row.group(2)), int(row.group(3))) == (NPAGES, 0)
        top.wait_screen(r"pages_scanned\s+\d+ \([\d,]+/s\)")      # a rate once two samples are in
        top.wait_screen(r"saved \(pages_sharing x [\d.]+ KiB\): 128\.0 KiB")
        top.send(b"q")
        assert top.wait_exit() == 0
        assert_restored(top)
    finally:
        top.close()
        worker.close()
        coord.stop()


def test_top_ctrl_c_exits_cleanly(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    coord, worker, _ = start_merging(path)
    top = Top(path)
    try:
        top.wait_screen(rf"^\s*pages_sharing\s+{NPAGES - DISTINCT}\b")
        top.send(b"\x03")
        assert top.wait_exit() in (0, 130)
        assert_restored(top)
    finally:
        top.close()
        worker.close()
        coord.stop()


def test_top_waits_for_a_coordinator_then_shows_it(sockdir: str) -> None:
    path = os.path.join(sockdir, "late.sock")
    top = Top(path)
    coord = worker = None
    try:
        top.wait_screen(r"no coordinator answers \(retrying every 0\.2 s\)")
        top.wait_screen(rf"no coordinator at {re.escape(path)}")
        coord, worker, _ = start_merging(path)
        top.wait_screen(rf"^\s*pages_sharing\s+{NPAGES - DISTINCT}\b")
        assert "no coordinator answers" not in top.screen.text()
        coord.stop()                                  # lost: says so, keeps the last values
        coord = None
        top.wait_screen(r"no coordinator answers \(retrying every 0\.2 s; last values below\)")
        top.send(b"q")
        assert top.wait_exit() == 0
        assert_restored(top)
    finally:
        top.close()
        if worker is not None:
            worker.close()
        if coord is not None:
            coord.stop()


def test_top_degrades_on_small_terminals(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    coord, worker, _ = start_merging(path)
    top = Top(path)
    try:
        top.wait_screen(r"^workers: 1$")
        top.resize(9, 40)
        # Counters first, in one column, cut after the 9th line; every line within 39
        # columns (a frame drawn for 80 columns may still arrive first: wait it out).
        expect = re.compile(rf"\A.*\n\s*pages_shared\s+{DISTINCT}\n\s*pages_sharing\s+{NPAGES - DISTINCT}\n"
                            r"(.*\n){5}\s*general_profit\s+[\d.]+ KiB\Z")
        top.wait_until(lambda text: expect.search(text) and max(map(len, text.splitlines())) <= 39,
                       "a 9x40 frame")
        assert "workers:" not in top.screen.text()
        top.resize(3, 20)
        top.wait_screen(r"^20x3: too small$")
        top.resize(ROWS, COLS)
        top.wait_screen(r"^workers: 1$")
        top.send(b"q")
        assert top.wait_exit() == 0
        assert_restored(top)
    finally:
        top.close()
        worker.close()
        coord.stop()


def test_top_needs_a_terminal() -> None:
    r = subprocess.run([sys.executable, "-m", "shmdedup", "top", "--socket", "/nonexistent/c.sock"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env(),
                       timeout=60)
    assert r.returncode == 1   # a failure, not a usage error (docs/guide.md, exit statuses)
    assert "shmdedup top: needs a terminal (try: shmdedup stats)" in r.stderr
    assert "Traceback" not in r.stderr
