"""The scan-time advisor's policy, with plain numbers."""

from shmdedup.coordinator.scan.advisor import ScanSample, advise

KW = dict(target_scan_time=10.0, max_cpu_percent=50.0, min_pages=500, max_pages=100_000)


def test_slow_scan_speeds_up_and_fast_scan_slows_down() -> None:
    slow = advise(4096, ScanSample(wall_s=40.0, cpu_s=4.0, pages=100_000), **KW)
    fast = advise(4096, ScanSample(wall_s=2.0, cpu_s=0.2, pages=100_000), **KW)
    assert slow > 4096 > fast


def test_cpu_cap_limits_growth() -> None:
    # The scan was 4x too slow but already used 40% of a CPU: at most +25%.
    n = advise(4096, ScanSample(wall_s=40.0, cpu_s=16.0, pages=100_000), **KW)
    assert 4096 < n <= 4096 * 50 / 40


def test_clamped_to_min_and_max() -> None:
    assert advise(600, ScanSample(0.01, 0.0, 10), **KW) == 500
    assert advise(100_000, ScanSample(1000.0, 1.0, 10**7), **KW) == 100_000


def test_repeated_samples_converge_to_target() -> None:
    # A scan of P pages takes P / n * 0.02 s at n pages per 20 ms batch.
    n, pages = 4096, 1_000_000
    for _ in range(60):
        wall = pages / n * 0.02
        n = advise(n, ScanSample(wall, wall * 0.1, pages), **KW)
    assert abs(pages / n * 0.02 - 10.0) < 1.0


def test_degenerate_samples_keep_the_value() -> None:
    assert advise(4096, ScanSample(0.0, 0.0, 0), **KW) == 4096
