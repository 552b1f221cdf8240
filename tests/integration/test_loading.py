"""Loading at write time across real processes: a coordinator, worker processes
that load the same file (or copy, or compute, the same array), and faults.

Every test checks the bytes each worker ends with, and looks from outside at
the workers' region objects (st_blocks through /proc/<pid>/fd).  One test
checks that each chunk is merged before the next is read with the
coordinator's scanning as good as off (merge_now, not the scan); the others
hold whichever merges.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmdedup
from tests.helpers import Worker, wait_for
from tests.integration.conftest import FAST, wait_stats, worker_stats

P = shmdedup.PAGE_SIZE
CHUNK = 16 * P
# Scanning as good as off: one page a batch, then an hour's sleep.
NO_SCAN = {"pages_to_scan": 1, "sleep_millisecs": 3_600_000}

SETUP = """
import hashlib, os, time
import numpy as np
import shmdedup
from shmdedup.worker import loading, reading
shmdedup.set_socket(socket)
P = shmdedup.PAGE_SIZE
"""

# Loaders that give every worker the same content (random: no two pages equal).
LOADERS = {
    "fromfile": "arr = shmdedup.fromfile(path, np.uint8, chunk_bytes=chunk)",
    "load_npy": "arr = shmdedup.load_npy(path, chunk_bytes=chunk)",
    "load_safetensors": "arr = shmdedup.load_safetensors(path, chunk_bytes=chunk)",
    "share": ("src = np.fromfile(path, np.uint8)\n"
              "arr = shmdedup.share(src.reshape(-1, 8), chunk_bytes=chunk)\ndel src"),
    "fill": ("arr = shmdedup.fill((nbytes,), np.uint8, lambda b, s: b.__setitem__(Ellipsis, "
             "np.fromfile(path, np.uint8, len(b), offset=s)), rows=5000, chunk_bytes=chunk)"),
}
LOADED = """
arrays = list(arr.values()) if isinstance(arr, dict) else [arr]
region = shmdedup.region_of(arrays[0])
def digest():
    return [hashlib.sha256(np.ascontiguousarray(a)).hexdigest() for a in arrays]
result = (region.backing_fd, region.npages, digest())
"""


def safetensors_file(path: Path, data: bytes) -> None:
    """Two tensors of the data, in the format's own framing."""
    half = len(data) // 2 // 4 * 4
    header = {"a": {"dtype": "F32", "shape": [half // 4], "data_offsets": [0, half]},
              "b": {"dtype": "U8", "shape": [len(data) - half], "data_offsets": [half, len(data)]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def make_file(tmp_path: Path, loader: str, nbytes: int, seed: int = 1) -> Path:
    data = np.random.default_rng(seed).bytes(nbytes)
    path = tmp_path / f"data.{loader}"
    if loader == "load_npy":
        np.save(path.with_suffix(".npy"), np.frombuffer(data, np.uint8))
        return path.with_suffix(".npy")
    if loader == "load_safetensors":
        safetensors_file(path, data)
        return path
    path.write_bytes(data)
    return path


def region_blocks(pid: int) -> int:
    """Bytes the process's region objects hold (st_blocks, each object once)."""
    seen, total = set(), 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "shmdedup-region" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
                continue
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def region_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += "shmdedup-region" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return n


def start_workers(n: int, socket: str) -> list[Worker]:
    workers = [Worker() for _ in range(n)]
    for w in workers:
        w.run(SETUP, socket=socket)
    return workers


@pytest.mark.parametrize("loader", list(LOADERS))
def test_workers_loading_the_same_data_end_with_one_copy(coordinator, tmp_path: Path, loader: str) -> None:
    """Three workers load the same data: every one reads its exact bytes, and
    in the end their region objects hold nothing (one stable copy for all)."""
    c = coordinator(**FAST)
    nbytes = 150 * P + 1000
    path = make_file(tmp_path, loader, nbytes)
    workers = start_workers(3, c.socket_path)
    loaded = [w.call(LOADERS[loader] + LOADED, path=str(path), chunk=CHUNK, nbytes=nbytes) for w in workers]
    npages = loaded[0][1]
    assert all(x[1] == npages and x[2] == loaded[0][2] for x in loaded)  # the same bytes everywhere
    wait_stats(c, lambda s: s["pages_shared"] == npages and s["pages_sharing"] == 2 * npages, 90,
               "three copies to become one")
    for w, (fd, _, digest) in zip(workers, loaded):
        assert os.stat(f"/proc/{w.pid}/fd/{fd}").st_blocks == 0
        assert w.call("result = (region.merged_pages(), digest())") == (npages, digest)
    got = w.call("result = b''.join(np.ascontiguousarray(a).tobytes() for a in arrays)")
    assert got == (np.load(path).tobytes() if loader == "load_npy" else path.read_bytes()[-nbytes:])


def test_each_chunk_merges_before_the_next_is_read(coordinator, tmp_path: Path) -> None:
    """With the scan as good as off, three workers loading the same 8 MiB file
    at once hold at most a couple of chunks of private pages each at any
    moment (sampled from outside), and end merged the moment fromfile returns."""
    c = coordinator(**NO_SCAN)
    nbytes = 8 * 2**20
    path = make_file(tmp_path, "fromfile", nbytes)
    workers = start_workers(3, c.socket_path)
    peaks = {w.pid: 0 for w in workers}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in peaks:
                peaks[pid] = max(peaks[pid], region_blocks(pid))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: dict[int, Any] = {}

    def load(w: Worker) -> None:
        results[w.pid] = w.call(LOADERS["fromfile"] + LOADED + "result += (region.merged_pages(),)",
                                path=str(path), chunk=CHUNK, nbytes=nbytes, timeout=120)

    threads = [threading.Thread(target=load, args=(w,)) for w in workers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
    finally:
        done.set()
        sampler.join()
    assert len(results) == 3
    npages = nbytes // P
    for w in workers:
        fd, n, _, merged = results[w.pid]
        assert n == npages and merged == npages  # merged when fromfile returned
        assert os.stat(f"/proc/{w.pid}/fd/{fd}").st_blocks == 0
        assert peaks[w.pid] <= 3 * CHUNK, (w.pid, peaks[w.pid])
    s = c.stats()
    assert s["pages_shared"] == npages and s["pages_sharing"] == 2 * npages and s["full_scans"] == 0


def test_a_file_shorter_than_asked_loads_nothing(coordinator, tmp_path: Path) -> None:
    c = coordinator(**FAST)
    path = make_file(tmp_path, "load_npy", 100 * P)
    path.write_bytes(path.read_bytes()[:-10])  # truncated by someone else before the load
    (w,) = start_workers(1, c.socket_path)
    msg = w.call("""
        try:
            shmdedup.load_npy(path)
        except shmdedup.ShortFileError as e:
            result = str(e)
        """, path=str(path))
    assert "holds 409590 bytes of data" in msg and "says 409600" in msg
    msg = w.call("""
        try:
            shmdedup.fromfile(path, np.uint64, count=10**6)
        except EOFError as e:
            result = str(e)
        """, path=str(path))
    assert "needs 8000000" in msg
    assert region_fds(w.pid) == 0
    assert worker_stats(c.stats()).get(w.pid, {"pages": 0})["pages"] == 0


# The reader pauses after its first chunk until the writer has changed the file.
PAUSING_READER = """
real = reading.Source.readinto
def pausing(self, region, offset, n):
    got = real(self, region, offset, n)
    if offset == 0:
        open(paused, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(changed):
            assert time.monotonic() < deadline, "the writer did not change the file"
            time.sleep(0.005)
    return got
reading.Source.readinto = pausing
"""

CHANGES = {
    "overwrite": "fd = os.open(path, os.O_WRONLY); os.pwrite(fd, b'\\xff' * 100, 50 * P); os.close(fd)",
    "truncate": "os.truncate(path, 20 * P)",
    "append": "f = open(path, 'ab'); f.write(b'more'); f.close()",
}


@pytest.mark.parametrize("source", ["path", "file object"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_file_changed_while_read_raises_and_loads_nothing(coordinator, tmp_path: Path, source: str,
                                                            change: str) -> None:
    """Another process changes the file between two chunks: FileChangedError,
    never a mix of old and new bytes; the reader holds no region afterwards,
    and reading again gives the new content exactly."""
    c = coordinator(**FAST)
    path = make_file(tmp_path, "fromfile", 100 * P + 5)
    paused, changed = tmp_path / "paused", tmp_path / "changed"
    reader, writer = start_workers(2, c.socket_path)
    reader.run(PAUSING_READER, paused=str(paused), changed=str(changed))
    opener = "open(path, 'rb')" if source == "file object" else "path"
    outcome: list[Any] = []

    def read() -> None:
        outcome.append(reader.call(f"""
            try:
                shmdedup.fromfile({opener}, np.uint8, chunk_bytes=chunk)
                result = "returned"
            except shmdedup.FileChangedError as e:
                result = str(e)
            """, path=str(path), chunk=CHUNK))

    t = threading.Thread(target=read)
    t.start()
    try:
        wait_for(paused.exists, 60, "the reader to pause after its first chunk")
        writer.call(CHANGES[change], path=str(path))
        changed.touch()
    finally:
        t.join(60)
    assert outcome and "changed while it was read" in outcome[0], outcome
    assert region_fds(reader.pid) == 0
    reader.call("reading.Source.readinto = real")
    again = reader.call("a = shmdedup.fromfile(path, np.uint8); result = a.tobytes(); del a", path=str(path))
    assert again == path.read_bytes()


@pytest.mark.parametrize("call, match", [
    ("shmdedup.fromfile(path, 'no such dtype')", "dtype"),
    ("shmdedup.fromfile(path, object)", "Python objects"),
    ("shmdedup.fromfile(path, np.uint8, count=-5)", "count"),
    ("shmdedup.fromfile(path, np.uint8, count=2.5)", "count"),
    ("shmdedup.fromfile(path, np.uint8, offset=-1)", "offset"),
    ("shmdedup.fromfile(path, np.uint8, offset=P + 0.5)", "offset"),
    ("shmdedup.fromfile(path, np.uint8, chunk_bytes=100)", "chunk_bytes"),
    ("shmdedup.share([1, 2, 3])", "got list"),
    ("shmdedup.fill((10,), np.uint8, print, rows=0)", "rows"),
])
def test_bad_arguments_raise_and_register_nothing(coordinator, tmp_path: Path, call: str, match: str) -> None:
    c = coordinator(**FAST)
    path = make_file(tmp_path, "fromfile", 10 * P)
    (w,) = start_workers(1, c.socket_path)
    msg = w.call(f"""
        try:
            {call}
        except ValueError as e:
            assert isinstance(e, shmdedup.ArgumentError)
            result = str(e)
        """, path=str(path))
    assert msg is not None and match in msg
    assert region_fds(w.pid) == 0
    assert worker_stats(c.stats()).get(w.pid, {"pages": 0})["pages"] == 0


def test_a_worker_killed_while_loading_leaves_the_others_whole(coordinator, tmp_path: Path) -> None:
    """A worker killed in the middle of a load: another one loading the same
    file ends with its exact bytes, and once it is gone too every stable page
    is freed."""
    c = coordinator(**FAST)
    nbytes = 200 * P
    path = make_file(tmp_path, "fromfile", nbytes)
    paused, changed = tmp_path / "paused", tmp_path / "never"
    victim, survivor = start_workers(2, c.socket_path)
    victim.run(PAUSING_READER, paused=str(paused), changed=str(changed))
    victim.conn.send((f"{LOADERS['fromfile']}\n", {"path": str(path), "chunk": CHUNK}, 0))
    wait_for(paused.exists, 60, "the victim to pause after its first chunk")
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.join(30)
    fd, npages, digest = survivor.call(LOADERS["fromfile"] + LOADED, path=str(path), chunk=CHUNK, nbytes=nbytes)
    assert survivor.call("result = arrays[0].tobytes() == open(path, 'rb').read()", path=str(path))
    wait_stats(c, lambda s: victim.pid not in worker_stats(s), 60, "the victim to be dropped")
    survivor.call("del arr, arrays; region.close()")
    wait_stats(c, lambda s: s["stable_pages_allocated"] == 0 and s["pages_shared"] == 0, 60,
               "every stable page to be freed")
