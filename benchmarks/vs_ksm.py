#!/usr/bin/env python3
"""shmdedup against Linux KSM, on the same content, side by side.

    python benchmarks/vs_ksm.py                      # 4 workers x 256 MiB, both systems
    python benchmarks/vs_ksm.py --json               # one JSON object on stdout
    python benchmarks/vs_ksm.py --scaling            # 1..64 workers, up to 8 x 1 GiB (vs_ksm_scale.py)
    python benchmarks/vs_ksm.py --scaling-quick      # its small rows only
    python benchmarks/vs_ksm.py --defaults           # no control set vs ksmd's defaults (vs_ksm_scale.py)
    python benchmarks/vs_ksm.py --only shmdedup      # no root needed

Each system gets N spawned worker processes holding M MiB each, filled with
the same bytes (numpy, fixed seeds, generated in the child):

* KSM: anonymous private memory (``mmap(-1, size, MAP_PRIVATE|MAP_ANONYMOUS)``,
  MADV_NOHUGEPAGE so both systems deal in 4 KiB pages), advised with
  ``MADV_MERGEABLE``; this script switches ksmd on through /sys/kernel/mm/ksm
  (root) and ALWAYS puts it back (run=2, then run=0, then the saved
  pages_to_scan and sleep_millisecs) in a finally block and an atexit hook.
* shmdedup: ``shmdedup.Region``s advised ``MERGEABLE``, scanned by a
  coordinator in its own process (``Coordinator(process=True)``) so that its
  CPU time can be read from /proc.

The two systems run one after the other (the first one's workers are gone
before the second one's start).  Each starts with its scanner stopped; the
clock starts when ``run`` becomes 1.

Page layout per worker (fractions of the pages; the rest are *shared*):
``shared`` pages hold the same random bytes in every worker (distinct from
each other), ``zero`` pages hold zeros (written, so present), ``unique`` pages
random bytes of the worker's own, ``volatile`` pages random bytes of the
worker's own that a thread keeps rewriting.  ``--scattered`` puts the
duplicate pages (shared and zero) on even pages only, so no two are adjacent.

Definitions (the same for both systems):

* expected pages_sharing: (N-1) x shared + Z - ceil(Z / max_page_sharing),
  Z = N x zero pages; time to 95% / 100% of it from run=1.  If it stops growing
  for 3 full scans and 3 s (e.g. a mapping budget) the run ends there
  ("plateau").
  With nothing to merge, "converged" means two full scans done.
* scanner CPU: CPU time (schedstat, all threads) of ksmd / the coordinator
  process.  Worker CPU: the worker processes over the same interval (for
  shmdedup that is its agents' merge work, which ksmd does itself); the
  "total" row is their sum, and CPU per merged page = total / pages_sharing.
* steady-state rescan: after convergence, CPU over >= 3 full scans and >= 2 s,
  divided by (full scans x pages advised): the cost of keeping watch over a
  page; also divided by each system's own pages_scanned delta (KSM counts
  merged pages it re-walks, shmdedup skips them, so that one differs).
* late worker: then one more worker with worker 0's bytes is started; from
  its ready message (filled and advised) until 95% of its shared pages merged
  onto the stable pages already there, with the full scans and scanner CPU
  meanwhile (both systems look a new page up in their stable index at its
  first visit).
* memory saved, from outside: the drop of AnonPages (KSM) or Shmem (shmdedup,
  stable pages included) in /proc/meminfo from run=1 to convergence; also the
  MemAvailable change (includes the scanners' own memory) and the workers'
  Pss (smaps_rollup).  shmdedup also: workers' backing objects' st_blocks.
* metadata per tracked page: KSM from the kernel's own accounting,
  ((pages_sharing + ksm_zero_pages) x 4096 - general_profit) / rmap_items
  (rmap_items summed from /proc/<pid>/ksm_stat) = sizeof(struct ksm_rmap_item);
  shmdedup: shmdedup.coordinator.scan.scanner.METADATA_BYTES_PER_PAGE.  Measured alongside: growth
  of SUnreclaim (KSM's slab) / the coordinator's RssAnon, per advised page, at
  convergence and again after the steady-state rescans (shmdedup).
* COW break: with the scanner stopped (run=0), worker 0 writes one byte to
  every page that is merged (KSM: KPF_KSM in /proc/kpageflags via
  /proc/self/pagemap; shmdedup: the region's state bytes), one numpy fancy
  assignment, timed; then the same writes again (pages now private) as the
  baseline.  Reported: first write per page, and first minus baseline.
  The pages are written in page order, so shmdedup's COW fault-around
  (``shmdedup.cow_fault_around``, default 64) breaks up to 64 pages per
  fault; worker 1 then writes 20000 of its merged pages (a random sample, or all
  if fewer) in random page order with the fault-around off
  (``cow_fault_around(1)``), so each fault breaks one page: the cost of an
  isolated write.

Also reported: the most mappings (VMAs) any worker holds (vm.max_map_count is
the binding limit for shmdedup), other processes' CPU during each convergence
(this is a shared 2-CPU machine: before each measurement the script waits up
to --wait-quiet seconds for a quiet machine), and with --py-spy FILE a
py-spy profile of the coordinator (--py-spy-phase converge|steady; with --perf,
a ``perf record -g`` of it instead: CPU samples with kernel and C frames).

Nothing is left behind: children are always reaped, shmdedup unlinks its
objects at once, and /dev/shm is compared before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# The coordinator process and spawned workers must import the same shmdedup.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != REPO])

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import (KSM, cpu_by_pid, cpu_ns, dev_shm, find_ksmd,  # noqa: E402,F401
                  ksm_stat, ksmd_nice, meminfo, proc_kib, pss_kib, say, system_busy_ns, top_cpu,
                  wait_quiet)

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
KPF_KSM = 21

SHARED, ZERO, UNIQUE, VOLATILE = 0, 1, 2, 3
COW_RANDOM_PAGES = 20000           # pages written by the random-order COW measurement
GEN_CHUNK = 4096                   # pages generated / checksummed at a time


# --------------------------------------------------------------------------
# content


def make_layout(npages: int, unique: float, zero: float, volatile: float,
                scattered: bool) -> tuple[np.ndarray, dict[str, int]]:
    """Page kinds of one worker (the same for every worker) and their counts."""
    z = int(npages * zero)
    u = int(npages * unique)
    v = int(npages * volatile)
    s = npages - z - u - v
    if s < 0:
        raise ValueError("--unique + --zero + --volatile must not exceed 1")
    kinds = np.empty(npages, np.uint8)
    if not scattered:
        kinds[:s] = SHARED
        kinds[s:s + z] = ZERO
        kinds[s + z:s + z + u] = UNIQUE
        kinds[s + z + u:] = VOLATILE
    else:
        even = np.arange(0, npages, 2)
        z_eff = min(z, len(even))
        s_eff = min(s, len(even) - z_eff)
        u += (s - s_eff) + (z - z_eff)      # duplicates that found no even page
        s, z = s_eff, z_eff
        kinds[even[:s]] = SHARED
        kinds[even[s:s + z]] = ZERO
        others = np.sort(np.concatenate([np.arange(1, npages, 2), even[s + z:]]))
        kinds[others[:u]] = UNIQUE
        kinds[others[u:]] = VOLATILE
    return kinds, {"shared": s, "zero": z, "unique": u, "volatile": v}


def _fill_kind(pages: np.ndarray, pos: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    contiguous = len(pos) > 0 and int(pos[-1]) - int(pos[0]) + 1 == len(pos)
    for k in range(0, len(pos), GEN_CHUNK):
        chunk = pos[k:k + GEN_CHUNK]
        data = rng.integers(0, 256, (len(chunk), PAGE), dtype=np.uint8)
        if contiguous:
            pages[int(chunk[0]):int(chunk[0]) + len(chunk)] = data
        else:
            pages[chunk] = data


def fill(arr: np.ndarray, kinds: np.ndarray, index: int) -> None:
    pages = arr.reshape(len(kinds), PAGE)
    _fill_kind(pages, np.flatnonzero(kinds == SHARED), 12345)
    _fill_kind(pages, np.flatnonzero(kinds == UNIQUE), 1_000_000 + index)
    _fill_kind(pages, np.flatnonzero(kinds == VOLATILE), 2_000_000 + index)
    zpos = np.flatnonzero(kinds == ZERO)
    for k in range(0, len(zpos), GEN_CHUNK):
        pages[zpos[k:k + GEN_CHUNK]] = 0        # written: the pages are present


def content_crc(arr: np.ndarray, kinds: np.ndarray) -> int:
    """CRC of every page that does not churn."""
    pages = arr.reshape(len(kinds), PAGE)
    crc = 0
    keep = np.flatnonzero(kinds != VOLATILE)
    if len(keep) == len(kinds):
        for k in range(0, len(kinds), GEN_CHUNK):
            crc = zlib.crc32(pages[k:k + GEN_CHUNK], crc)
        return crc
    for k in range(0, len(keep), GEN_CHUNK):
        crc = zlib.crc32(np.ascontiguousarray(pages[keep[k:k + GEN_CHUNK]]), crc)
    return crc




def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(f"vs_ksm: stopped by signal {signum}")


# --------------------------------------------------------------------------
# workers


def _ksm_merged_pages(addr: int, npages: int) -> tuple[np.ndarray, str]:
    """Indexes of the pages KSM merged (KPF_KSM), from pagemap + kpageflags."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = b""
        off = (addr // PAGE) * 8
        while len(raw) < npages * 8:
            got = os.pread(fd, npages * 8 - len(raw), off + len(raw))
            if not got:
                break
            raw += got
    finally:
        os.close(fd)
    ent = np.frombuffer(raw, np.uint64)
    present = (ent >> np.uint64(63)) & np.uint64(1)
    pfn = ent & np.uint64((1 << 55) - 1)
    idx = np.flatnonzero(present.astype(bool))
    if len(idx) and not pfn[idx].any():
        raise PermissionError("pagemap hides PFNs (needs CAP_SYS_ADMIN)")
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        merged = [int(i) for i in idx
                  if int.from_bytes(os.pread(fd, 8, int(pfn[i]) * 8), "little") >> KPF_KSM & 1]
    finally:
        os.close(fd)
    return np.array(merged, np.int64), "kpageflags"


def _child(system: str, index: int, npages: int, params: dict, conn: Any) -> None:
    """A worker: allocate, fill, advise, then answer the parent's commands."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides when we go
    mm = region = arr = pages = None
    stop_churn = threading.Event()
    churn: threading.Thread | None = None
    try:
        kinds, _ = make_layout(npages, params["unique"], params["zero"], params["volatile"],
                               params["scattered"])
        size = npages * PAGE
        t = time.perf_counter()
        if system == "ksm":
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                mm.madvise(mmap.MADV_NOHUGEPAGE)
            arr = np.frombuffer(mm, np.uint8)
        else:
            import shmdedup
            region = shmdedup.Region(size)
            arr = region.ndarray(np.uint8)
        fill(arr, kinds, index)
        fill_s = time.perf_counter() - t
        crc = content_crc(arr, kinds)
        if system == "ksm":
            mm.madvise(mmap.MADV_MERGEABLE)
            backing_fd = None
        else:
            region.advise(shmdedup.MERGEABLE)
            backing_fd = region.backing_fd
        vpos = np.flatnonzero(kinds == VOLATILE)
        if len(vpos):
            pages = arr.reshape(npages, PAGE)

            def _churn() -> None:
                n = 0
                while not stop_churn.wait(0.005):
                    n += 1
                    pages[vpos, :8] = n % 251

            churn = threading.Thread(target=_churn, daemon=True)
            churn.start()
        conn.send(("ready", os.getpid(), backing_fd, round(fill_s, 3)))
        while True:
            cmd = conn.recv()
            if cmd == "exit":
                break
            if cmd == "verify":
                conn.send(("ok", content_crc(arr, kinds) == crc))
            elif cmd in ("cow", "cow_random"):
                stop_churn.set()
                if churn is not None:
                    churn.join()
                how = "state bytes"
                if system == "ksm":
                    try:
                        idx, how = _ksm_merged_pages(arr.ctypes.data, npages)
                    except OSError as e:
                        idx = np.flatnonzero((kinds == SHARED) | (kinds == ZERO))
                        how = f"expected duplicates (kpageflags unreadable: {e})"
                else:
                    s = np.frombuffer(region.states(), np.uint8)[:npages]
                    idx = np.flatnonzero((s == shmdedup._native.MERGED) | (s == shmdedup._native.ZERO))
                fault_around = None
                if cmd == "cow_random":
                    # Isolated breaks: COW_RANDOM_PAGES of the merged pages in
                    # random order, shmdedup's fault-around off.
                    rng = np.random.default_rng(5)
                    idx = rng.permutation(idx)[:COW_RANDOM_PAGES]
                    if system != "ksm":
                        fault_around = shmdedup.cow_fault_around(1)
                offs = idx.astype(np.int64) * PAGE
                t = time.perf_counter()
                arr[offs] = 0xA5
                first = time.perf_counter() - t
                if fault_around is not None:
                    shmdedup.cow_fault_around(fault_around)
                t = time.perf_counter()
                arr[offs] = 0x5A
                again = time.perf_counter() - t
                if system != "ksm":
                    left = region.merged_pages()
                elif how == "kpageflags":
                    left = len(_ksm_merged_pages(arr.ctypes.data, npages)[0])
                else:
                    left = -1       # unknown (ksm_stat's count is only updated by ksmd)
                conn.send(("ok", {"pages": len(idx), "first_s": first, "again_s": again,
                                  "merged_after": left, "selected_by": how}))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        stop_churn.set()
        if churn is not None:
            churn.join()
        arr = pages = None
        if region is not None:
            region.close()
        if mm is not None:
            mm.close()


class Fleet:
    """N spawned workers; always reaped by close()."""

    def __init__(self, system: str, n: int, npages: int, params: dict, timeout: float) -> None:
        self.system, self.n, self.timeout = system, n, timeout
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.pids: list[int] = []
        self.backing_fds: list[int | None] = []
        self.fill_s: list[float] = []
        try:
            for i in range(n):
                a, b = ctx.Pipe()
                p = ctx.Process(target=_child, args=(system, i, npages, params, b), daemon=True,
                                name=f"vs_ksm-{system}-{i}")
                p.start()
                b.close()
                self.procs.append(p)
                self.conns.append(a)
            for i in range(n):
                _, pid, fd, fill_s = self._recv(i, "ready", timeout)
                self.pids.append(pid)
                self.backing_fds.append(fd)
                self.fill_s.append(fill_s)
        except BaseException:
            self.close()
            raise

    def _recv(self, i: int, what: str, timeout: float) -> tuple:
        conn = self.conns[i]
        if not conn.poll(timeout):
            raise TimeoutError(f"{self.system} worker {i} (pid {self.procs[i].pid}) did not answer "
                               f"'{what}' within {timeout:.0f} s")
        try:
            msg = conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.system} worker {i} exited (code {self.procs[i].exitcode}) "
                               f"before answering '{what}'") from None
        if msg[0] == "error":
            raise RuntimeError(f"{self.system} worker {i} failed on '{what}':\n{msg[1]}")
        return msg

    def call(self, i: int, cmd: str, timeout: float | None = None) -> Any:
        self.conns[i].send(cmd)
        return self._recv(i, cmd, self.timeout if timeout is None else timeout)[1]

    def cpu_ns(self) -> int:
        return sum(cpu_ns(p) for p in self.pids)

    def pss_kib(self) -> int:
        return sum(pss_kib(p) for p in self.pids)

    def max_vmas(self) -> int:
        """Most mappings (lines of /proc/<pid>/maps) of any worker."""
        most = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/maps", "rb") as f:
                    most = max(most, f.read().count(b"\n"))
            except OSError:
                pass
        return most

    def backing_bytes(self) -> int:
        total = 0
        for pid, fd in zip(self.pids, self.backing_fds, strict=True):
            if fd is not None:
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
        return total

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send("exit")
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 30
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


# --------------------------------------------------------------------------
# convergence


def expected_sharing(workers: int, counts: dict[str, int], max_page_sharing: int) -> int:
    z = workers * counts["zero"]
    return (workers - 1) * counts["shared"] + (z - math.ceil(z / max_page_sharing) if z else 0)


def converge(sample: Callable[[], dict], expected: int, timeout: float, poll: float,
             label: str, quiet: bool) -> dict[str, Any]:
    """Poll sample() (pages_sharing, full_scans, pages_scanned, cpu, wcpu) from
    now (run just became 1) until 100% of expected, a plateau, or timeout."""
    t0 = time.monotonic()
    s0 = sample()
    busy0, me0, procs0 = system_busy_ns(), cpu_ns(os.getpid()), cpu_by_pid()
    polls = 0
    res: dict[str, Any] = {"expected_sharing": expected, "t95_s": None, "t100_s": None,
                           "plateau": False}
    last_sharing, last_change_scans, last_change_t = -1, s0["full_scans"], 0.0
    while True:
        s = sample()
        polls += 1
        now = time.monotonic() - t0
        scans = s["full_scans"] - s0["full_scans"]
        sharing = s["pages_sharing"]
        if sharing != last_sharing:
            last_sharing, last_change_scans, last_change_t = sharing, s["full_scans"], now
        if expected == 0:
            done95 = done100 = scans >= 2
        else:
            done95 = sharing >= 0.95 * expected
            done100 = sharing >= expected
        if done95 and res["t95_s"] is None:
            res.update(t95_s=now, cpu95_ns=s["cpu"] - s0["cpu"], wcpu95_ns=s["wcpu"] - s0["wcpu"],
                       scans95=scans)
        if done100:
            res["t100_s"] = now
            break
        # No progress for 3 full scans and 3 s (merges in flight can hold
        # pages_sharing still while a fast scanner laps them).
        if scans >= 2 and s["full_scans"] - last_change_scans >= 3 and now - last_change_t >= 3.0:
            res["plateau"] = True
            say(f"\n  {label}: pages_sharing stuck at {sharing} of {expected} for "
                f"{s['full_scans'] - last_change_scans} full scans and {now - last_change_t:.1f} s: "
                f"stopping there (plateau)")
            break
        if now > timeout:
            raise TimeoutError(f"{label}: no convergence within {timeout:.0f} s: pages_sharing "
                               f"{sharing} of {expected} expected, {scans} full scans")
        if not quiet:
            pct = 100 * sharing / expected if expected else 0.0
            print(f"\r  {label}: {sharing:>9} / {expected} pages sharing ({pct:5.1f}%), "
                  f"full_scans {scans}, {now:6.1f} s", end="", file=sys.stderr, flush=True)
        time.sleep(poll)
    if not quiet:
        print(file=sys.stderr)
    # CPU that neither the scanner, the workers nor this script used: other
    # processes competing for the CPUs (noise to report, not to hide).
    foreign = (system_busy_ns() - busy0) - (s["cpu"] - s0["cpu"]) - (s["wcpu"] - s0["wcpu"]) \
        - (cpu_ns(os.getpid()) - me0)
    res.update(polls=polls, foreign_cpu_s=max(foreign, 0) / 1e9, top_cpu=top_cpu(procs0))
    res.update(end_s=time.monotonic() - t0, pages_sharing=s["pages_sharing"],
               cpu_ns=s["cpu"] - s0["cpu"], wcpu_ns=s["wcpu"] - s0["wcpu"],
               full_scans=s["full_scans"] - s0["full_scans"],
               pages_scanned=s["pages_scanned"] - s0["pages_scanned"])
    return res


def steady_state(sample: Callable[[], dict], wait_scan: Callable[[float], None], tracked: int,
                 timeout: float, min_scans: int = 3, min_s: float = 2.0) -> dict[str, Any]:
    """CPU per tracked page per full scan, over >= min_scans scans and >= min_s,
    ending right after a full scan completes."""
    wait_scan(timeout)                   # start on a scan boundary
    s0 = sample()
    t0 = time.monotonic()
    while True:
        wait_scan(timeout)
        s = sample()
        if s["full_scans"] - s0["full_scans"] >= min_scans and time.monotonic() - t0 >= min_s:
            break
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"steady state: fewer than {min_scans} full scans in {timeout:.0f} s")
    scans = s["full_scans"] - s0["full_scans"]
    cpu = s["cpu"] - s0["cpu"]
    scanned = s["pages_scanned"] - s0["pages_scanned"]
    return {"seconds": time.monotonic() - t0, "full_scans": scans, "cpu_s": cpu / 1e9,
            "worker_cpu_s": (s["wcpu"] - s0["wcpu"]) / 1e9, "pages_scanned": scanned,
            "us_per_tracked_page": cpu / 1e3 / (scans * tracked),
            "us_per_scanned_page": cpu / 1e3 / scanned if scanned else None,
            "seconds_per_full_scan": (time.monotonic() - t0) / scans}


def late_worker(system: str, cfg: argparse.Namespace, npages: int, counts: dict[str, int],
                sample: Callable[[], dict], timeout: float, poll: float = 0.01) -> dict[str, Any] | None:
    """One more worker holding worker 0's bytes, started once the others have
    converged (a fleet member that comes late): from its ready message (filled
    and advised) until 95% of its shared pages merged onto the stable pages
    already there.  Both systems search their stable index at a page's first
    visit, so it takes at most about one full scan."""
    target = counts["shared"]
    if not target:
        return None
    s_before = sample()
    late = Fleet(system, 1, npages, vars(cfg), timeout)
    try:
        t0 = time.monotonic()
        s0, w0 = sample(), late.cpu_ns()
        while True:
            s = sample()
            now = time.monotonic() - t0
            if s["pages_sharing"] - s_before["pages_sharing"] >= 0.95 * target:
                break
            if now > timeout:
                raise TimeoutError(f"{system}: the late worker's pages did not merge within "
                                   f"{timeout:.0f} s")
            time.sleep(poll)
        return {"t95_s": now, "full_scans": s["full_scans"] - s0["full_scans"],
                "scanner_cpu_s": (s["cpu"] - s0["cpu"]) / 1e9,
                "worker_cpu_s": (late.cpu_ns() - w0) / 1e9}
    finally:
        late.close()


def _memory(fleet: Fleet) -> dict[str, int]:
    m = meminfo()
    return {"AnonPages": m["AnonPages"], "Shmem": m["Shmem"], "MemAvailable": m["MemAvailable"],
            "SUnreclaim": m.get("SUnreclaim", 0), "workers_pss": fleet.pss_kib(),
            "worker_vmas": fleet.max_vmas(), "meminfo": m}


def _meminfo_delta(before: dict, after: dict) -> dict[str, int]:
    a, b = before["meminfo"], after["meminfo"]
    return {k: b[k] - a[k] for k in a if k in b and b[k] != a[k]}


def _cow(fleet: Fleet, timeout: float, worker: int = 0, cmd: str = "cow") -> dict[str, Any] | None:
    if worker >= len(fleet.pids):
        return None
    r = fleet.call(worker, cmd, timeout)
    n = r["pages"]
    r["us_per_page"] = r["first_s"] / n * 1e6 if n else None
    r["net_us_per_page"] = (r["first_s"] - r["again_s"]) / n * 1e6 if n else None
    return r


# --------------------------------------------------------------------------
# the two systems


def run_ksm(cfg: argparse.Namespace, workers: int, mib: int, full: bool) -> dict[str, Any]:
    why = KSM.usable()
    if why:
        raise SystemExit(f"KSM baseline impossible: {why}. Use --only shmdedup.")
    KSM.save()
    ksmd = find_ksmd()
    if ksmd is None:
        raise SystemExit("no ksmd thread found in /proc/*/comm")
    npages = mib * MIB // PAGE
    kinds, counts = make_layout(npages, cfg.unique, cfg.zero, cfg.volatile, cfg.scattered)
    mps = KSM.read("max_page_sharing")
    expected = expected_sharing(workers, counts, mps)
    # pages_scanned appeared in 6.8, ksm_zero_pages in 6.1.
    has_scanned = KSM.has("pages_scanned")
    base = {k: KSM.read(k) if KSM.has(k) else 0
            for k in ("pages_sharing", "full_scans", "pages_scanned", "ksm_zero_pages")}
    quiet = cfg.quiet
    res: dict[str, Any] = {"system": "ksm", "workers": workers, "mib": mib, "counts": counts,
                           "max_page_sharing": mps, "ksmd_pid": ksmd}
    if base["pages_sharing"]:
        res["note_baseline_pages_sharing"] = base["pages_sharing"]
    fleet = None
    try:
        say(f"KSM: starting {workers} workers x {mib} MiB ...")
        fleet = Fleet("ksm", workers, npages, vars(cfg), cfg.timeout)
        res["fill_s"] = max(fleet.fill_s)

        def sample() -> dict:
            return {"pages_sharing": KSM.read("pages_sharing") - base["pages_sharing"],
                    "full_scans": KSM.read("full_scans"),
                    "pages_scanned": KSM.read("pages_scanned") if has_scanned else 0,
                    "cpu": cpu_ns(ksmd), "wcpu": fleet.cpu_ns()}

        def wait_scan(timeout: float) -> None:
            f0, t0 = KSM.read("full_scans"), time.monotonic()
            while KSM.read("full_scans") == f0:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"KSM: no full scan completed within {timeout:.0f} s")
                time.sleep(0.005)

        res["busy_cpus_before"] = wait_quiet(cfg.wait_quiet, "KSM")
        before = _memory(fleet)
        KSM.write("pages_to_scan", cfg.pages_to_scan)
        KSM.write("sleep_millisecs", cfg.sleep_ms)
        KSM.write("run", 1)
        conv = converge(sample, expected, cfg.timeout, cfg.poll, "KSM", quiet)
        after = _memory(fleet)
        res.update(conv)
        res["meminfo_delta_kib"] = _meminfo_delta(before, after)
        for m in (before, after):
            del m["meminfo"]
        res["memory_kib"] = {"before": before, "after": after}
        res["saved_mib"] = (before["AnonPages"] - after["AnonPages"]) / 1024
        res["saved_memavailable_mib"] = (after["MemAvailable"] - before["MemAvailable"]) / 1024
        res["scanner_memory_mib"] = (after["SUnreclaim"] - before["SUnreclaim"]) / 1024
        res["workers_pss_mib"] = [before["workers_pss"] / 1024, after["workers_pss"] / 1024]
        res["saved_pss_mib"] = (before["workers_pss"] - after["workers_pss"]) / 1024
        res["worker_vmas"] = [before["worker_vmas"], after["worker_vmas"]]
        res["worker_vmas_after"] = after["worker_vmas"]
        if full:
            rmap = sum(ksm_stat(p).get("ksm_rmap_items", 0) for p in fleet.pids)
            profit = KSM.read("general_profit") if KSM.has("general_profit") else None
            zero_pages = KSM.read("ksm_zero_pages") - base["ksm_zero_pages"] if KSM.has("ksm_zero_pages") else 0
            res["rmap_items"] = rmap
            if profit is not None and rmap:
                res["metadata_bytes_per_page"] = (
                    (KSM.read("pages_sharing") + zero_pages) * PAGE - profit) / rmap
                res["metadata_source"] = "sizeof(ksm_rmap_item) from general_profit and ksm_stat"
            else:
                res["metadata_bytes_per_page"] = 64
                res["metadata_source"] = "estimate: sizeof(struct ksm_rmap_item) on x86-64"
            res["measured_metadata_bytes_per_page"] = (
                (after["SUnreclaim"] - before["SUnreclaim"]) * 1024 / (workers * npages))
            res["steady"] = steady_state(sample, wait_scan, workers * npages, cfg.timeout)
            res["measured_metadata_bytes_per_page_steady"] = (     # ksmd's slab, as above
                (_memory(fleet)["SUnreclaim"] - before["SUnreclaim"]) * 1024 / (workers * npages))
            res["late"] = late_worker("ksm", cfg, npages, counts, sample, cfg.timeout)
            res["verify_ok"] = all(fleet.call(i, "verify") for i in range(workers))
            KSM.write("run", 0)            # stop scanning, keep the merged pages
            res["cow"] = _cow(fleet, cfg.timeout)
            res["cow_random"] = _cow(fleet, cfg.timeout, 1, "cow_random")
        else:
            res["verify_ok"] = all(fleet.call(i, "verify") for i in range(workers))
    finally:
        if fleet is not None:
            fleet.close()
        KSM.restore()
    return res


def run_shmdedup(cfg: argparse.Namespace, workers: int, mib: int, full: bool) -> dict[str, Any]:
    import shmdedup
    from shmdedup.coordinator.scan.scanner import METADATA_BYTES_PER_PAGE
    npages = mib * MIB // PAGE
    kinds, counts = make_layout(npages, cfg.unique, cfg.zero, cfg.volatile, cfg.scattered)
    mps = KSM.read("max_page_sharing") if KSM.has("max_page_sharing") else 256
    expected = expected_sharing(workers, counts, mps)
    quiet = cfg.quiet
    res: dict[str, Any] = {"system": "shmdedup", "workers": workers, "mib": mib, "counts": counts,
                           "max_page_sharing": mps}
    coord = shmdedup.Coordinator(process=True, run=0, pages_to_scan=cfg.pages_to_scan,
                                 sleep_millisecs=cfg.sleep_ms, max_page_sharing=mps)
    fleet = None
    profiler = None
    try:
        coord.start()
        cpid = coord.pid
        res["coordinator_pid"] = cpid
        if cfg.coordinator_nice is not None:
            os.setpriority(os.PRIO_PROCESS, cpid, cfg.coordinator_nice)
        res["coordinator_nice"] = os.getpriority(os.PRIO_PROCESS, cpid)
        client = coord.client()
        rss0 = proc_kib(cpid, "status", "RssAnon")
        say(f"shmdedup: starting {workers} workers x {mib} MiB ...")
        fleet = Fleet("shmdedup", workers, npages, vars(cfg), cfg.timeout)
        res["fill_s"] = max(fleet.fill_s)
        t0 = time.monotonic()
        while True:                         # every region registered
            st = client.stats()
            regs = [w for w in st["workers"] if w["pid"] in fleet.pids]
            if len(regs) == workers and sum(w["pages"] for w in regs) >= workers * npages:
                break
            if time.monotonic() - t0 > cfg.timeout:
                raise TimeoutError(f"shmdedup: only {len(regs)} of {workers} workers registered "
                                   f"within {cfg.timeout:.0f} s")
            time.sleep(0.02)

        rtts: list[float] = []          # stats() round trips (event-loop lag, --scaling)

        def sample() -> dict:
            t = time.perf_counter()
            s = client.stats()
            rtts.append(time.perf_counter() - t)
            return {"pages_sharing": s["pages_sharing"], "full_scans": s["full_scans"],
                    "pages_scanned": s["pages_scanned"], "cpu": cpu_ns(cpid), "wcpu": fleet.cpu_ns(),
                    "stats": s}

        def wait_scan(timeout: float) -> None:
            client.wait_full_scans(1, timeout=timeout)

        res["busy_cpus_before"] = wait_quiet(cfg.wait_quiet, "shmdedup")
        before = _memory(fleet)
        before["backing"] = fleet.backing_bytes()
        before["coordinator_rss_anon"] = proc_kib(cpid, "status", "RssAnon")
        def profile_start() -> Any:
            if cfg.perf:
                cmd = ["perf", "record", "-g", "-p", str(cpid), "-o", cfg.py_spy]
            else:
                cmd = (["py-spy", "record", "--pid", str(cpid), "--rate", str(cfg.py_spy_rate),
                        "--format", "raw", "--output", cfg.py_spy]
                       + (["--native"] if cfg.py_spy_native else ["--nonblocking"]))
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            return p

        def profile_stop(p: Any) -> None:
            p.send_signal(signal.SIGINT)
            p.wait(60)
            res["py_spy_output"] = cfg.py_spy

        if cfg.py_spy and cfg.py_spy_phase == "converge":
            profiler = profile_start()
        for _ in range(10):                 # stats() round trip with the scanner stopped
            sample()
        idle_rtts = sorted(rtts)
        rtts.clear()
        client.set("run", 1)
        conv = converge(sample, expected, cfg.timeout, cfg.poll, "shmdedup", quiet)
        res["stats_rtt_s"] = {"idle": idle_rtts, "converge": sorted(rtts)}
        if profiler is not None:
            profile_stop(profiler)
            profiler = None
        after = _memory(fleet)
        after["backing"] = fleet.backing_bytes()
        after["coordinator_rss_anon"] = proc_kib(cpid, "status", "RssAnon")
        final = client.stats()
        res.update(conv)
        res["meminfo_delta_kib"] = _meminfo_delta(before, after)
        for m in (before, after):
            del m["meminfo"]
        res["memory_kib"] = {"before": before, "after": after}
        res["saved_mib"] = (before["Shmem"] - after["Shmem"]) / 1024
        res["saved_memavailable_mib"] = (after["MemAvailable"] - before["MemAvailable"]) / 1024
        res["backing_mib"] = [before["backing"] / MIB, after["backing"] / MIB]
        res["stable_mib"] = final["stable_pages_allocated"] * PAGE / MIB
        res["scanner_memory_mib"] = (after["coordinator_rss_anon"] - rss0) / 1024
        res["workers_pss_mib"] = [before["workers_pss"] / 1024, after["workers_pss"] / 1024]
        res["saved_pss_mib"] = (before["workers_pss"] - after["workers_pss"]) / 1024
        res["worker_vmas"] = [before["worker_vmas"], after["worker_vmas"]]
        res["worker_vmas_after"] = after["worker_vmas"]
        res["final_stats"] = {k: v for k, v in final.items() if k != "workers"}
        if full:
            t = time.perf_counter()
            for _ in range(5):
                client.stats()
            res["stats_call_ms"] = (time.perf_counter() - t) / 5 * 1e3
            res["metadata_bytes_per_page"] = METADATA_BYTES_PER_PAGE
            res["metadata_source"] = "shmdedup.coordinator.scan.scanner.METADATA_BYTES_PER_PAGE"
            res["rmap_items"] = final["rmap_items"]
            res["measured_metadata_bytes_per_page"] = (
                (after["coordinator_rss_anon"] - rss0) * 1024 / (workers * npages))
            if cfg.py_spy and cfg.py_spy_phase == "steady":
                profiler = profile_start()
            res["steady"] = steady_state(sample, wait_scan, workers * npages, cfg.timeout)
            res["measured_metadata_bytes_per_page_steady"] = (
                (proc_kib(cpid, "status", "RssAnon") - rss0) * 1024 / (workers * npages))
            if profiler is not None:
                profile_stop(profiler)
                profiler = None
            res["late"] = late_worker("shmdedup", cfg, npages, counts, sample, cfg.timeout)
            res["verify_ok"] = all(fleet.call(i, "verify") for i in range(workers))
            client.set("run", 0)
            c0 = cpu_ns(cpid)
            for _ in range(20):
                client.stats()
            res["stats_cpu_ms"] = (cpu_ns(cpid) - c0) / 20 / 1e6
            res["stats_polling_cpu_s"] = res["stats_cpu_ms"] * res["polls"] / 1e3
            res["cow"] = _cow(fleet, cfg.timeout)
            res["cow_random"] = _cow(fleet, cfg.timeout, 1, "cow_random")
        else:
            res["verify_ok"] = all(fleet.call(i, "verify") for i in range(workers))
            client.set("run", 0)            # what the polling cost it (at most: early calls are cheaper)
            c0 = cpu_ns(cpid)
            for _ in range(10):
                client.stats()
            res["stats_cpu_ms"] = (cpu_ns(cpid) - c0) / 10 / 1e6
            res["stats_polling_cpu_s"] = res["stats_cpu_ms"] * res["polls"] / 1e3
    finally:
        if profiler is not None:
            profiler.kill()
            profiler.wait()
        stop_shmdedup(coord, fleet)
    return res


def stop_shmdedup(coord: Any, fleet: Fleet | None) -> None:
    """End a shmdedup run: its workers, then its coordinator."""
    if fleet is not None:
        try:
            # Stop scanning first: as workers exit one by one, the scanner
            # would give lonely slots back to the survivors (unmerge
            # traffic to processes that are about to exit anyway).
            coord.set("run", 0)
        except Exception:
            pass
        fleet.close()
    coord.stop()


# --------------------------------------------------------------------------
# reporting


def _finish(r: dict[str, Any]) -> None:
    """Derived numbers, the same formulas for both systems."""
    if r.get("cpu95_ns") is not None:
        r["total_cpu95_s"] = (r["cpu95_ns"] + r["wcpu95_ns"]) / 1e9
    r["scanner_cpu_s"] = r["cpu_ns"] / 1e9
    r["worker_cpu_s"] = r["wcpu_ns"] / 1e9
    r["total_cpu_s"] = (r["cpu_ns"] + r["wcpu_ns"]) / 1e9
    r["us_per_merged_page"] = (r["total_cpu_s"] * 1e6 / r["pages_sharing"]
                               if r["pages_sharing"] else None)
    tracked = r["workers"] * r["mib"] * MIB // PAGE
    r["us_per_advised_page"] = r["total_cpu_s"] * 1e6 / tracked
    r["ideal_saved_mib"] = r["expected_sharing"] * PAGE / MIB
    for k in [k for k in r if k.endswith("_ns")]:
        del r[k]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool) or not b:
        return "-"
    return f"{a / b:.2f}"


def _get(r: dict | None, path: str) -> Any:
    cur: Any = r
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


ROWS = [
    ("time to 95% (s)", "t95_s", 2),
    ("time to 100% (s)", "t100_s", 2),
    ("full scans to 100%", "full_scans", 0),
    ("pages_sharing reached", "pages_sharing", 0),
    ("scanner CPU s (ksmd / coordinator)", "scanner_cpu_s", 2),
    ("worker-side CPU s (agents)", "worker_cpu_s", 2),
    ("total CPU s until 100%", "total_cpu_s", 2),
    ("CPU us per merged page", "us_per_merged_page", 2),
    ("CPU us per advised page", "us_per_advised_page", 2),
    ("steady rescan us/tracked page/scan", "steady.us_per_tracked_page", 4),
    ("steady rescan us/scanned page", "steady.us_per_scanned_page", 3),
    ("steady s per full scan", "steady.seconds_per_full_scan", 3),
    ("late worker: s to 95% of its pages", "late.t95_s", 2),
    ("  full scans meanwhile", "late.full_scans", 0),
    ("  scanner CPU s meanwhile", "late.scanner_cpu_s", 3),
    ("memory saved MiB (workers' Pss)", "saved_pss_mib", 1),
    ("  system-wide: AnonPages / Shmem", "saved_mib", 1),
    ("  system-wide: MemAvailable", "saved_memavailable_mib", 1),
    ("ideal saved MiB (expected sharing)", "ideal_saved_mib", 1),
    ("scanner's own memory MiB", "scanner_memory_mib", 1),
    ("most mappings (VMAs) of a worker", "worker_vmas_after", 0),
    ("metadata bytes/tracked page", "metadata_bytes_per_page", 1),
    ("measured metadata bytes/page", "measured_metadata_bytes_per_page", 1),
    ("  after the steady rescans", "measured_metadata_bytes_per_page_steady", 1),
    ("COW break us/page (first write)", "cow.us_per_page", 2),
    ("COW break us/page (net of rewrite)", "cow.net_us_per_page", 2),
    ("pages broken in worker 0", "cow.pages", 0),
    ("COW us/page, 20000 random pages (worker 1)", "cow_random.us_per_page", 2),
    ("  net of rewrite", "cow_random.net_us_per_page", 2),
    ("every worker read its bytes", "verify_ok", 0),
    ("other processes' CPU s meanwhile", "foreign_cpu_s", 2),
]


def table(ksm: dict | None, sd: dict | None) -> str:
    w = max(len(r[0]) for r in ROWS)
    lines = [f"{'':<{w}}  {'KSM':>12}  {'shmdedup':>12}  {'shmdedup/KSM':>12}",
             "-" * (w + 44)]
    for name, path, digits in ROWS:
        a, b = _get(ksm, path), _get(sd, path)
        if a is None and b is None:
            continue
        lines.append(f"{name:<{w}}  {_fmt(a, digits):>12}  {_fmt(b, digits):>12}  {_ratio(b, a):>12}")
    return "\n".join(lines)


def notes(ksm: dict | None, sd: dict | None) -> list[str]:
    out = []
    for r in (ksm, sd):
        if r and r.get("plateau"):
            out.append(f"{r['system']}: did not reach 100%: stopped at {r['pages_sharing']} of "
                       f"{r['expected_sharing']} pages sharing (no progress for 3 full scans and 3 s)")
        if r and r.get("cow") and r["cow"]["merged_after"] > 0:
            out.append(f"{r['system']}: {r['cow']['merged_after']} pages of worker 0 still merged "
                       f"after the COW writes")
        if r and r.get("cow") and not r["cow"]["selected_by"].startswith(("state", "kpage")):
            out.append(f"{r['system']}: merged pages selected by {r['cow']['selected_by']}")
    if sd:
        out.append(f"shmdedup: backing objects {sd['backing_mib'][0]:.1f} -> {sd['backing_mib'][1]:.1f} MiB"
                   f" (st_blocks) + {sd['stable_mib']:.1f} MiB stable pages; workers' Pss "
                   f"{sd['workers_pss_mib'][0]:.1f} -> {sd['workers_pss_mib'][1]:.1f} MiB")
        if sd.get("stats_cpu_ms") is not None:
            out.append(f"shmdedup: one stats() call costs the coordinator {sd['stats_cpu_ms']:.1f} ms CPU "
                       f"({sd['stats_call_ms']:.1f} ms round trip); polled {sd['polls']} times during "
                       f"convergence = {sd['stats_polling_cpu_s']:.2f} s of its CPU above")
    for r in (ksm, sd):
        if r and r.get("foreign_cpu_s", 0) > max(0.1 * r.get("end_s", 0), 0.2):
            out.append(f"{r['system']}: other processes used {r['foreign_cpu_s']:.2f} CPU s during its "
                       f"{r['end_s']:.2f} s convergence: times are disturbed")
    if ksm:
        out.append(f"KSM: workers' Pss {ksm['workers_pss_mib'][0]:.1f} -> {ksm['workers_pss_mib'][1]:.1f} MiB; "
                   f"settings {ksm.get('settings')}")
    return out


# --------------------------------------------------------------------------
# main


def print_json(result: dict[str, Any]) -> None:
    print(json.dumps(result, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _check_memory(workers: int, mib: int) -> None:
    need = workers * mib * 1.5 + 512
    have = meminfo()["MemAvailable"] / 1024
    if need > have:
        raise SystemExit(f"{workers} x {mib} MiB needs about {need:.0f} MiB, only {have:.0f} MiB available")


def one(cfg: argparse.Namespace, workers: int, mib: int, full: bool) -> dict[str, Any]:
    _check_memory(workers, mib)
    out: dict[str, Any] = {"workers": workers, "mib": mib}
    if cfg.only in (None, "ksm"):
        settings = KSM.settings() if KSM.usable() is None else {}
        r = run_ksm(cfg, workers, mib, full)
        _finish(r)
        r["settings"] = settings
        out["ksm"] = r
    if cfg.only in (None, "shmdedup"):
        r = run_shmdedup(cfg, workers, mib, full)
        _finish(r)
        r["poll_s"] = cfg.poll
        out["shmdedup"] = r
    return out


def main(argv: list[str] | None = None) -> int:
    # The scaling and out-of-the-box modes live in vs_ksm_scale.py, which
    # imports this module: make that import find this one even as __main__.
    sys.modules.setdefault("vs_ksm", sys.modules[__name__])
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import vs_ksm_scale
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256, help="MiB per worker")
    ap.add_argument("--unique", type=float, default=0.0, help="fraction of pages unique to a worker")
    ap.add_argument("--zero", type=float, default=0.0, help="fraction of zero pages")
    ap.add_argument("--volatile", type=float, default=0.0,
                    help="fraction of pages a thread keeps rewriting")
    ap.add_argument("--scattered", action="store_true",
                    help="duplicate pages only on every other page (no two adjacent)")
    ap.add_argument("--pages-to-scan", type=int, default=10000)
    ap.add_argument("--sleep-ms", type=int, default=0)
    ap.add_argument("--only", choices=("ksm", "shmdedup"))
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    vs_ksm_scale.add_arguments(ap)      # --scaling, --scaling-quick, --defaults
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for any one wait")
    ap.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                    help="before each measurement, wait up to this long for other processes to "
                         "use < 0.25 CPUs (0: don't wait)")
    ap.add_argument("--coordinator-nice", type=int, default=ksmd_nice(),
                    help="nice value of the coordinator process (default: ksmd's, normally 5)")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between statistics samples")
    ap.add_argument("--py-spy", metavar="FILE",
                    help="profile the coordinator with py-spy (raw collapsed stacks) until convergence "
                         "(--defaults: during its settled steady window)")
    ap.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--py-spy-phase", choices=("converge", "steady"), default="converge",
                    help="what to profile: convergence, or the steady-state rescans after it")
    ap.add_argument("--py-spy-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--perf", action="store_true",
                    help="with --py-spy FILE: record with perf record -g instead (kernel and C "
                         "frames, no Python ones; FILE is perf's data file)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    cfg = ap.parse_args(argv)
    if cfg.workers < 1 or cfg.mib < 1 or cfg.pages_to_scan < 1 or cfg.sleep_ms < 0:
        ap.error("--workers, --mib and --pages-to-scan must be positive, --sleep-ms >= 0")
    for name in ("unique", "zero", "volatile"):
        if not 0 <= getattr(cfg, name) <= 1:
            ap.error(f"--{name} must be a fraction between 0 and 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    if vs_ksm_scale.wanted(cfg):
        return vs_ksm_scale.main(cfg)

    shm0 = dev_shm()
    env = {"kernel": platform.release(), "cpus": os.cpu_count(), "page_size": PAGE,
           "loadavg_at_start": os.getloadavg()[0],
           "mem_total_mib": meminfo()["MemTotal"] // 1024}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            env["thp"] = f.read().strip()
    except OSError:
        pass
    result: dict[str, Any] = {"config": {k: v for k, v in vars(cfg).items()}, "environment": env}
    try:
        result.update(one(cfg, cfg.workers, cfg.mib, full=True))
    finally:
        KSM.restore()
        left = sorted(dev_shm() - shm0)
        result["dev_shm_leftovers"] = left
        if left:
            say(f"vs_ksm: WARNING: left in /dev/shm: {left}")

    if cfg.json:
        print_json(result)
        return 0
    ksm, sd = result.get("ksm"), result.get("shmdedup")
    c = (ksm or sd)["counts"]
    print(f"\n{cfg.workers} workers x {cfg.mib} MiB ({c['shared']} shared, {c['zero']} zero, "
          f"{c['unique']} unique, {c['volatile']} volatile pages each{', scattered' if cfg.scattered else ''}); "
          f"pages_to_scan {cfg.pages_to_scan}, sleep {cfg.sleep_ms} ms; expected pages_sharing "
          f"{(ksm or sd)['expected_sharing']}; kernel {env['kernel']}, {env['cpus']} CPUs")
    print(table(ksm, sd))
    for line in notes(ksm, sd):
        print("  * " + line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TimeoutError, RuntimeError) as e:
        print(f"vs_ksm: {e}", file=sys.stderr)
        sys.exit(1)
