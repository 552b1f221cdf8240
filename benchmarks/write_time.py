#!/usr/bin/env python
"""Merging at write time: peak memory and speed of N processes loading the same file.

Not a test: prints a table.  N loader processes (default 4) load the same file
(default 256 MiB of random bytes, in the page cache) at the same moment, three
ways, one after the other:

  fromfile    ``np.fromfile(path)``: N private copies (the baseline)
  merge_now   a Region filled chunk by chunk (``region.readinto``), each chunk
              merged with ``region.merge_now`` before the next is read
  helper      ``shmdedup.fromfile(path, np.uint8, chunk_bytes=chunk)``: the same,
              done by the library (its own region, every chunk checked for a
              change of the file)
  scan        today's path: fill the Region, ``advise(MERGEABLE)``, and wait
              for the scan (default pacing) to merge the copies

Measured, from outside: Shmem + AnonPages of /proc/meminfo, sampled every
10 ms by a thread of this process, as a rise over the baseline taken when
every loader is ready (interpreter started, imports done, nothing loaded);
"peak" is the highest rise, "end" the rise once loaded (and for scan, once
merged).  Time: "load s" from the go to the last loader's end; for scan also
"merged s", until pages_sharing reaches (N - 1) copies.  The coordinator is a
process of its own at its default pacing (a fresh one per mode); its CPU time
(/proc/<pid>/schedstat) over the load, divided by the pages merged inline
(``pages_merged_inline``), is "coord us/page" (for scan: its CPU from the go
until merged, per merged page); "of which inline" counts only the CPU the
coordinator spent on merge_now requests (``merge_now_cpu_usecs``), without the
scan running beside them at its default pacing.  "attributed" is the run's own
footprint, sampled likewise: the RssAnon of the loaders and the coordinator
plus the blocks of the shm objects they hold (regions and stable segment),
which other processes on a shared machine cannot disturb.  "worker us/page" is a loader's
process CPU time for its load divided by its pages (readinto, merge_now and
its agent thread; for fromfile the read alone), the mean over the loaders;
"in merge_now" the wall time a loader spent inside merge_now calls, per page.

Targets (the issue): merge_now's (and helper's) peak rise <= 1.3 x size + N chunks; all N
loads <= 1.5 x the fromfile run's wall time; coordinator CPU <= 1 us per
inline-merged page.

    python benchmarks/write_time.py [--size-mib 256] [--chunk-mib 8] [--procs 4]
        [--modes fromfile,merge_now,helper,scan] [--file PATH] [--reps 1] [--json]

The machine is shared: the load average is printed with the table; run it a
few times (--reps) and look at the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MIB = 2**20
SAMPLE_S = 0.010


# ---- the loader process ------------------------------------------------------

def loader(mode: str, path: str, size: int, chunk: int) -> None:
    """One loader: report ready, wait for go, load, report, wait for exit
    (holding what it loaded, so the end state can be measured)."""
    import shmdedup
    from shmdedup import Region
    from shmdedup.worker.agent import get_agent
    from shmdedup.worker.loading import write_time_stats

    def say(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    region = None
    fds: list[int] = []
    if mode == "helper":  # fromfile makes its own region; connect the agent before the go
        probe = Region(1)
        probe.merge_now(0, 0)
        get_agent()._wait_connected(5.0)
    elif mode != "fromfile":
        region = Region(size)
        fds = [region.backing_fd, region.meta_fd]
        if mode == "merge_now":
            # Connect the agent before the go (a real loader pays this once).
            region.merge_now(0, 0)
            get_agent()._wait_connected(5.0)
    say({"ready": os.getpid(), "fds": fds})
    if sys.stdin.readline().strip() != "go":
        return
    t0, c0 = time.perf_counter(), time.process_time()
    in_merge = in_read = 0.0
    merged = 0
    hold: Any = None
    if mode == "fromfile":
        hold = np.fromfile(path, dtype=np.uint8, count=size)
    elif mode == "helper":
        before = write_time_stats()["pages_merged_at_write"]
        hold = shmdedup.fromfile(path, np.uint8, count=size, chunk_bytes=chunk)
        merged = write_time_stats()["pages_merged_at_write"] - before
    else:
        assert region is not None
        with open(path, "rb", buffering=0) as f:
            off = 0
            while off < size:
                n = min(chunk, size - off)
                a = time.perf_counter()
                got = region.readinto(f, off, n)
                b = time.perf_counter()
                in_read += b - a
                if got != n:
                    raise SystemExit(f"short read at {off}: {got} of {n}")
                if mode == "merge_now":
                    merged += region.merge_now(off, n)
                    in_merge += time.perf_counter() - b
                off += n
        if mode == "scan":
            region.advise(shmdedup.MERGEABLE)
    t1, c1 = time.perf_counter(), time.process_time()
    say({"pid": os.getpid(), "start": t0, "end": t1, "cpu": c1 - c0, "in_merge": in_merge,
         "in_read": in_read, "merged": merged})
    sys.stdin.readline()         # "exit"
    del hold


# ---- the parent ----------------------------------------------------------------

def meminfo_kib() -> int:
    shmem = anon = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                shmem = int(line.split()[1])
            elif line.startswith("AnonPages:"):
                anon = int(line.split()[1])
    return shmem + anon


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def attributed_kib(pids: list[int], objects: list[str]) -> int:
    """What the run's own processes hold: their anonymous memory, and the
    blocks of the shm objects they hold (paths under /proc/<pid>/fd, and the
    regions found there now: the helper makes its region during the load)."""
    total = sum(_status_kib(pid, "RssAnon") for pid in pids)
    paths = list(objects)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if "shmdedup-region" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    paths.append(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
    seen = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks // 2
    return total


class Sampler(threading.Thread):
    """/proc/meminfo Shmem + AnonPages (system-wide, as the issue measures it)
    and the attributed footprint (immune to other processes on a shared
    machine), every 10 ms."""

    def __init__(self, pids: list[int], objects: list[str]) -> None:
        super().__init__(daemon=True)
        self.pids, self.objects = pids, objects
        self.base = meminfo_kib()
        self.abase = attributed_kib(pids, objects)
        self.peak = self.apeak = 0
        self.last = self.alast = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.last = meminfo_kib() - self.base
            self.peak = max(self.peak, self.last)
            self.alast = attributed_kib(self.pids, self.objects) - self.abase
            self.apeak = max(self.apeak, self.alast)
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def ensure_file(path: str, size: int) -> None:
    if not os.path.exists(path) or os.path.getsize(path) < size:
        rng = np.random.default_rng(2024)
        with open(path, "wb") as f:
            for off in range(0, size, 16 * MIB):
                f.write(rng.integers(0, 256, min(16 * MIB, size - off), dtype=np.uint8).tobytes())
    with open(path, "rb", buffering=0) as f:   # into the page cache
        while f.read(16 * MIB):
            pass


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import shmdedup
    size, n = args.size_mib * MIB, args.procs
    pages = size // shmdedup.PAGE_SIZE
    coord = None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               OPENBLAS_NUM_THREADS="1")
    if mode != "fromfile":
        coord = shmdedup.Coordinator(process=True, export_env=False).start()
        env["SHMDEDUP_SOCKET"] = coord.socket_path
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--loader", mode,
                               "--file", args.file, "--size-mib", str(args.size_mib),
                               "--chunk-mib", str(args.chunk_mib)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    try:
        objects = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"loader {p.pid} failed to start")
            objects += [f"/proc/{p.pid}/fd/{fd}" for fd in json.loads(line)["fds"]]
        pids = [p.pid for p in procs]
        if coord is not None:
            pids.append(coord.pid)
            for fd in os.listdir(f"/proc/{coord.pid}/fd"):
                try:
                    if "shmdedup-stable" in os.readlink(f"/proc/{coord.pid}/fd/{fd}"):
                        objects.append(f"/proc/{coord.pid}/fd/{fd}")
                except OSError:
                    pass
        time.sleep(0.5)               # let the start-up settle before the baseline
        anon0 = sum(_status_kib(p.pid, "RssAnon") for p in procs) / 1024
        canon0 = _status_kib(coord.pid, "RssAnon") / 1024 if coord else 0
        sampler = Sampler(pids, objects)
        sampler.start()
        stats0 = coord.stats() if coord else None
        cpu0 = cpu_ns(coord.pid) if coord else 0
        go = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        loaded = time.perf_counter()
        cpu1 = cpu_ns(coord.pid) if coord else 0
        out: dict[str, Any] = {"mode": mode, "load_s": max(r["end"] for r in results) - go}
        out["worker_us_per_page"] = 1e6 * float(np.mean([r["cpu"] for r in results])) / pages
        if coord is not None:
            s = coord.stats()
            inline = s["pages_merged_inline"] - stats0["pages_merged_inline"]
            out["pages_merged_inline"] = inline
            out["coord_cpu_s"] = (cpu1 - cpu0) / 1e9
            if inline:
                out["coord_us_per_page"] = (cpu1 - cpu0) / 1e3 / inline
                out["coord_inline_us_per_page"] = (s["merge_now_cpu_usecs"]
                                                   - stats0["merge_now_cpu_usecs"]) / inline
            out["pages_sharing"] = s["pages_sharing"]
        if mode == "merge_now":
            out["in_merge_us_per_page"] = 1e6 * float(np.mean([r["in_merge"] for r in results])) / pages
            out["in_read_us_per_page"] = 1e6 * float(np.mean([r["in_read"] for r in results])) / pages
        if mode == "scan":
            want = (n - 1) * pages
            deadline = time.monotonic() + args.scan_timeout
            while coord.stats()["pages_sharing"] < want and time.monotonic() < deadline:
                time.sleep(0.1)
            out["merged_s"] = time.perf_counter() - go
            s = coord.stats()
            out["pages_sharing"] = s["pages_sharing"]
            merged = s["pages_sharing"] + s["pages_shared"]
            if merged:   # the scan's CPU from the go until merged, per merged page
                out["coord_us_per_page"] = (cpu_ns(coord.pid) - cpu0) / 1e3 / merged
        time.sleep(0.1)
        out["end_mib"] = sampler.last / 1024
        out["attributed_end_mib"] = sampler.alast / 1024
        # Where the memory is: each process's anonymous memory and the
        # shared-memory objects it holds, and the coordinator's.
        out["loaders_anon_rise_mib"] = sum(_status_kib(p.pid, "RssAnon") for p in procs) / 1024 - anon0
        if coord is not None:
            out["coord_anon_rise_mib"] = _status_kib(coord.pid, "RssAnon") / 1024 - canon0
            out["stable_mib"] = coord.stats()["stable_pages_allocated"] * shmdedup.PAGE_SIZE / MIB
        sampler.stop()
        out["peak_mib"] = sampler.peak / 1024
        out["attributed_peak_mib"] = sampler.apeak / 1024
        out["after_load_s"] = loaded - go
        return out
    finally:
        for p in procs:
            try:
                p.stdin.write("exit\n")
                p.stdin.close()
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if coord is not None:
            coord.stop()


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    size, chunk, n = args.size_mib, args.chunk_mib, args.procs
    lines = [f"{n} processes load the same {size} MiB file, chunks of {chunk} MiB "
             f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)",
             f"{'':27} {'meminfo MiB':>17} {'attributed MiB':>17}",
             f"{'mode':10} {'load s':>7} {'merged s':>8} {'peak':>8} {'end':>8} {'peak':>8} {'end':>8} "
             f"{'worker us/pg':>12} {'in merge_now':>12} {'coord us/pg':>11} {'of which inline':>15} "
             f"{'inline pages':>12}"]
    for r in rows:
        lines.append(
            f"{r['mode']:10} {r['load_s']:7.2f} {r.get('merged_s', float('nan')):8.2f} "
            f"{r['peak_mib']:8.0f} {r['end_mib']:8.0f} {r['attributed_peak_mib']:8.0f} "
            f"{r['attributed_end_mib']:8.0f} {r['worker_us_per_page']:12.2f} "
            f"{r.get('in_merge_us_per_page', float('nan')):12.2f} "
            f"{r.get('coord_us_per_page', float('nan')):11.2f} "
            f"{r.get('coord_inline_us_per_page', float('nan')):15.2f} {r.get('pages_merged_inline', 0):12d}")
    base = [r["load_s"] for r in rows if r["mode"] == "fromfile"]
    mn = [r for r in rows if r["mode"] in ("merge_now", "helper")]
    if base and mn:
        lines.append("targets for merge_now and helper:")
        b = min(base)
        for r in mn:
            lim = 1.3 * size + n * chunk
            lines.append(f"  {r['mode']}: peak {r['peak_mib']:.0f} MiB (attributed {r['attributed_peak_mib']:.0f}) <= {lim:.0f}: "
                         f"{'ok' if r['peak_mib'] <= lim else 'MISSED'} "
                         f"({'ok' if r['attributed_peak_mib'] <= lim else 'MISSED'});"
                         f"  load {r['load_s']:.2f} s <= 1.5 x {b:.2f}: "
                         f"{'ok' if r['load_s'] <= 1.5 * b else 'MISSED'} ({r['load_s'] / b:.2f}x);"
                         f"  coordinator {r.get('coord_us_per_page', float('nan')):.2f} us/page "
                         f"(merge_now requests alone {r.get('coord_inline_us_per_page', float('nan')):.2f}) <= 1: "
                         f"{'ok' if r.get('coord_us_per_page', 9) <= 1 else 'MISSED'} "
                         f"({'ok' if r.get('coord_inline_us_per_page', 9) <= 1 else 'MISSED'})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunk-mib", type=int, default=None,
                    help="chunk size (default: the library's, shmdedup.worker.loading.chunk_bytes)")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--modes", default="fromfile,merge_now,helper,scan")
    ap.add_argument("--file", default=os.path.join("/tmp", f"shmdedup-write-time-{os.getuid()}.bin"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--scan-timeout", type=float, default=120.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk_mib is None:
        from shmdedup.worker import loading
        args.chunk_mib = loading.chunk_bytes // MIB
    if args.loader:
        loader(args.loader, args.file, args.size_mib * MIB, args.chunk_mib * MIB)
        return
    ensure_file(args.file, args.size_mib * MIB)
    rows = []
    for _ in range(args.reps):
        for mode in args.modes.split(","):
            rows.append(run_mode(mode, args))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows, args))


if __name__ == "__main__":
    main()
