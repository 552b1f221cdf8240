"""Prometheus ``/metrics`` of a coordinator, scraped over HTTP like Prometheus does
and read with prometheus_client's own parser.

A coordinator with ``metrics_port=0`` and a spawned worker whose 48 pages hold
16 distinct contents; once they merge (checked from outside too: the worker's
backing object holds no page), the scrape must say what ``stats()`` says.
Then every statistic, one by one: each number of ``stats()`` is a metric
(under the name and in the base unit this file lists, independently of the
module's tables) or one of the three left out; each control is a gauge of
its own in base units; ``last_error``, inherited pages, the mapping budget's
skips; and the ``process_*`` families are the coordinator's process's.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from typing import Any

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


def scrape_families(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return list(parser.text_string_to_metric_families(text))


def samples_of(families: list[Any]) -> Samples:
    out: Samples = {}
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> Samples:
    return samples_of(scrape_families(port))


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
        for name in ("run", "pages_to_scan", "max_page_sharing", "max_kernel_pages", "use_zero_pages"):
            assert value(m, f"shmdedup_{name}") == stats[name], name
        assert value(m, "shmdedup_sleep_seconds") == 0.005
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
        assert value(scrape(port), "shmdedup_pages_to_scan") == 4096
        for n in (1234, 777, 4321):
            coord.set("pages_to_scan", n)
            assert value(scrape(port), "shmdedup_pages_to_scan") == n


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
        assert value(scrape(port), "shmdedup_pages_to_scan") == 999


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


# ---- every statistic, under its name and in its base unit -------------------
# Written out here, not taken from the module's tables: this is what a
# dashboard reads.  stats() key -> (metric, what to divide by for the base unit).
STAT_METRICS: dict[str, tuple[str, float]] = {
    "pages_shared": ("shmdedup_pages_shared", 1),
    "pages_sharing": ("shmdedup_pages_sharing", 1),
    "pages_unshared": ("shmdedup_pages_unshared", 1),
    "pages_volatile": ("shmdedup_pages_volatile", 1),
    "ksm_zero_pages": ("shmdedup_zero_pages", 1),
    "general_profit": ("shmdedup_general_profit_bytes", 1),
    "stable_pages_allocated": ("shmdedup_stable_pages", 1),
    "stable_node_chains": ("shmdedup_stable_node_chains", 1),
    "stable_node_dups": ("shmdedup_stable_node_dups", 1),
    "pages_inherited": ("shmdedup_pages_inherited", 1),
    "rmap_items": ("shmdedup_rmap_items", 1),
    "fds_held": ("shmdedup_descriptors_held", 1),
    "fds_budget": ("shmdedup_descriptors_budget", 1),
    "pages_scanned": ("shmdedup_pages_scanned_total", 1),
    "full_scans": ("shmdedup_full_scans_total", 1),
    "pages_skipped": ("shmdedup_pages_skipped_total", 1),
    "pages_skipped_budget": ("shmdedup_pages_skipped_budget_total", 1),
    "pages_merged_inline": ("shmdedup_pages_merged_inline_total", 1),
    "merge_now_cpu_usecs": ("shmdedup_merge_now_cpu_seconds_total", 1_000_000),
    # the controls, one gauge each
    "run": ("shmdedup_run", 1),
    "pages_to_scan": ("shmdedup_pages_to_scan", 1),
    "sleep_millisecs": ("shmdedup_sleep_seconds", 1000),
    "max_page_sharing": ("shmdedup_max_page_sharing", 1),
    "max_kernel_pages": ("shmdedup_max_kernel_pages", 1),
    "use_zero_pages": ("shmdedup_use_zero_pages", 1),
    "smart_scan": ("shmdedup_smart_scan", 1),
    "advisor_mode": ("shmdedup_advisor_mode", 1),
    "advisor_target_scan_time": ("shmdedup_advisor_target_scan_time_seconds", 1),
    "advisor_max_cpu": ("shmdedup_advisor_max_cpu_ratio", 100),
    "advisor_min_pages_to_scan": ("shmdedup_advisor_min_pages_to_scan", 1),
    "advisor_max_pages_to_scan": ("shmdedup_advisor_max_pages_to_scan", 1),
    "inline_keep_millisecs": ("shmdedup_inline_keep_seconds", 1000),
    "merge_zero_pages_only": ("shmdedup_merge_zero_pages_only", 1),
    "max_connections": ("shmdedup_max_connections", 1),
    "max_regions_per_worker": ("shmdedup_max_regions_per_worker", 1),
    "max_pages_per_worker": ("shmdedup_max_pages_per_worker", 1),
    "max_msgs_per_sec": ("shmdedup_max_msgs_per_second", 1),
    "max_msgs_burst": ("shmdedup_max_msgs_burst", 1),
    "max_connections_per_uid": ("shmdedup_max_connections_per_uid", 1),
    "max_regions_per_uid": ("shmdedup_max_regions_per_uid", 1),
    "max_pages_per_uid": ("shmdedup_max_pages_per_uid", 1),
    "max_fds": ("shmdedup_max_fds", 1),
    "max_fds_per_uid": ("shmdedup_max_fds_per_uid", 1),
    "max_mappings": ("shmdedup_max_mappings", 1),
}
WORKER_METRICS: dict[str, str] = {   # workers[] key -> metric{pid=...}
    "ksm_merging_pages": "shmdedup_worker_merging_pages",
    "ksm_rmap_items": "shmdedup_worker_rmap_items",
    "ksm_zero_pages": "shmdedup_worker_zero_pages",
    "ksm_inherited_pages": "shmdedup_worker_inherited_pages",
    "ksm_process_profit": "shmdedup_worker_profit_bytes",
    "regions": "shmdedup_worker_regions",
    "pages": "shmdedup_worker_pages",
    "requests": "shmdedup_worker_requests",
    "mappings_estimate": "shmdedup_worker_mappings",
    "pages_merged_inline": "shmdedup_worker_pages_merged_inline_total",
}
UID_METRICS: dict[str, str] = {      # uids[] key -> metric{uid=...}
    "connections": "shmdedup_uid_connections",
    "regions": "shmdedup_uid_regions",
    "pages": "shmdedup_uid_pages",
    "fds": "shmdedup_uid_descriptors",
}
# Exported otherwise: last_error (an info metric), workers[] and uids[] (above).
# Not metrics (docs/guide.md says why):
NOT_METRICS = {"coordinator_pid", "socket", "metrics_port"}
PROCESS_FAMILIES = {"process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                    "process_open_fds", "process_max_fds", "process_start_time_seconds", "python_info",
                    "python_gc_collections"}

SETUP_UNIQUE_AND_INLINE = """
uniq = shmdedup.Region(16 * P)            # unique pages: smart_scan skips them in time
uniq.ndarray(np.uint8)[:] = np.random.default_rng(1).integers(0, 256, 16 * P, dtype=np.uint8)
uniq.advise(shmdedup.MERGEABLE)
inl = shmdedup.Region(16 * P)             # merged at write time
inl.ndarray(np.uint8)[:] = np.random.default_rng(2).integers(0, 256, 16 * P, dtype=np.uint8)
result = (inl.merge_now(), inl.allocated_bytes())
"""


def check_conventions(families: list[Any]) -> None:
    """Prometheus's naming rules, over a whole scrape."""
    names = [f.name for f in families]
    assert len(names) == len(set(names)), names
    ours = [f for f in families if f.name.startswith("shmdedup_")]
    assert "shmdedup_control" not in names             # the mixed-unit family is gone
    for f in ours:
        assert f.documentation, f.name
        assert not any(u in f.name for u in ("millisecs", "usecs", "percent", "msgs_per_sec_")), f.name
        if f.type == "counter":
            assert all(s.name == f.name + "_total" for s in f.samples), f.name
        else:
            assert not f.name.endswith("_total"), f.name
        if f.name.endswith("_ratio"):
            assert all(0 <= s.value <= 1 for s in f.samples), f.name
    assert PROCESS_FAMILIES <= set(names), PROCESS_FAMILIES - set(names)


def proc_start_time(pid: int | str) -> float:
    """Seconds since the epoch, as the kernel's starttime (clock ticks after boot)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b") ", 1)[1].split()
    with open("/proc/stat", "rb") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_stats(coord: shmdedup.Coordinator) -> dict[str, Any]:
    """stats() once nothing moves any more (run=0, no request in flight)."""
    last: list[dict[str, Any]] = [{}]

    def same() -> dict[str, Any] | None:
        s = coord.stats()
        same_as_before, last[0] = s == last[0], s
        return s if same_as_before and not any(w["requests"] for w in s["workers"]) else None
    return wait_for(same, TIMEOUT, "the statistics to settle")


def test_every_statistic_is_a_metric(sockdir: str) -> None:
    """Each number of stats() is in the scrape, under its name and in its base
    unit, with the same value (the loop stopped: nothing moves between the two)."""
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, metrics_port=0, advisor_mode=0, sleep_millisecs=5,
                              max_page_sharing=2, advisor_max_cpu=35, advisor_target_scan_time=7,
                              inline_keep_millisecs=45_000) as coord:
        port = coord.metrics_port
        worker = Worker()
        # 12 contents, 4 pages each: with max_page_sharing 2, two stable pages
        # per content (a chain of 2 dups).
        pid, fds = worker.run(REPEATING_WORKER_SETUP, path=path, npages=NPAGES, distinct=12)
        try:
            assert worker.call(SETUP_UNIQUE_AND_INLINE) == (16, 0)   # merged, punched
            wait_for(lambda: (s := coord.stats())["pages_sharing"] == 24 and s["pages_skipped"] > 0,
                     TIMEOUT, "the chains to form and smart_scan to skip the unique pages")
            wait_for(lambda: allocated_bytes(fds[0]) == 0, TIMEOUT, "the backing object to be punched")
        finally:
            os.close(fds[0])
        coord.set("run", 0)
        stats = settled_stats(coord)
        families = scrape_families(port)
        assert coord.stats() == stats                     # nothing moved meanwhile
        m = samples_of(families)
        check_conventions(families)

        assert set(stats) - set(STAT_METRICS) - {"last_error", "workers", "uids"} == NOT_METRICS
        for key, (name, unit) in STAT_METRICS.items():
            assert value(m, name) == stats[key] / unit, (key, name)
        assert (stats["stable_node_chains"], stats["stable_node_dups"]) == (12, 24)
        assert stats["pages_skipped"] > 0 and stats["pages_merged_inline"] == 16
        assert value(m, "shmdedup_merge_now_cpu_seconds_total") > 0
        assert value(m, "shmdedup_sleep_seconds") == 0.005
        assert value(m, "shmdedup_advisor_max_cpu_ratio") == 0.35
        assert value(m, "shmdedup_advisor_target_scan_time_seconds") == 7
        assert value(m, "shmdedup_inline_keep_seconds") == 45
        assert value(m, "shmdedup_run") == 0

        [w] = stats["workers"]
        assert set(w) - {"pid"} == set(WORKER_METRICS)
        for key, name in WORKER_METRICS.items():
            assert value(m, name, pid=str(pid)) == w[key], (key, name)
        assert value(m, "shmdedup_worker_pages_merged_inline_total", pid=str(pid)) == 16
        assert value(m, "shmdedup_worker_regions", pid=str(pid)) == 3
        assert stats["uids"] and [u["uid"] for u in stats["uids"]] == [os.getuid()]
        for u in stats["uids"]:
            assert set(u) - {"uid"} == set(UID_METRICS)
            for key, name in UID_METRICS.items():
                assert value(m, name, uid=str(u["uid"])) == u[key], (key, name)
        assert value(m, "shmdedup_uid_pages", uid=str(os.getuid())) == NPAGES + 32

        assert not [k for k in m if k[0] == "shmdedup_last_error_info"]   # none yet
        assert value(m, "shmdedup_build_info", version=shmdedup.__version__,
                     python=platform.python_version()) == 1
        # Embedded, the coordinator is a thread of this process: process_* are ours.
        assert value(m, "process_start_time_seconds") == pytest.approx(proc_start_time("self"), abs=1e-3)
        worker.close()


def test_process_metrics_are_the_coordinators(sockdir: str) -> None:
    """A standalone coordinator (process=True): process_* and python_info
    describe its process, read from outside through /proc/<pid>."""
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, process=True, export_env=False, metrics_port=0) as coord:
        port = coord.metrics_port
        cpid = coord.stats()["coordinator_pid"]
        assert cpid != os.getpid()
        cpu_before = proc_cpu_seconds(cpid)
        families = scrape_families(port)
        cpu_after = proc_cpu_seconds(cpid)
        check_conventions(families)
        m = samples_of(families)
        assert value(m, "process_start_time_seconds") == pytest.approx(proc_start_time(cpid), abs=1e-3)
        assert value(m, "process_start_time_seconds") != pytest.approx(proc_start_time("self"), abs=1e-3)
        # prometheus_client adds utime and stime in seconds: allow its rounding.
        assert cpu_before - 1e-9 <= value(m, "process_cpu_seconds_total") <= cpu_after + 1e-9
        with open(f"/proc/{cpid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        assert 0.8 * rss <= value(m, "process_resident_memory_bytes") <= 1.25 * rss
        assert abs(value(m, "process_open_fds") - len(os.listdir(f"/proc/{cpid}/fd"))) <= 4
        with open(f"/proc/{cpid}/limits") as f:
            soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
        assert value(m, "process_max_fds") == int(soft)
        v = sys.version_info
        assert value(m, "python_info", implementation=platform.python_implementation(), major=str(v.major),
                     minor=str(v.minor), patchlevel=str(v.micro), version=platform.python_version()) == 1
        assert value(m, "shmdedup_build_info", version=shmdedup.__version__,
                     python=platform.python_version()) == 1


def test_last_error_is_an_info_metric(sockdir: str) -> None:
    """A run=2 whose unmerge fails (the worker's copy-back mmaps fail with
    ENOMEM, through the test hook) leaves run at 0 and says why, in stats()
    and in shmdedup_last_error_info{error=...} 1."""
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, sleep_millisecs=5, metrics_port=0,
                              advisor_mode=0) as coord:
        port = coord.metrics_port
        worker, pid = merged_worker(path, coord)
        families = scrape_families(port)
        [info] = [f for f in families if f.name == "shmdedup_last_error_info"]
        assert info.samples == [] and info.documentation
        worker.call("from shmdedup import _native; _native._test_fail_mmaps(2)")
        with pytest.raises(shmdedup.ControlError, match="Cannot allocate memory"):
            coord.set("run", 2)
        stats = coord.stats()
        assert stats["run"] == 0 and "Cannot allocate memory" in stats["last_error"]
        m = scrape(port)
        assert [k for k in m if k[0] == "shmdedup_last_error_info"] == \
            [("shmdedup_last_error_info", (("error", stats["last_error"]),))]
        assert value(m, "shmdedup_last_error_info", error=stats["last_error"]) == 1
        assert value(m, "shmdedup_run") == 0
        worker.close()


def test_a_long_last_error_is_cut_in_its_label() -> None:
    """The label holds at most 256 characters (the text may quote a worker's
    message); quotes, backslashes and newlines survive the exposition."""
    from prometheus_client import CollectorRegistry, generate_latest

    from shmdedup.coordinator.metrics import StatsCollector
    collector = StatsCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    for text, expect in [('a "quoted"\\ text\nover two lines', 'a "quoted"\\ text\nover two lines'),
                         ("x" * 1000, "x" * 253 + "...")]:
        collector.publish({"last_error": text, "workers": [], "uids": []}, 0.0)
        m = samples_of(list(parser.text_string_to_metric_families(generate_latest(registry).decode())))
        assert value(m, "shmdedup_last_error_info", error=expect) == 1


def test_inherited_pages_after_a_restart(sockdir: str) -> None:
    """Pages a previous coordinator merged stay merged on its stable object
    (the backing object stays punched): the next one counts them apart, in
    shmdedup_pages_inherited and per worker."""
    path = os.path.join(sockdir, "c.sock")
    worker = Worker()
    with shmdedup.Coordinator(path, export_env=False, sleep_millisecs=5, advisor_mode=0) as first:
        pid, fds = worker.run(REPEATING_WORKER_SETUP, path=path, npages=NPAGES, distinct=DISTINCT)
        wait_for(lambda: first.stats()["pages_sharing"] == NPAGES - DISTINCT, TIMEOUT, "the pages to merge")
    try:
        wait_for(lambda: allocated_bytes(fds[0]) == 0, TIMEOUT, "the backing object to be punched")
        with shmdedup.Coordinator(path, export_env=False, sleep_millisecs=5, advisor_mode=0,
                                  metrics_port=0) as second:
            wait_for(lambda: second.stats()["pages_inherited"] == NPAGES, TIMEOUT,
                     "the worker to register again with the coordinator")
            m = wait_for(lambda: (s := scrape(second.metrics_port)) and
                         value(s, "shmdedup_pages_inherited") == NPAGES and s, TIMEOUT, "a fresh scrape")
            assert value(m, "shmdedup_worker_inherited_pages", pid=str(pid)) == NPAGES
            assert value(m, "shmdedup_pages_sharing") == value(m, "shmdedup_pages_shared") == 0
            assert allocated_bytes(fds[0]) == 0                # still merged, on the first one's object
    finally:
        os.close(fds[0])
        worker.close()


def test_mapping_budget_skips_are_counted(sockdir: str) -> None:
    """max_mappings=1: every merge would pass the budget, so none happens (the
    backing object keeps every page) and each is counted in
    shmdedup_pages_skipped_budget_total."""
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, sleep_millisecs=5, advisor_mode=0, max_mappings=1,
                              metrics_port=0) as coord:
        port = coord.metrics_port
        worker = Worker()
        pid, fds = worker.run(REPEATING_WORKER_SETUP, path=path, npages=NPAGES, distinct=DISTINCT)
        try:
            wait_for(lambda: coord.stats()["pages_skipped_budget"] > 0, TIMEOUT, "the budget to skip merges")
            coord.set("run", 0)
            stats = settled_stats(coord)
            m = scrape(port)
            assert allocated_bytes(fds[0]) == NPAGES * shmdedup.PAGE_SIZE   # nothing merged
        finally:
            os.close(fds[0])
        assert stats["pages_sharing"] == 0 and stats["pages_skipped_budget"] > 0
        assert value(m, "shmdedup_pages_skipped_budget_total") == stats["pages_skipped_budget"]
        assert value(m, "shmdedup_max_mappings") == 1
        [w] = stats["workers"]
        assert value(m, "shmdedup_worker_mappings", pid=str(pid)) == w["mappings_estimate"] > 1
        worker.close()


def test_guide_lists_every_family(sockdir: str) -> None:
    """docs/guide.md's Prometheus tables name exactly the shmdedup_* families a
    scrape has (counters with their _total)."""
    section = (REPO_ROOT / "docs" / "guide.md").read_text().split("### Prometheus", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1].split("{")[0] for line in section.splitlines()
              if line.startswith("| `shmdedup_")}
    path = os.path.join(sockdir, "c.sock")
    with shmdedup.Coordinator(path, export_env=False, metrics_port=0) as coord:
        families = scrape_families(coord.metrics_port)
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families
                if f.name.startswith("shmdedup_")}
    assert listed == exported, (listed - exported, exported - listed)
