"""The pytest plugin's terminal summary: what was saved and how (issue 14, defect 5).
The runs behind it are in tests/integration/test_pytest_plugin.py."""

from __future__ import annotations

from shmdedup.tools.pytest_plugin import summary_lines

PEAK0 = {"pages_sharing": 0, "pages_shared": 0}


def test_nothing_merged_before_the_second_full_scan_says_why() -> None:
    lines = summary_lines(2, PEAK0, 1, 0, 0, 4096)
    assert lines[0] == "shmdedup: 2 workers shared nothing (pages_sharing stayed 0)"
    assert lines[1].startswith("shmdedup: how: by scanning only (full_scans 1)")
    assert "finished before the coordinator's second full scan (full_scans 1)" in lines[2]
    assert not any("0.0 MiB" in line for line in lines)


def test_nothing_merged_after_two_full_scans_gives_no_reason() -> None:
    lines = summary_lines(1, PEAK0, 5, 0, 0, 4096)
    assert len(lines) == 2 and "second full scan" not in " ".join(lines)


def test_merged_at_write_time() -> None:
    lines = summary_lines(4, {"pages_sharing": 196608, "pages_shared": 65536}, 0, 262144, 262144, 4096)
    assert lines[0] == "shmdedup: 4 workers shared 768 MiB (peak pages_sharing 196608, pages_shared 65536)"
    assert lines[1].startswith("shmdedup: how: 262144 of the 262144 pages written with share()/shmdedup_array "
                               "merged at write time")
    assert len(lines) == 2  # no excuse needed before the second full scan: it merged anyway


def test_written_but_left_to_the_scan() -> None:
    lines = summary_lines(2, {"pages_sharing": 2048, "pages_shared": 2048}, 9, 4096, 0, 4096)
    assert lines[0].startswith("shmdedup: 2 workers shared 8.0 MiB")
    assert lines[1].startswith("shmdedup: how: by scanning only (full_scans 9): none of the 4096 pages")


def test_no_worker() -> None:
    assert summary_lines(0, PEAK0, 3, 0, 0, 4096)[0].startswith("shmdedup: no worker shared anything")
