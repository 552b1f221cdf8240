"""Prometheus ``/metrics`` of a coordinator, scraped over HTTP like Prometheus does.

A coordinator with ``metrics_port=0`` and a spawned worker whose 48 pages hold
16 distinct contents; once they merge (checked from outside too: the worker's
backing object holds no page), the scrape must say what ``stats()`` says.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest

import shmdedup
from tests.helpers import (  # noqa: F401
    REPEATING_WORKER_SETUP,
    REPO_ROOT,
    Worker,
    allocated_bytes,
    child_env,
    no_shm_leftovers,
    reaper,
    run_python,
    wait_for,
)

parser = pytest.importorskip("prometheus_client.parser")

pytestmark = pytest.mark.usefixtures("no_shm_leftovers")

NPAGES, DISTINCT = 48, 16
TIMEOUT = 30.0


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="sd-metrics-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def merged_worker(path: str, coord: shmdedup.Coordinator) -> tuple[Worker, int]:
    worker = Worker()
    pid, fds = worker.run(REPEATING_WORKER_SETUP, path=path, npages=NPAGES, distinct=DISTINCT)
    try:
        wait_for(lambda: coord.stats()["pages_sharing"] == NPAGES - DISTINCT, TIMEOUT,
                 "the worker's pages to merge")
        wait_for(lambda: allocated_bytes(fds[0]) == 0, TIMEOUT, "the backing object to be punched")
    finally:
        os.close(fds[0])
    return worker, pid


def test_scrape_matches_stats_after_merging(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, sleep_millisecs=5, metrics_port=0,
                              advisor_mode=0) as coord:
        port = coord.metrics_port
        assert isinstance(port, int) and port > 0
        worker, pid = merged_worker(path, coord)
        coord.wait_full_scans(2)
        stats = coord.stats()
        assert stats["metrics_port"] == port
        # Counters keep moving while it scans; the snapshot is at most 0.5 s
        # old, so wait for a scrape at or past what stats() said.
        m = wait_for(lambda: (s := scrape(port)) and
                     value(s, "shmdedup_full_scans_total") >= stats["full_scans"] and s,
                     TIMEOUT, "a snapshot at least as new as stats()")
        assert value(m, "shmdedup_pages_sharing") == stats["pages_sharing"] == NPAGES - DISTINCT
        assert value(m, "shmdedup_pages_shared") == stats["pages_shared"] == DISTINCT
        assert value(m, "shmdedup_stable_pages") == stats["stable_pages_allocated"] == DISTINCT
        for key, name in [("pages_unshared", "shmdedup_pages_unshared"),
                          ("pages_volatile", "shmdedup_pages_volatile"),
                          ("ksm_zero_pages", "shmdedup_zero_pages"),
                          ("general_profit", "shmdedup_general_profit_bytes")]:
            assert value(m, name) == stats[key], name
        assert value(m, "shmdedup_pages_scanned_total") >= stats["pages_scanned"] >= NPAGES
        for name in ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing",
                     "max_kernel_pages", "use_zero_pages"):
            assert value(m, "shmdedup_control", name=name) == stats[name], name
        assert value(m, "shmdedup_control", name="sleep_millisecs") == 5
        assert value(m, "shmdedup_workers") == 1
        assert value(m, "shmdedup_page_size_bytes") == shmdedup.PAGE_SIZE
        w = next(w for w in stats["workers"] if w["pid"] == pid)
        assert value(m, "shmdedup_worker_merging_pages", pid=str(pid)) == w["ksm_merging_pages"] == NPAGES
        assert value(m, "shmdedup_worker_rmap_items", pid=str(pid)) == w["ksm_rmap_items"]
        assert value(m, "shmdedup_worker_zero_pages", pid=str(pid)) == 0
        assert value(m, "shmdedup_worker_profit_bytes", pid=str(pid)) == w["ksm_process_profit"]

        # The worker goes away: its series go with it, and the pages stop sharing.
        worker.close()
        wait_for(lambda: value(scrape(port), "shmdedup_worker_merging_pages", pid=str(pid)) is None,
                 TIMEOUT, "the dead worker's series to disappear")
        m = scrape(port)
        assert value(m, "shmdedup_workers") == 0
        assert value(m, "shmdedup_pages_sharing") == 0


def test_idle_coordinator_scrapes_fresh_values(sockdir: str) -> None:
    """Nothing registered: the loop blocks in select, yet a control set just now
    shows up in the next scrape (the scrape asks the loop for a snapshot)."""
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, metrics_port=0) as coord:
        port = coord.metrics_port
        assert value(scrape(port), "shmdedup_control", name="pages_to_scan") == 4096
        for n in (1234, 777, 4321):
            coord.set("pages_to_scan", n)
            assert value(scrape(port), "shmdedup_control", name="pages_to_scan") == n


def test_metrics_listen_on_loopback_only(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, metrics_port=0) as coord:
        port = coord.metrics_port
        with open("/proc/net/tcp") as f:
            listening = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
        assert f"0100007F:{port:04X}" in listening          # 127.0.0.1, from the kernel's view
        assert not any(a.endswith(f":{port:04X}") and a != f"0100007F:{port:04X}" for a in listening)


def test_standalone_coordinator_serves_metrics(sockdir: str) -> None:
    """``shmdedup coordinator --metrics-port 0`` in a child process (process=True)."""
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, process=True, export_env=False, metrics_port=0,
                              pages_to_scan=999) as coord:
        port = coord.metrics_port
        assert port and coord.stats()["metrics_port"] == port
        assert value(scrape(port), "shmdedup_control", name="pages_to_scan") == 999


def test_cli_metrics_errors_are_clear(sockdir: str) -> None:
    """A bad port is a usage error (exit 2), a busy one a failure (exit 1): one
    line on stderr, no traceback, no socket left."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for port, expect, code in [
                ("70000", "argument --metrics-port: expected a TCP port between 0 and 65535", 2),
                (str(busy.getsockname()[1]), "cannot serve metrics on 127.0.0.1:", 1)]:
            path = os.path.join(sockdir, "c.sock")
            r = subprocess.run([sys.executable, "-m", "shmdedup", "coordinator", "--socket", path,
                                "--metrics-port", port], capture_output=True, text=True,
                               env=child_env(), cwd=str(REPO_ROOT), timeout=60)
            assert r.returncode == code, r.stderr
            assert expect in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert not os.path.exists(path)
    finally:
        busy.close()


def test_missing_prometheus_client_is_a_clear_error(sockdir: str) -> None:
    path = os.path.join(sockdir, "c.sock")
    r = run_python("""
        import os, sys
        sys.modules["prometheus_client"] = None        # as if not installed
        from shmdedup.coordinator.server import CoordinatorServer
        from shmdedup.coordinator.metrics import MetricsUnavailableError
        try:
            CoordinatorServer(sys.argv[1], metrics_port=0)
        except MetricsUnavailableError as e:
            assert isinstance(e, ImportError)
            print(e)
        assert not os.path.exists(sys.argv[1])
    """, args=(path,))
    r.check()
    assert "pip install 'shmdedup[prometheus]'" in r.stdout
