"""``shmdedup top``'s drawing and rates, without a terminal (render is pure)."""

from __future__ import annotations

import copy

import pytest

from shmdedup.controls import CONTROLS
from shmdedup.tools.top import PAGE_SIZE, History, fmt_bytes, render, sparkline


def sample_stats(**over: object) -> dict:
    st: dict = {k: v[0] for k, v in CONTROLS.items()}
    st.update(pages_shared=16, pages_sharing=32, pages_unshared=3, pages_volatile=1,
              pages_scanned=1000, full_scans=10, ksm_zero_pages=2, general_profit=130000,
              stable_pages_allocated=16, rmap_items=54, stable_node_chains=0, last_error="",
              coordinator_pid=4321, socket="/tmp/x.sock",
              workers=[{"pid": 100 + i, "regions": 1, "pages": 48, "ksm_rmap_items": 48,
                        "ksm_merging_pages": 48 - i, "ksm_zero_pages": 0,
                        "ksm_process_profit": 1000 * i} for i in range(30)])
    st.update(over)
    return st


def lines(stats: dict | None, width: int = 80, height: int = 24, error: str | None = None,
          hist: History | None = None, **kw: object) -> list[str]:
    out = render(stats, hist or History(), path="/tmp/x.sock", interval=1.0, error=error,
                 width=width, height=height, **kw)
    return [t for t, _ in out]


def test_history_rates_and_resets() -> None:
    h = History()
    assert h.scan_rate() is None and h.full_scans_per_minute() is None
    h.add(0.0, sample_stats(pages_scanned=1000, full_scans=10))
    h.add(2.0, sample_stats(pages_scanned=5000, full_scans=12))
    h.add(4.0, sample_stats(pages_scanned=6000, full_scans=14))
    assert h.scan_rate() == 500.0                      # last two samples
    assert h.full_scans_per_minute() == 60.0           # 4 scans in 4 s
    # run=2 sets full_scans back to 0: no negative rates, a fresh start
    h.add(5.0, sample_stats(pages_scanned=6100, full_scans=0))
    assert h.scan_rate() is None and h.full_scans_per_minute() is None
    # another coordinator (restart): same
    h.add(6.0, sample_stats(pages_scanned=7000, full_scans=1))
    h.add(7.0, sample_stats(pages_scanned=8000, full_scans=2, coordinator_pid=9))
    assert h.scan_rate() is None
    assert list(h.saved)[-1] == 32 * PAGE_SIZE


def test_history_keeps_a_minute_of_rate_samples() -> None:
    h = History()
    for t in range(200):
        h.add(float(t), sample_stats(pages_scanned=t * 10, full_scans=t))
    assert h.samples[-1][0] - h.samples[0][0] <= 60
    assert h.full_scans_per_minute() == pytest.approx(60.0)


def test_sparkline() -> None:
    assert sparkline([0, 0, 0], 10, True) == "   "
    assert sparkline([1, 2, 3, 4], 2, True) == sparkline([3, 4], 2, True)
    s = sparkline([0, 5, 10], 10, True)
    assert s[0] == " " and s[-1] == "@" and len(s) == 3
    assert sparkline([0, 10], 10, False)[-1] == "\u2588"
    assert sparkline([1, 2], 0, True) == ""


def test_fmt_bytes() -> None:
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(-3 * 2**20) == "-3.0 MiB"
    assert fmt_bytes(2**50) == "1024.0 TiB"


def test_full_screen_shows_everything() -> None:
    h = History()
    h.add(0.0, sample_stats(pages_sharing=10))
    h.add(1.0, sample_stats(pages_scanned=3000, full_scans=11))
    text = "\n".join(lines(sample_stats(pages_scanned=3000, full_scans=11), 80, 40, hist=h))
    for word in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
                 "pages_scanned", "full_scans", "general_profit", "stable pages", "rmap_items",
                 "run=1", "pages_to_scan=4096", "use_zero_pages=0", "ksm_rmap_items",
                 "ksm_merging_pages", "ksm_process_profit", "workers: 30", "saved (pages_sharing"):
        assert word in text, word
    assert "(2,000/s)" in text and "(60.0/min)" in text
    assert "stable_node_chains=0" in text               # numeric stats top does not know
    assert "... " in text and " more" in text           # 30 workers do not fit in 40 lines


@pytest.mark.parametrize("width", [1, 10, 29, 30, 31, 45, 69, 70, 80, 200])
@pytest.mark.parametrize("height", [1, 3, 4, 5, 8, 13, 24, 60])
def test_every_size_fits(width: int, height: int) -> None:
    for stats, error in [(sample_stats(), None), (None, "no coordinator at /tmp/x.sock: gone"),
                         (sample_stats(last_error="unmerge failed"), "closed")]:
        out = lines(stats, width, height, error=error)
        assert len(out) <= height
        assert all(len(t) <= width - 1 for t in out), out


def test_tiny_terminal_says_so() -> None:
    assert lines(sample_stats(), 20, 10) == ["20x10: too small"]
    assert lines(sample_stats(), 80, 3) == ["80x3: too small"]


def test_no_coordinator_message() -> None:
    out = lines(None, error="no coordinator at /tmp/x.sock: No such file or directory")
    assert out[1] == "no coordinator answers (retrying every 1 s)"
    assert out[2] == "  no coordinator at /tmp/x.sock: No such file or directory"
    assert len(out) == 3
    # lost after it answered: the last values stay, marked as such
    out = lines(sample_stats(), error="coordinator at /tmp/x.sock closed the connection")
    assert out[1] == "no coordinator answers (retrying every 1 s; last values below)"
    assert any("pages_sharing" in t for t in out)


def test_workers_sorted_by_profit_and_counted() -> None:
    st = sample_stats()
    st["workers"] = copy.deepcopy(st["workers"][:3])
    out = lines(st, 80, 40)
    rows = [t.split() for t in out if t.strip().split(" ")[0] in {"100", "101", "102"}]
    assert [r[0] for r in rows] == ["102", "101", "100"]
