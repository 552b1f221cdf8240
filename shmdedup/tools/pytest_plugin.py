"""pytest plugin: test workers that build the same big fixtures share their pages.

Inactive unless asked for, with ``--shmdedup`` or the ini option
``shmdedup = true``: without it every hook returns at once (no coordinator, no
environment change, no region), and ``share()`` hands back what it was given.
Installing shmdedup must never change anyone's test run.

Active, the controller (the only process without pytest-xdist) starts one
coordinator process for the whole run and hands its socket to every xdist
worker, through ``$SHMDEDUP_SOCKET`` (set before the workers start) and
``workerinput``.  Tests put large arrays or buffers into mergeable regions
with :func:`share` or the session fixture ``shmdedup_array``; identical pages
of different workers then merge.  A thread of the controller samples the
coordinator's statistics during the run (workers are gone by the time the
summary is written), and the terminal summary reports the peak saving:
``shmdedup: 3 workers shared 612 MiB``.

Loaded by the ``pytest11`` entry point ``shmdedup``, or explicitly with
``-p shmdedup.tools.pytest_plugin``.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np
import numpy.typing as npt
import pytest

if TYPE_CHECKING:   # imported when used: loading the plugin stays cheap
    from typing_extensions import Buffer   # collections.abc.Buffer from 3.12 on

    from shmdedup.controls import ControlSettings
    from shmdedup.stats import Stats
    from shmdedup.tools.client import Client
    from shmdedup.worker.region import Region

_INI = "shmdedup"
_SAMPLE_SECONDS = 0.1
# Whether share() makes regions in this process (the plugin is active here).
_active = False


# ---- the helpers tests use -----------------------------------------------------

_ShapeT = TypeVar("_ShapeT", bound=tuple[int, ...])
_DTypeT = TypeVar("_DTypeT", bound=np.dtype[Any])
_BufferT = TypeVar("_BufferT", bound="Buffer")


@overload
def share(array: np.ndarray[_ShapeT, _DTypeT]) -> np.ndarray[_ShapeT, _DTypeT]: ...
@overload
def share(array: _BufferT) -> _BufferT | npt.NDArray[np.uint8]: ...


def share(array: np.ndarray[Any, Any] | Buffer) -> np.ndarray[Any, Any] | Buffer:
    """A copy of ``array`` (a numpy array, or any buffer: returned as a uint8
    array) in a mergeable region, with the same shape and dtype; the region
    lives as long as the returned array.  When the plugin is not active in this
    process, ``array`` itself is returned unchanged."""
    if not _active:
        return array
    src = array if isinstance(array, np.ndarray) else np.frombuffer(memoryview(array), np.uint8)
    if src.nbytes == 0:
        return array
    out = _region_array(src.shape, src.dtype)
    out[...] = src
    _advise(out)
    return out


def region_of(array: np.ndarray[Any, Any]) -> Region | None:
    """The shmdedup Region behind an array made by :func:`share` or
    ``shmdedup_array`` (None for any other array)."""
    from shmdedup.worker.region import Region
    base: object = array
    while base is not None:
        if isinstance(base, Region):
            return base
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return None


def _advise(array: np.ndarray[Any, Any]) -> None:
    """Advise the region of an array made by _region_array mergeable."""
    from shmdedup.worker.region import MERGEABLE
    region = region_of(array)
    assert region is not None   # _region_array made it
    region.advise(MERGEABLE)


def _region_array(shape: int | tuple[int, ...] | list[int], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    from shmdedup.worker.region import Region
    dt = np.dtype(dtype)
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    return Region(max(nbytes, 1)).ndarray(dt, dims)


@pytest.fixture(scope="session")
def shmdedup_array() -> Callable[..., npt.NDArray[Any]]:
    """``shmdedup_array(shape, dtype=float64, fill_fn=None)``: a zeroed array in a
    mergeable region (a plain numpy array when the plugin is not active),
    filled in place by ``fill_fn(array)``.  The region is advised mergeable
    before the fill, so what a slow fill has finished can merge while it goes
    on (pages never written are skipped; pages still changing are volatile)."""

    def make(shape: int | tuple[int, ...] | list[int], dtype: npt.DTypeLike = np.float64,
             fill_fn: Callable[[npt.NDArray[Any]], object] | None = None) -> npt.NDArray[Any]:
        if not _active:
            arr: npt.NDArray[Any] = np.zeros(shape, dtype)
        else:
            arr = _region_array(shape, dtype)
            _advise(arr)
        if fill_fn is not None:
            fill_fn(arr)
        return arr

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
        self.workers: set[int] = set()
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
            if snap["pages_sharing"] > self.peak["pages_sharing"]:
                self.peak = {k: snap[k] for k in ("pages_sharing", "pages_shared")}

    def _take(self, client: Client) -> None:
        self.add(_snapshot(client.stats()))

    def _sample_loop(self) -> None:
        from shmdedup.tools.client import Client
        from shmdedup.errors import Error
        client: Client | None = None
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
        n = len(self.workers)
        if not n:
            lines = ["shmdedup: no worker shared anything (put arrays in regions with "
                     "shmdedup.tools.pytest_plugin.share() or the shmdedup_array fixture)"]
        else:
            mib = self.peak["pages_sharing"] * self.page_size / 2**20
            size = f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"
            lines = [f"shmdedup: {n} worker{'s' if n != 1 else ''} shared {size} MiB (peak pages_sharing "
                     f"{self.peak['pages_sharing']}, pages_shared {self.peak['pages_shared']})"]
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


def _snapshot(stats: Stats) -> dict[str, Any]:
    return {"pages_sharing": stats["pages_sharing"], "pages_shared": stats["pages_shared"],
            "workers": [w["pid"] for w in stats["workers"] if w["regions"]]}


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
            snap = _snapshot(client.stats())
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
