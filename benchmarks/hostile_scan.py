"""What scan attacks cost a real coordinator (issue: crash-proof scan, cost
proportional to data).  Not a test: it prints numbers.

Each scenario starts a coordinator process (``python -m shmdedup coordinator``)
and an honest worker (the library's own agent) beside it, runs one attack from
this process through raw protocol peers, and measures from outside: the
coordinator's CPU (utime + stime over the attack), its RSS (VmRSS, VmHWM), the
latency of ``stats`` (the event loop is blocked while a batch runs, so this is
also the longest batch), and the honest worker's fresh merges (two new equal
pages written, until both are merged).

    python benchmarks/hostile_scan.py [scenario ...] [--seconds S] [--json]

Scenarios: truncate, sparse-mem, unadvised-huge, advised-empty, advise-flip,
tiny-regions, stats-huge (default: all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shmdedup.tools.client import Client  # noqa: E402
from tests.helpers import Worker, child_env, wait_for  # noqa: E402
from tests.integration.hostile import PAGE, WORKER_SETUP, RawPeer, memfd  # noqa: E402

HUGE = 2**26   # the default max_pages_per_worker

FRESH = """
import time
fresh_region = shmdedup.Region(128 * P)
fresh_pages = fresh_region.ndarray(np.uint8).reshape(128, P)
fresh_region.advise(shmdedup.MERGEABLE)

def fresh(i, timeout=30.0):
    page = np.random.default_rng(10_000 + i).integers(0, 256, P, dtype=np.uint8)
    k = (2 * i) % 128
    t0 = time.monotonic()
    fresh_pages[k] = page
    fresh_pages[k + 1] = page
    while True:
        s = np.frombuffer(fresh_region.states(), np.uint8)
        if s[k] == 2 and s[k + 1] == 2:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.001)
"""


class Coordinator:
    def __init__(self, controls: dict[str, int], rlimit_as: int | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="sd-bench-")
        self.path = os.path.join(self.dir, "c.sock")
        cmd = [sys.executable, "-m", "shmdedup", "coordinator", "--socket", self.path]
        for k, v in controls.items():
            cmd += ["--set", f"{k}={v}"]

        def limit() -> None:
            if rlimit_as:
                import resource
                resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        self.proc = subprocess.Popen(cmd, env=child_env(), stderr=self.err, preexec_fn=limit)
        wait_for(lambda: os.path.exists(self.path) or self.proc.poll() is not None, 30,
                 what="the coordinator socket")
        self.client = Client(self.path, timeout=120)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def mem_mb(self) -> dict[str, float]:
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "VmPeak"):
                    out[k] = round(int(v.split()[0]) / 1024, 1)
        return out

    def stats_latency(self) -> float:
        t0 = time.monotonic()
        self.client.stats()
        return time.monotonic() - t0

    def log(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def register_sparse(peer: RawPeer, rid: int, npages: int, backing: int, meta: int) -> None:
    peer.send({"t": "register", "rid": rid, "npages": npages}, [backing, meta])


def sparse_objects(npages: int) -> tuple[int, int]:
    return memfd(npages * PAGE), memfd(npages)


def run(name: str, seconds: float, controls: dict[str, int] | None = None,
        rlimit_as: int | None = None) -> dict:
    controls = dict(controls or {})
    c = Coordinator(controls, rlimit_as)
    w = Worker()
    out: dict = {"scenario": name}
    peers: list[RawPeer] = []
    fds: list[int] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        w.run(WORKER_SETUP + FRESH, SOCKET=c.path, NPAGES=32, SEED=1)
        wait_for(lambda: w.call("result = region.merged_pages()") == 32, 60, what="honest merge")
        # -- the attack ------------------------------------------------------
        t_attack = time.monotonic()
        if name == "truncate":
            p = RawPeer(c.path)
            p.hello()
            n = 64
            b, m = memfd(n * PAGE, os.urandom(PAGE) * n), memfd(PAGE)
            fds += [b, m]
            p.send({"t": "register", "rid": 1, "npages": n}, [b, m])
            p.send({"t": "advise", "rid": 1, "start": 0, "npages": n, "mergeable": True})
            peers.append(p)

            def churn() -> None:
                data = os.urandom(PAGE) * 4
                while not stop.is_set():
                    os.ftruncate(b, 0)
                    os.ftruncate(b, n * PAGE)
                    os.pwrite(b, data, 0)
            threads.append(threading.Thread(target=churn, daemon=True))
        elif name in ("sparse-mem", "unadvised-huge", "advised-empty", "advise-flip", "stats-huge"):
            k = 4 if name == "sparse-mem" else 1
            b, m = sparse_objects(HUGE)
            fds += [b, m]
            for _ in range(k):
                p = RawPeer(c.path)
                p.hello()
                register_sparse(p, 1, HUGE, b, m)
                if name in ("sparse-mem", "advised-empty", "advise-flip"):
                    p.send({"t": "advise", "rid": 1, "start": 0, "npages": HUGE, "mergeable": True})
                peers.append(p)
            if name == "advise-flip":
                p = peers[0]

                def flip() -> None:
                    v = False
                    while not stop.is_set():
                        if not p.send({"t": "advise", "rid": 1, "start": 0, "npages": HUGE,
                                       "mergeable": v}):
                            return
                        v = not v
                        time.sleep(0.05)
                threads.append(threading.Thread(target=flip, daemon=True))
        elif name == "tiny-regions":
            # unique pages (each its own object): nothing merges, every page is scanned
            for conn in range(2):
                p = RawPeer(c.path)
                p.hello()
                for rid in range(4096):
                    b, m = memfd(PAGE, os.urandom(PAGE)), memfd(PAGE)
                    p.send({"t": "register", "rid": rid, "npages": 1}, [b, m])
                    p.send({"t": "advise", "rid": rid, "start": 0, "npages": 1, "mergeable": True})
                    os.close(b), os.close(m)
                peers.append(p)
        for t in threads:
            t.start()
        out["setup_s"] = round(time.monotonic() - t_attack, 3)
        # -- measure during the attack -----------------------------------------
        cpu0, t0 = c.cpu(), time.monotonic()
        lat, merges = [], []
        i = 0
        while time.monotonic() - t0 < seconds and c.alive():
            try:
                lat.append(c.stats_latency())
                merges.append(w.call("result = fresh(i)", i=i, timeout=120))
            except Exception as e:  # noqa: BLE001
                out["error"] = repr(e)
                break
            i += 1
        wall = time.monotonic() - t0
        out["alive"] = c.alive()
        if c.alive():
            out["cpu_pct"] = round(100 * (c.cpu() - cpu0) / wall, 1)
            out["mem_mb"] = c.mem_mb()
        out["stats_s_p50"], out["stats_s_max"] = pct(lat, 0.5), pct(lat, 1.0)
        out["fresh_merge_s_p50"], out["fresh_merge_s_p99"] = pct(merges, 0.5), pct(merges, 0.99)
        out["fresh_merges"] = f"{sum(x is not None for x in merges)}/{len(merges)}"
        if not c.alive():
            out["exit"] = c.proc.returncode
            out["log_tail"] = c.log()[-600:]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for p in peers:
            p.close()
        for fd in fds:
            os.close(fd)
        w.close()
        c.close()
    return out


SCENARIOS = ["truncate", "sparse-mem", "unadvised-huge", "advised-empty", "advise-flip",
             "tiny-regions", "stats-huge"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="*", default=SCENARIOS)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rlimit-as-mb", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    controls = {k: int(v) for k, v in (s.split("=") for s in a.set)}
    for s in a.scenarios:
        r = run(s, a.seconds, controls, a.rlimit_as_mb * 2**20 or None)
        print(json.dumps(r) if a.json else r, flush=True)


if __name__ == "__main__":
    main()
