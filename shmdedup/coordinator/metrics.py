"""Prometheus metrics of a coordinator: ``/metrics`` on a loopback port.

Optional (``pip install 'shmdedup[prometheus]'``): ``CoordinatorServer(...,
metrics_port=N)`` or ``shmdedup coordinator --metrics-port N`` starts an HTTP
server bound to 127.0.0.1 only (0 picks a free port) in a thread of its own.

Invariant: the HTTP thread never touches the coordinator's state.  The
coordinator is single-threaded (its event loop owns the scanner's arrays), so
the loop *publishes* a snapshot, a fresh ``stats()`` dict that nobody mutates
afterwards, by swapping one attribute (atomic in CPython): after a step of the
loop at most every ``PUBLISH_INTERVAL`` seconds, and whenever a scrape asks.
A scrape pokes the loop through its wake pipe and waits up to ``SCRAPE_WAIT``
for a snapshot newer than its own start, so what it reports is what
``stats()`` would have said then, even from an idle loop blocked in select;
if the loop is busy longer (a long batch), it reports the latest snapshot,
at most ``PUBLISH_INTERVAL`` plus one batch old.  With metrics off none of
this exists.

Any local user can reach the port, so the server is bounded on its own: at
most ``MAX_CONNECTIONS`` requests are served at once (one thread each; more
are closed at accept), every read and write times out after ``IO_TIMEOUT``,
and a connection is shut down ``REQUEST_DEADLINE`` seconds after accept
whatever it does (a slow sender or reader cannot hold a thread and a
descriptor).  Out of descriptors at accept, the server sleeps (up to
``ACCEPT_BACKOFF_MAX``) instead of spinning.  None of this counts against the
coordinator's quotas; the coordinator sets ``MAX_CONNECTIONS`` descriptors
aside for it.

Why not prometheus_client's ``start_http_server``: it can be shut down since
0.20 (it returns the server and its thread), but up to 0.26 at least it
starts a thread per connection with no cap, sets no socket timeout and no
deadline, and logs a traceback per failed request: one local user holding
half-sent requests open would pin a thread and a descriptor each, forever.
So this is a small ``wsgiref`` server of our own around prometheus_client's
WSGI app (``make_wsgi_app``), the part of it that is the exposition.

What is exported (docs/guide.md, "Prometheus", has the table): every number
of ``stats()`` that means something as a time series, under Prometheus's
conventions: counters end in ``_total``, values are in base units (bytes,
seconds, ratios 0-1; pages stay pages, with ``shmdedup_page_size_bytes`` to
convert), each control is a gauge of its own (``shmdedup_sleep_seconds`` for
``sleep_millisecs``, as node_exporter's KSM collector has
``node_ksmd_sleep_seconds``), per-worker values carry a ``pid`` label and
per-uid ones a ``uid`` label; ``last_error`` and the build are info metrics
(``..._info{...} 1``).  ``LEFT_OUT`` names the statistics that are not
metrics, and why.  The registry is private (the host application's default
one is not ours to fill), so the process, platform and GC collectors that
prometheus_client's default registry carries are added to it: the
``process_*`` families describe the coordinator's process (with an embedded
``Coordinator``, the application it is a thread of).
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from shmdedup.errors import Error
from shmdedup.pages import PAGE_SIZE, check_int
from shmdedup.coordinator.security import LogLimiter

PUBLISH_INTERVAL = 0.5   # seconds between snapshots while the loop is busy
SCRAPE_WAIT = 1.0        # how long a scrape waits for the loop to publish
BIND_ADDRESS = "127.0.0.1"
MAX_CONNECTIONS = 8      # requests served at once; more are closed at accept
IO_TIMEOUT = 5.0         # s: one read or write of a connection
REQUEST_DEADLINE = 10.0  # s from accept: then the connection is shut down
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
log: logging.Logger = logging.getLogger("shmdedup.metrics")

# stats() key -> (metric name without the shmdedup_ prefix, help); gauges.
GAUGES: dict[str, tuple[str, str]] = {
    "pages_shared": ("pages_shared", "Stable pages in use (each shared by at least one worker page)"),
    "pages_sharing": ("pages_sharing", "Worker pages mapped to stable pages beyond the first: the pages saved"),
    "pages_unshared": ("pages_unshared", "Unique pages waiting in the unstable index"),
    "pages_volatile": ("pages_volatile", "Tracked pages in no index (changing too fast, or first seen)"),
    "ksm_zero_pages": ("zero_pages", "Pages mapped to the zero page (use_zero_pages)"),
    "general_profit": ("general_profit_bytes", "Bytes saved minus the scanner's metadata"),
    "stable_pages_allocated": ("stable_pages", "Pages allocated in the stable segment"),
    "stable_node_chains": ("stable_node_chains", "Checksums with more than one stable page"),
    "stable_node_dups": ("stable_node_dups", "Stable pages inside those chains"),
    "pages_inherited": ("pages_inherited",
                        "Worker pages merged by a previous coordinator, left on its stable object"),
    "rmap_items": ("rmap_items", "Worker pages the scanner tracks"),
    "fds_held": ("descriptors_held", "Descriptors the coordinator holds for its peers"),
    "fds_budget": ("descriptors_budget", "Descriptors the coordinator may hold for its peers"),
}
# stats() key -> (name without _total, which prometheus_client appends, help, what
# to divide by for the base unit); counters (cumulative, like /sys/kernel/mm/ksm's).
COUNTERS: dict[str, tuple[str, str, float]] = {
    "pages_scanned": ("pages_scanned", "Pages visited by the scanner", 1),
    "full_scans": ("full_scans", "Completed passes over every advised page", 1),
    "pages_skipped": ("pages_skipped", "Page visits skipped by smart_scan", 1),
    "pages_skipped_budget": ("pages_skipped_budget",
                             "Merges skipped by the per-worker mapping budget (max_mappings)", 1),
    "pages_merged_inline": ("pages_merged_inline", "Pages merged at write time (Region.merge_now)", 1),
    "merge_now_cpu_usecs": ("merge_now_cpu_seconds",
                            "CPU time of the coordinator spent on merge_now requests", 1_000_000),
}
# Control -> (name, what to divide by for the base unit, help): one gauge each, like
# node_exporter's node_ksmd_* (a single family with a name label would mix
# milliseconds, seconds, percents and pages).
CONTROL_GAUGES: dict[str, tuple[str, float, str]] = {
    "run": ("run", 1, "0 stopped, 1 scanning, 2 unmerging everything"),
    "pages_to_scan": ("pages_to_scan", 1, "Pages the scanner visits per batch"),
    "sleep_millisecs": ("sleep_seconds", 1000, "Pause between two batches of the scanner"),
    "max_page_sharing": ("max_page_sharing", 1, "Most worker pages on one stable page"),
    "max_kernel_pages": ("max_kernel_pages", 1, "Most stable pages in use (0: no cap)"),
    "use_zero_pages": ("use_zero_pages", 1, "1: all-zero pages go to the zero page"),
    "smart_scan": ("smart_scan", 1, "1: pages that keep failing to merge are skipped for a while"),
    "advisor_mode": ("advisor_mode", 1, "0 none, 1 the scan-time advisor sets pages_to_scan"),
    "advisor_target_scan_time": ("advisor_target_scan_time_seconds", 1,
                                 "How long one full scan should take (advisor)"),
    "advisor_max_cpu": ("advisor_max_cpu_ratio", 100, "CPU cap of the scanner, of one core (advisor)"),
    "advisor_min_pages_to_scan": ("advisor_min_pages_to_scan", 1, "Lower bound of pages_to_scan (advisor)"),
    "advisor_max_pages_to_scan": ("advisor_max_pages_to_scan", 1, "Upper bound of pages_to_scan (advisor)"),
    "inline_keep_millisecs": ("inline_keep_seconds", 1000,
                              "How long a stable page made by merge_now escapes the give-back rule"),
    "merge_zero_pages_only": ("merge_zero_pages_only", 1, "1: only all-zero pages are merged"),
    "max_connections": ("max_connections", 1, "Most connections"),
    "max_regions_per_worker": ("max_regions_per_worker", 1, "Most regions of one worker"),
    "max_pages_per_worker": ("max_pages_per_worker", 1, "Most pages of one worker"),
    "max_msgs_per_sec": ("max_msgs_per_second", 1, "Messages one connection may send per second"),
    "max_msgs_burst": ("max_msgs_burst", 1, "Messages one connection may send in a burst"),
    "max_connections_per_uid": ("max_connections_per_uid", 1, "Most connections of one uid"),
    "max_regions_per_uid": ("max_regions_per_uid", 1, "Most regions of one uid"),
    "max_pages_per_uid": ("max_pages_per_uid", 1, "Most pages of one uid"),
    "max_fds": ("max_fds", 1, "Most descriptors held for peers (0: what RLIMIT_NOFILE left)"),
    "max_fds_per_uid": ("max_fds_per_uid", 1, "Most descriptors held for one uid (0: a quarter of max_fds)"),
    "max_mappings": ("max_mappings", 1, "Mappings a worker may reach through merges (estimated)"),
}
# Per worker (workers[] of stats()), with a pid label.
WORKER_GAUGES: dict[str, tuple[str, str]] = {
    "ksm_merging_pages": ("worker_merging_pages", "Pages of the worker mapped to stable pages"),
    "ksm_rmap_items": ("worker_rmap_items", "Pages of the worker the scanner tracks"),
    "ksm_zero_pages": ("worker_zero_pages", "Pages of the worker mapped to the zero page"),
    "ksm_inherited_pages": ("worker_inherited_pages", "Pages of the worker merged by a previous coordinator"),
    "ksm_process_profit": ("worker_profit_bytes", "Bytes the worker saves minus its scanner metadata"),
    "regions": ("worker_regions", "Regions the worker registered"),
    "pages": ("worker_pages", "Pages of the regions the worker registered"),
    "requests": ("worker_requests", "Merge and unmerge requests to the worker in flight"),
    "mappings_estimate": ("worker_mappings", "Mappings of the worker, as the mapping budget estimates them"),
}
WORKER_COUNTERS: dict[str, tuple[str, str]] = {
    "pages_merged_inline": ("worker_pages_merged_inline", "Pages the worker's merge_now calls merged"),
}
# Per uid (uids[] of stats(), the quotas' usage), with a uid label.
UID_GAUGES: dict[str, tuple[str, str]] = {
    "connections": ("uid_connections", "Connections of the uid"),
    "regions": ("uid_regions", "Regions the uid's workers (and ghosts) hold"),
    "pages": ("uid_pages", "Pages of the regions the uid's workers (and ghosts) hold"),
    "fds": ("uid_descriptors", "Descriptors the coordinator holds for the uid"),
}
# Statistics that are not metrics, and why (docs/guide.md lists them too).
LEFT_OUT: dict[str, str] = {
    "coordinator_pid": "names the process, which the scrape target already identifies "
                       "(process_start_time_seconds tells a restart)",
    "socket": "a path: it names the domain, for which the scrape config sets a label",
    "metrics_port": "the scrape target itself",
}
LAST_ERROR_MAX = 256   # characters of last_error in a label: it may quote a worker's message


class MetricsUnavailableError(Error, ImportError):
    """prometheus_client is not installed."""


class MetricsBindError(Error, OSError):
    """The metrics port could not be bound."""


class StatsCollector:
    """A prometheus_client collector over the last published snapshot.

    ``publish`` runs in the coordinator's loop; ``collect`` in HTTP threads.
    """

    def __init__(self, wake: Any = None) -> None:
        self.snapshot: dict[str, Any] | None = None
        self.published_at: float = 0.0
        self.requested: bool = False
        self._wake = wake
        self._generation = 0
        self._cond = threading.Condition()

    def due(self, now: float) -> bool:
        return self.requested or now - self.published_at >= PUBLISH_INTERVAL

    def publish(self, stats: dict[str, Any], now: float) -> None:
        with self._cond:
            self.published_at = now
            self.snapshot = stats      # one reference swap; the dict is never mutated
            self.requested = False
            self._generation += 1
            self._cond.notify_all()

    def fresh(self) -> dict[str, Any] | None:
        """A snapshot published after this call started (or, if the loop is
        busy for SCRAPE_WAIT, the latest one)."""
        with self._cond:
            start = self._generation
            self.requested = True
        if self._wake is not None:
            self._wake()
        with self._cond:
            self._cond.wait_for(lambda: self._generation > start, SCRAPE_WAIT)
            return self.snapshot

    def describe(self) -> list[Any]:
        return []  # names are dynamic (per worker): nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
        yield build_info(InfoMetricFamily)
        snap = self.fresh()
        if snap is None:
            return
        for key, (name, doc) in GAUGES.items():
            if key in snap:
                yield GaugeMetricFamily(f"shmdedup_{name}", doc, value=snap[key])
        for key, (name, doc, unit) in COUNTERS.items():
            if key in snap:
                yield CounterMetricFamily(f"shmdedup_{name}", doc, value=snap[key] / unit)
        yield GaugeMetricFamily("shmdedup_page_size_bytes", "Page size: pages times this is bytes",
                                value=PAGE_SIZE)
        for key, (name, unit, doc) in CONTROL_GAUGES.items():
            if key in snap:
                yield GaugeMetricFamily(f"shmdedup_{name}", f"{doc} (control {key})",
                                        value=snap[key] / unit)
        error = InfoMetricFamily("shmdedup_last_error", "Why the last run=2 failed (no sample: none did)")
        if snap.get("last_error"):
            text = snap["last_error"]
            if len(text) > LAST_ERROR_MAX:
                text = text[:LAST_ERROR_MAX - 3] + "..."
            error.add_metric([], {"error": text})
        yield error
        workers = snap.get("workers", [])
        yield GaugeMetricFamily("shmdedup_workers", "Workers connected", value=len(workers))
        for key, (name, doc) in WORKER_GAUGES.items():
            g = GaugeMetricFamily(f"shmdedup_{name}", doc, labels=["pid"])
            for w in workers:
                g.add_metric([str(w["pid"])], w.get(key, 0))
            yield g
        for key, (name, doc) in WORKER_COUNTERS.items():
            c = CounterMetricFamily(f"shmdedup_{name}", doc, labels=["pid"])
            for w in workers:
                c.add_metric([str(w["pid"])], w.get(key, 0))
            yield c
        uids = snap.get("uids", [])
        for key, (name, doc) in UID_GAUGES.items():
            g = GaugeMetricFamily(f"shmdedup_{name}", doc, labels=["uid"])
            for u in uids:
                g.add_metric([str(u["uid"])], u.get(key, 0))
            yield g


def build_info(info_family: Any) -> Any:
    """``shmdedup_build_info{version=..., python=...} 1``."""
    from shmdedup import __version__  # here: the package imports this wing lazily
    return info_family("shmdedup_build", "shmdedup's version and the Python running the coordinator",
                       value={"version": __version__, "python": platform.python_version()})


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request, at most ``max_connections`` at once, each shut
    down ``REQUEST_DEADLINE`` seconds after accept; accept backs off when
    descriptors run out (see the module docstring)."""

    daemon_threads = True
    block_on_close = False
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._active: dict[Any, float] = {}      # socket -> accepted at
        self._backoff = ACCEPT_BACKOFF_MIN
        self._warn = LogLimiter(log, rate=1.0, burst=10)
        self.refused: int = 0                         # connections closed at the cap
        super().__init__(*args, **kwargs)

    def get_request(self) -> Any:
        try:
            got = super().get_request()
        except OSError as e:
            if e.errno in _SHORTAGE:
                # The listener stays readable: sleep in this thread, not spin.
                self._warn.warning("accept", "metrics: accept failed: %s; pausing %.2f s",
                                   e, self._backoff)
                time.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, ACCEPT_BACKOFF_MAX)
            raise
        self._backoff = ACCEPT_BACKOFF_MIN
        return got

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            if len(self._active) >= self.max_connections:
                self.refused += 1
                return False                      # closed by the caller
            self._active[request] = time.monotonic()
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._active.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback per failed request: any local user
        # could fill the log with them.  One line, rate limited.
        self._warn.warning("request", "metrics: a request from %s failed: %s",
                           client_address[0], sys.exc_info()[1])

    def service_actions(self) -> None:
        """Every poll of serve_forever: end connections past their deadline
        (a shut-down socket wakes the handler thread blocked on it)."""
        self.end_connections(time.monotonic() - REQUEST_DEADLINE)

    def end_connections(self, accepted_before: float = float("inf")) -> None:
        with self._lock:
            late = [s for s, t in self._active.items() if t <= accepted_before]
        for s in late:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def active(self) -> int:
        with self._lock:
            return len(self._active)


class _QuietHandler(WSGIRequestHandler):
    timeout = IO_TIMEOUT   # socket timeout of every read and write

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news


class MetricsServer:
    """The HTTP server and the collector of one coordinator.

    ``wake_fd`` is the coordinator's wake pipe (written to ask the loop for a
    snapshot); ``port`` is the bound port (the free one picked for 0).
    """

    def __init__(self, port: int, wake_fd: int) -> None:
        port = check_int("metrics_port", port, 0, 65535)   # 0: any free port
        try:
            from prometheus_client import (
                CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector,
                make_wsgi_app)
        except ImportError as e:
            raise MetricsUnavailableError(
                "metrics need prometheus_client: pip install 'shmdedup[prometheus]'") from e
        self._wake_fd = wake_fd
        self._wake_lock = threading.Lock()   # no write to the fd once close() returned
        self.collector: StatsCollector = StatsCollector(self._wake)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        # What the default registry would carry (prometheus_client's own
        # collectors): process_* of this process, python_info, python_gc_*.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        try:
            self.httpd: _BoundedServer = make_server(BIND_ADDRESS, port, make_wsgi_app(registry),
                                                     _BoundedServer, handler_class=_QuietHandler)
        except OSError as e:
            raise MetricsBindError(e.errno, f"cannot serve metrics on {BIND_ADDRESS}:{port}: "
                                            f"{e.strerror or e}") from e
        self.port: int = self.httpd.server_port
        self.max_connections: int = self.httpd.max_connections
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.5,),
                                        name="shmdedup-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{BIND_ADDRESS}:{self.port}/metrics"

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_fd < 0:
                return
            try:
                os.write(self._wake_fd, b"m")
            except OSError:
                pass  # pipe full: the loop wakes anyway

    def tick(self, stats: Any) -> None:
        """Called by the loop after each step: publish ``stats()`` when due."""
        now = time.monotonic()
        if self.collector.due(now):
            self.collector.publish(stats(), now)

    def close(self) -> None:
        """Stop serving (before the loop closes its wake pipe)."""
        with self._wake_lock:
            self._wake_fd = -1
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.end_connections()   # requests in flight end now, not at their deadline
        self._thread.join(10)


# Internal to shmdedup, but for the errors a Coordinator(metrics_port=...) may raise.
__all__ = ["MetricsBindError", "MetricsUnavailableError"]
