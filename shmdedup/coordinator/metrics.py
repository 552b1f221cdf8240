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

Any local user can reach the port, so the server is bounded on its own
(prometheus_client's ``start_http_server`` takes no timeout and no connection
cap, so this is a small ``wsgiref`` server around its WSGI app): at most
``MAX_CONNECTIONS`` requests are served at once (one thread each; more are
closed at accept), every read and write times out after ``IO_TIMEOUT``, and a
connection is shut down ``REQUEST_DEADLINE`` seconds after accept whatever it
does (a slow sender or reader cannot hold a thread and a descriptor).  Out of
descriptors at accept, the server sleeps (up to ``ACCEPT_BACKOFF_MAX``)
instead of spinning.  None of this counts against the coordinator's quotas;
the coordinator sets ``MAX_CONNECTIONS`` descriptors aside for it.

Names follow Prometheus conventions: counters end in ``_total``, byte values in
``_bytes``; controls are one gauge with a ``name`` label, per-worker values
carry a ``pid`` label.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from shmdedup.controls import CONTROLS
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
log = logging.getLogger("shmdedup.metrics")

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
    "rmap_items": ("rmap_items", "Worker pages the scanner tracks"),
    "fds_held": ("descriptors_held", "Descriptors the coordinator holds for its peers"),
}
COUNTERS: dict[str, tuple[str, str]] = {
    "pages_scanned": ("pages_scanned", "Pages visited by the scanner"),
    "full_scans": ("full_scans", "Completed passes over every advised page"),
    "pages_merged_inline": ("pages_merged_inline", "Pages merged at write time (Region.merge_now)"),
}
WORKER_GAUGES: dict[str, tuple[str, str]] = {
    "ksm_merging_pages": ("worker_merging_pages", "Pages of the worker mapped to stable pages"),
    "ksm_rmap_items": ("worker_rmap_items", "Pages of the worker the scanner tracks"),
    "ksm_zero_pages": ("worker_zero_pages", "Pages of the worker mapped to the zero page"),
    "ksm_process_profit": ("worker_profit_bytes", "Bytes the worker saves minus its scanner metadata"),
}


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
        self.published_at = 0.0
        self.requested = False
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

    def describe(self) -> list:
        return []  # names are dynamic (per worker): nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap = self.fresh()
        if snap is None:
            return
        for key, (name, doc) in GAUGES.items():
            if key in snap:
                yield GaugeMetricFamily(f"shmdedup_{name}", doc, value=snap[key])
        for key, (name, doc) in COUNTERS.items():
            if key in snap:
                yield CounterMetricFamily(f"shmdedup_{name}", doc, value=snap[key])
        yield GaugeMetricFamily("shmdedup_page_size_bytes", "Page size: pages times this is bytes",
                                value=PAGE_SIZE)
        controls = GaugeMetricFamily("shmdedup_control", "Control values (/sys/kernel/mm/ksm names)",
                                     labels=["name"])
        for name in sorted(CONTROLS):
            if name in snap:
                controls.add_metric([name], snap[name])
        yield controls
        workers = snap.get("workers", [])
        yield GaugeMetricFamily("shmdedup_workers", "Workers connected", value=len(workers))
        for key, (name, doc) in WORKER_GAUGES.items():
            g = GaugeMetricFamily(f"shmdedup_{name}", doc, labels=["pid"])
            for w in workers:
                g.add_metric([str(w["pid"])], w.get(key, 0))
            yield g


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
        self.refused = 0                          # connections closed at the cap
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
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError as e:
            raise MetricsUnavailableError(
                "metrics need prometheus_client: pip install 'shmdedup[prometheus]'") from e
        self._wake_fd = wake_fd
        self._wake_lock = threading.Lock()   # no write to the fd once close() returned
        self.collector = StatsCollector(self._wake)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self.httpd = make_server(BIND_ADDRESS, port, make_wsgi_app(registry),
                                     _BoundedServer, handler_class=_QuietHandler)
        except OSError as e:
            raise MetricsBindError(e.errno, f"cannot serve metrics on {BIND_ADDRESS}:{port}: "
                                            f"{e.strerror or e}") from e
        self.port: int = self.httpd.server_port
        self.max_connections = self.httpd.max_connections
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


__all__ = ["MetricsBindError", "MetricsServer", "MetricsUnavailableError", "StatsCollector"]
