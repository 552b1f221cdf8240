"""pytest plugin: test workers that build the same big fixtures share their pages.

Inactive unless asked for, with ``--shmdedup`` or the ini option
``shmdedup = true``: without it every hook returns at once (no coordinator, no
environment change, no region), and ``share()`` hands back what it was given
(after the same checks as when active: what it would refuse active, it refuses
inactive too).  Installing shmdedup must never change anyone's test run.

Active, the controller (the only process without pytest-xdist) starts one
coordinator process for the whole run and hands its socket to every xdist
worker, through ``$SHMDEDUP_SOCKET`` (set before the workers start) and
``workerinput``.  Tests put large arrays or buffers into regions with
:func:`share` or the session fixture ``shmdedup_array``, which merge them at
write time, chunk by chunk (``shmdedup.worker.loading``): identical pages of
different workers merge as they are written.  A thread of the controller
samples the coordinator's statistics during the run, each worker takes a last
look before its session fixtures go (workers are gone by the time the summary
is written), and the terminal summary reports the peak saving and how it was
made: ``shmdedup: 3 workers shared 612 MiB ...`` then ``shmdedup: how: ...``
(at write time, or by scanning; and why nothing merged, if nothing did).

Loaded by the ``pytest11`` entry point ``shmdedup``, or explicitly with
``-p shmdedup.tools.pytest_plugin``.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np
import pytest

if TYPE_CHECKING:   # imported when used: loading the plugin stays cheap
    from shmdedup.controls import ControlSettings
    from shmdedup.stats import Stats

_ArrayT = TypeVar("_ArrayT", bound="np.ndarray[Any, Any]")
_ScalarT = TypeVar("_ScalarT", bound=np.generic)

_INI = "shmdedup"
_SAMPLE_SECONDS = 0.1
# Whether share() makes regions in this process (the plugin is active here).
_active = False


# ---- the helpers tests use -----------------------------------------------------

@overload
def share(obj: _ArrayT) -> _ArrayT: ...
@overload
def share(obj: _ScalarT) -> _ScalarT: ...
@overload
def share(obj: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview: ...


def share(obj: Any) -> Any:
    """``shmdedup.share(obj)`` when the plugin is active in this process (a copy
    in a mergeable region, merged as it is copied: same type, dtype, shape,
    memory order and read-only flag; bytes-like objects come back as a
    memoryview that compares equal), else ``obj`` itself.  Either way it
    refuses what it could not keep (see ``shmdedup.share``), so a suite that
    passes without ``--shmdedup`` passes with it."""
    from shmdedup.worker import loading
    loading.check_shareable(obj)
    return loading.share(obj) if _active else obj


def region_of(obj: Any) -> Any:
    """The shmdedup Region behind an array or memoryview made by :func:`share`
    or ``shmdedup_array`` (None for anything else)."""
    from shmdedup.worker.loading import region_of as find
    return find(obj)


@pytest.fixture(scope="session")
def shmdedup_array() -> Callable[..., np.ndarray]:
    """``shmdedup_array(shape, dtype=float64, fill_fn=None, *, rows=None)``: a
    zeroed array in a mergeable region (a plain numpy array when the plugin is
    not active), filled in place and merged at write time.

    Without ``rows``, ``fill_fn(array)`` fills it whole and it is merged when
    the call returns (each worker holds one private copy meanwhile).  With
    ``rows``, ``fill_fn(block, start)`` is called for consecutive blocks of
    that many rows along the first axis, and each block is merged as soon as
    its call returns: a worker never holds more than a block or two of private
    pages (``shmdedup.fill``)."""

    def make(shape: Any, dtype: Any = np.float64, fill_fn: Callable[..., Any] | None = None, *,
             rows: int | None = None) -> np.ndarray:
        dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        if rows is not None:  # the same checks active or not: a suite runs the same either way
            if fill_fn is None or not dims:
                raise TypeError("shmdedup_array: rows= needs a fill_fn(block, start) and at least one dimension")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ValueError(f"shmdedup_array: rows must be an int >= 1, got {rows!r}")
        if not _active:
            arr = np.zeros(dims, dtype)
            if rows is not None:
                for start in range(0, dims[0], rows):
                    fill_fn(arr[start:start + rows], start)  # type: ignore[misc]
            elif fill_fn is not None:
                fill_fn(arr)
            return arr
        from shmdedup.worker import loading
        if rows is not None:
            return loading.fill(dims, dtype, fill_fn, rows=rows)  # type: ignore[arg-type]
        flat = dims if dims else (1,)

        def whole(block: np.ndarray, start: int) -> None:
            if fill_fn is not None:
                fill_fn(block.reshape(dims))

        return loading.fill(flat, dtype, whole, rows=max(1, flat[0])).reshape(dims)

    return make


# ---- hooks -------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shmdedup", "merge identical fixture pages across test workers")
    group.addoption("--shmdedup", action="store_true", default=None,
                    help="start a shmdedup coordinator for this run; share() and shmdedup_array then "
                         "put arrays in mergeable shared memory (also: ini option shmdedup = true)")
    group.addoption("--shmdedup-set", action="append", default=[], metavar="NAME=VALUE",
                    help="a coordinator control, e.g. sleep_millisecs=0 (repeatable)")
    parser.addini(_INI, "activate the shmdedup plugin (like --shmdedup)", type="bool", default=False)


def _is_active(config: pytest.Config) -> bool:
    opt = config.getoption("shmdedup", None)
    return bool(opt) if opt is not None else bool(config.getini(_INI))


def _controls(config: pytest.Config) -> ControlSettings:
    from shmdedup.controls import check_control
    out: dict[str, int] = {}
    for text in config.getoption("shmdedup_set") or []:
        name, sep, value = text.partition("=")
        try:
            if not sep:
                raise ValueError(f"expected NAME=VALUE, got {text!r}")
            out[name.strip()] = check_control(name.strip(), int(value, 0))
        except ValueError as e:
            raise pytest.UsageError(f"--shmdedup-set: {e}") from None
    return cast("ControlSettings", out)   # every name checked by check_control


class _Run:
    """The controller's side: the coordinator and the sampler of its stats."""

    def __init__(self, controls: ControlSettings) -> None:
        from shmdedup.tools.embedded import Coordinator
        # The coordinator's stderr (its banner, and warnings such as a dropped
        # worker) goes to a log that the summary counts (and shows with -v).
        self.log = tempfile.TemporaryFile("w+")
        self.coord = Coordinator(process=True, stderr=self.log, **controls)
        try:
            self.coord.start()  # exports $SHMDEDUP_SOCKET: xdist workers start later
        except BaseException:
            self.log.close()
            raise
        self.peak: dict[str, int] = {"pages_sharing": 0, "pages_shared": 0}
        self.full_scans = 0
        self.workers: set[int] = set()
        # Per worker pid: its write-time counts (loading.write_time_stats), from its last look.
        self.written: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()
        from shmdedup.worker.region import PAGE_SIZE
        self.page_size = PAGE_SIZE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="shmdedup-sampler", daemon=True)
        self._thread.start()

    def add(self, snap: dict[str, Any]) -> None:
        """Fold in a snapshot (from the sampler, or a worker's last look)."""
        with self._lock:
            self.workers.update(snap["workers"])
            self.full_scans = max(self.full_scans, snap.get("full_scans", 0))
            if snap["pages_sharing"] > self.peak["pages_sharing"]:
                self.peak = {k: snap[k] for k in ("pages_sharing", "pages_shared")}
            if "write_time" in snap:
                self.written[snap["pid"]] = snap["write_time"]

    def _take(self, client: Any) -> None:
        self.add(_snapshot(client.stats()))

    def _sample_loop(self) -> None:
        from shmdedup.tools.client import Client
        from shmdedup.errors import Error
        client = None
        while True:
            stopping = self._stop.wait(_SAMPLE_SECONDS)
            try:
                if client is None:
                    client = Client(self.coord.socket_path, timeout=5)
                self._take(client)
            except (Error, OSError):
                if client is not None:
                    client.close()
                client = None
            if stopping:
                break
        if client is not None:
            client.close()

    def summary(self, verbose: bool) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        loaded = sum(w["pages_loaded"] for w in self.written.values())
        merged = sum(w["pages_merged_at_write"] for w in self.written.values())
        lines = summary_lines(len(self.workers), self.peak, self.full_scans, loaded, merged, self.page_size)
        self.log.seek(0)
        said = [line.rstrip() for line in self.log if line.strip() and "listening on" not in line]
        if verbose:
            return lines + [f"shmdedup coordinator: {line}" for line in said]
        if said:  # e.g. a worker that exited with a request in flight
            lines.append(f"shmdedup: the coordinator logged {len(said)} line(s); -v shows them")
        return lines

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        try:
            self.coord.stop()
        finally:
            self.log.close()


def summary_lines(workers: int, peak: dict[str, int], full_scans: int, loaded: int, merged: int,
                  page_size: int) -> list[str]:
    """What the run saved (the peak of pages_sharing), and how: at write time
    (pages the workers wrote with share(), shmdedup_array or the loading
    helpers, and how many of those merge_now merged at once) or by scanning.
    Said plainly when nothing merged, with the likely reason."""
    if not workers:
        return ["shmdedup: no worker shared anything (put arrays in regions with "
                "shmdedup.tools.pytest_plugin.share() or the shmdedup_array fixture)"]
    who = f"{workers} worker{'s' if workers != 1 else ''}"
    sharing = peak["pages_sharing"]
    scans = f"full_scans {full_scans}"
    if sharing:
        mib = sharing * page_size / 2**20
        size = f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"
        lines = [f"shmdedup: {who} shared {size} MiB (peak pages_sharing {sharing}, "
                 f"pages_shared {peak['pages_shared']})"]
    else:
        lines = [f"shmdedup: {who} shared nothing (pages_sharing stayed 0)"]
    if merged:
        rest = loaded - merged
        how = (f"shmdedup: how: {merged} of the {loaded} pages written with share()/shmdedup_array merged "
               f"at write time")
        lines.append(how + (f"; the scan merges the rest and any other advised pages ({scans})" if rest
                            else f"; the scan handles the other advised pages ({scans})"))
    elif loaded:
        lines.append(f"shmdedup: how: by scanning only ({scans}): none of the {loaded} pages written with "
                     f"share()/shmdedup_array merged at write time (merge_now merged none: run was not 1, or "
                     f"the coordinator could not make stable pages)")
    else:
        lines.append(f"shmdedup: how: by scanning only ({scans}); share() and shmdedup_array merge at write time")
    if not sharing and full_scans < 2:
        lines.append(f"shmdedup: the workers finished before the coordinator's second full scan ({scans}): a "
                     f"page the scan finds merges at its first visit, which only a full scan that starts "
                     f"after the page was written is sure to make")
    return lines


def _snapshot(stats: Stats) -> dict[str, Any]:
    return {"pages_sharing": stats["pages_sharing"], "pages_shared": stats["pages_shared"],
            "full_scans": stats["full_scans"],
            "workers": [w["pid"] for w in stats["workers"] if w["regions"]]}


def _last_look(stats: Stats) -> dict[str, Any]:
    """A worker's snapshot before its session fixtures go: the coordinator's
    view plus what this process wrote at write time."""
    import os
    from shmdedup.worker.loading import write_time_stats
    from shmdedup.worker.region import open_regions
    snap = dict(_snapshot(stats), pid=os.getpid(), write_time=write_time_stats())
    if open_regions() and os.getpid() not in snap["workers"]:
        # Its agent registers in the background: the coordinator may not list
        # it yet, but this process holds regions, so it is one of the workers.
        snap["workers"].append(os.getpid())
    return snap


_run_key = pytest.StashKey[_Run]()


def pytest_configure(config: pytest.Config) -> None:
    global _active
    if not _is_active(config):
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: use the controller's coordinator
        path = workerinput.get("shmdedup_socket")
        if path:
            from shmdedup.worker.agent import set_socket
            set_socket(path)
    else:
        from shmdedup.errors import Error
        try:
            config.stash[_run_key] = _Run(_controls(config))
        except (Error, OSError) as e:
            raise pytest.UsageError(f"shmdedup: could not start a coordinator: {e}") from e
    _active = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    run = node.config.stash.get(_run_key, None)
    if run is not None:
        node.workerinput["shmdedup_socket"] = run.coord.socket_path


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Before the last teardown of this process (session fixtures, their regions
    still alive) look at the coordinator's stats once: the first worker to
    finish sees everyone's merged pages, which a periodic sample may miss."""
    if not _active or nextitem is not None:
        return
    from shmdedup.tools.client import Client
    from shmdedup.errors import Error
    config = item.config
    path = getattr(config, "workerinput", {}).get("shmdedup_socket")
    try:
        with Client(path, timeout=5) as client:
            snap = _last_look(client.stats())
    except (Error, OSError):
        return
    run = config.stash.get(_run_key, None)
    if run is not None:
        run.add(snap)
    elif hasattr(config, "workeroutput"):
        config.workeroutput["shmdedup"] = snap


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    run = node.config.stash.get(_run_key, None)
    snap = getattr(node, "workeroutput", None) or {}
    if run is not None and "shmdedup" in snap:
        run.add(snap["shmdedup"])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(_run_key, None)
    if run is not None:
        for line in run.summary(config.getoption("verbose") > 0):
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _active
    run = config.stash.get(_run_key, None)
    if run is not None:
        del config.stash[_run_key]
        run.stop()
    if _is_active(config):
        _active = False


__all__ = ["region_of", "share", "shmdedup_array"]
