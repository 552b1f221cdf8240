"""A user's program: every public name of shmdedup, used as the README uses it.

tests/test_typing.py checks it with ``mypy --strict`` (for the oldest and the
newest Python the package claims) and runs it: the types it relies on must be
the ones the library really hands out.  Not a test module of its own (pytest
collects ``test_*.py`` only).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import shmdedup
from shmdedup.tools.pytest_plugin import region_of, share

PAGE = shmdedup.PAGE_SIZE


# -- the README's pytest-xdist fixture pattern ---------------------------------

def build_table() -> npt.NDArray[np.float32]:
    return np.random.default_rng(0).random(2**16, dtype=np.float32)


def compute_rows(start: int, n: int) -> npt.NDArray[np.float32]:
    return np.full((n, 1024), start, np.float32)


@pytest.fixture(scope="session")
def table() -> npt.NDArray[np.float32]:
    return share(build_table())          # a copy, merged as it is copied: same type, dtype, shape, order


@pytest.fixture(scope="session")
def features(shmdedup_array: Callable[..., npt.NDArray[Any]]) -> npt.NDArray[Any]:
    def rows(block: npt.NDArray[Any], start: int) -> None:   # merged once written
        block[...] = compute_rows(start, len(block))
    return shmdedup_array((64, 1024), np.float32, rows, rows=16)


# -- the API -------------------------------------------------------------------

def describe(stats: shmdedup.Stats) -> str:
    """What a monitoring script reads: counters, controls, workers, uids."""
    workers: list[shmdedup.WorkerStats] = stats["workers"]
    uids: list[shmdedup.UidStats] = stats["uids"]
    merging = sum(w["ksm_merging_pages"] for w in workers)
    port = stats.get("metrics_port")       # present only with metrics on
    return (f"run={stats['run']} pages_to_scan={stats['pages_to_scan']} "
            f"sharing={stats['pages_sharing']} shared={stats['pages_shared']} "
            f"full_scans={stats['full_scans']} profit={stats['general_profit']} "
            f"workers={len(workers)} merging={merging} uids={[u['uid'] for u in uids]} "
            f"error={stats['last_error']!r} metrics={port}")


def readme_example() -> int:
    table = np.random.default_rng(0).random(2**18, dtype=np.float32)   # 1 MiB
    settings: shmdedup.ControlSettings = {"sleep_millisecs": 0}
    with shmdedup.Coordinator(**settings) as coord:    # in-process coordinator (a thread)
        region = shmdedup.Region(2 * table.nbytes)
        copies = region.ndarray(np.float32, (2, table.size))   # numpy views, no copy
        copies[:] = table
        region.advise(shmdedup.MERGEABLE)
        full_scans: int = coord.wait_full_scans(2)
        stats: shmdedup.Stats = coord.stats()
        sharing: int = stats["pages_sharing"]
        print(f"pages saved: {sharing} after {full_scans} full scans; {describe(stats)}")
        controls: shmdedup.Controls = stats     # a Stats holds every control
        print("advisor_mode", controls["advisor_mode"])
        del copies
        region.close()
        return sharing


def write_time_helpers(dirname: str) -> int:
    """The README's helpers: every worker runs the same call, each chunk merged as written."""
    path = os.path.join(dirname, "table.f32")
    np.random.default_rng(0).random(2**16, dtype=np.float32).tofile(path)
    a: npt.NDArray[Any] = shmdedup.fromfile(path, np.float32)
    b = shmdedup.fromfile(path, np.float32)      # as a second worker would load it
    assert np.array_equal(a, b)
    region: shmdedup.Region | None = shmdedup.region_of(a)
    assert region is not None
    npy = os.path.join(dirname, "vectors.npy")
    np.save(npy, np.asfortranarray(np.ones((64, 32), np.float64)))
    vectors = shmdedup.load_npy(npy)
    st = os.path.join(dirname, "model.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
    with open(st, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + np.ones(1024, np.float32).tobytes())
    weights: dict[str, npt.NDArray[Any]] = shmdedup.load_safetensors(st)
    copy = shmdedup.share(a)                     # a copy of an array (or bytes)
    view: memoryview = shmdedup.share(b"x" * PAGE)

    def rows(block: npt.NDArray[Any], start: int) -> None:
        block[...] = start
    features = shmdedup.fill((64, 256), np.float32, rows)
    try:
        shmdedup.fromfile(path, np.float32, count=2**20)
    except shmdedup.ShortFileError:              # numpy would return fewer items
        pass
    try:
        shmdedup.load_npy(path)
    except shmdedup.FormatError:                 # not an .npy file
        pass
    assert issubclass(shmdedup.FileChangedError, OSError)   # a file changed while it was read
    print(f"helpers: {a.shape} {vectors.flags.f_contiguous} {sorted(weights)} {copy.dtype} "
          f"{len(view)} {features.shape}")
    return len(a)


def merge_at_write_time(coord: shmdedup.Coordinator) -> int:
    data = bytes(range(256)) * (4 * PAGE // 256)
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        region = shmdedup.Region(len(data))
        try:
            with open(f.name, "rb", buffering=0) as src:
                n = region.readinto(src, 0, len(data))
            merged = region.merge_now(0, n)
        except shmdedup.ShmError as e:       # ENOSPC: what merged is in e.merged
            merged = e.merged
        fd = os.open(f.name, os.O_RDONLY)
        try:
            region.readinto(fd, 0, PAGE)         # or a raw descriptor
        finally:
            os.close(fd)
    view = memoryview(region)
    assert bytes(view[:4]) == data[:4]
    view.release()
    broken: int = region.prepare_write(0, PAGE)
    with region.pinned(0, PAGE):
        pass
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.send(b"hello")
        got = region.recv_into(b, 0, 5)
    assert bytes(memoryview(region)[:5]) == b"hello" and got == 5
    print(f"merge_now merged {merged} pages; prepare_write broke {broken}; "
          f"merged now {region.merged_pages()}, {region.allocated_bytes()} bytes held; "
          f"stats say {coord.stats()['pages_merged_inline']} merged inline")
    region.advise(shmdedup.UNMERGEABLE)
    region.close()
    return merged


def process_wide() -> None:
    shmdedup.enable_process_merging()
    on: bool = shmdedup.process_merging()
    with shmdedup.Region(PAGE, mergeable=False) as r:
        print("process merging", on, r)
    shmdedup.enable_process_merging(False)
    previous: int = shmdedup.cow_fault_around(8)
    shmdedup.cow_fault_around(previous)


def standalone(path: str) -> None:
    """A client of a coordinator started elsewhere (`shmdedup coordinator`)."""
    shmdedup.set_socket(path)
    with shmdedup.Client(path) as client, shmdedup.Region(4 * PAGE, mergeable=True) as region:
        client.set("pages_to_scan", 1000)
        region.ndarray(np.uint8)[:] = 7         # the array goes at once: close() works
        client.wait_full_scans(2, timeout=30.0)  # scans run while something is advised
        stats = client.stats()
        print(describe(stats))


def errors() -> None:
    caught: list[type[shmdedup.Error]] = []
    try:
        shmdedup.Region(0)
    except shmdedup.ArgumentError as e:          # also a ValueError
        caught.append(type(e))
    region = shmdedup.Region(PAGE)
    region.close()
    try:
        region.advise(shmdedup.MERGEABLE)
    except shmdedup.RegionClosedError as e:
        caught.append(type(e))
    try:
        shmdedup.Client(os.path.join(tempfile.gettempdir(), "no-such-shmdedup.sock"), timeout=1.0)
    except shmdedup.CoordinatorUnavailableError as e:   # also a ConnectionError
        caught.append(type(e))
    try:
        shmdedup.Coordinator(no_such_control=1)  # type: ignore[call-arg]  # (mypy sees the typo too)
    except shmdedup.ControlError as e:
        caught.append(type(e))
    for cls in (shmdedup.ProtocolError, shmdedup.PeerRejectedError, shmdedup.ShmError):
        assert issubclass(cls, shmdedup.Error)
    print("caught", [c.__name__ for c in caught])


def main() -> None:
    assert share(b"abc") == b"abc"              # plugin inactive: the argument itself
    arr = np.arange(4)
    assert share(arr) is arr
    region: shmdedup.Region | None = region_of(arr)   # None: not in a region
    assert region is None
    readme_example()
    with shmdedup.Coordinator(sleep_millisecs=0) as coord, tempfile.TemporaryDirectory() as d:
        write_time_helpers(d)
        merge_at_write_time(coord)
        standalone(coord.socket_path)
    process_wide()
    errors()


if __name__ == "__main__":
    main()
