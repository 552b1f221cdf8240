"""Run this suite under ``pytest -n N`` without and with ``--shmdedup``; compare memory.

Memory is sampled from outside every 50 ms while each run lasts: the Pss of
every process of the run (pytest's controller, its xdist workers, the
coordinator), from /proc/<pid>/smaps_rollup.  Reported: its peak, its time
average and its course, each run's duration and the CPU time of its processes
(user + system, the last value sampled: on a machine shared with other jobs,
wall time varies from run to run much more than CPU time); ``--json`` adds Shmem from
/proc/meminfo (system-wide, less its value before the run; other processes
on the machine move it too, so it is only telling on a quiet machine).

    python examples/pytest_suite/measure.py [--workers 4] [--mib 256] [--json]
        [--set NAME=VALUE ...]   (coordinator controls for the --shmdedup run)

The suite's table is merged at write time (``shmdedup_array(..., rows=)``), so
the coordinator runs at its default pacing: a faster scan would only take CPU
from the workers.  Targets (issue 11): with ``--shmdedup`` the peak Pss at most
half of the run without, the wall time at most 1.1 times.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SUITE = Path(__file__).resolve().parent
REPO = SUITE.parent.parent


def tree(root: int) -> list[int]:
    """root and all its descendants (read from /proc/<pid>/task/*/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise KeyError("Shmem")


def entry_point_installed() -> bool:
    return any(ep.name == "shmdedup" for ep in importlib.metadata.entry_points(group="pytest11"))


def run_suite(workers: int, mib: int, shmdedup: bool, controls: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-n", str(workers), "-q", "-p", "no:cacheprovider"]
    if not entry_point_installed():  # a source tree: load the plugin by module name
        cmd += ["-p", "shmdedup.tools.pytest_plugin"]
    if shmdedup:
        cmd += ["--shmdedup"] + [f"--shmdedup-set={c}" for c in controls]
    env = dict(os.environ, TABLE_MIB=str(mib), OPENBLAS_NUM_THREADS="1")
    if (REPO / "shmdedup").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    base = shmem_kib()
    samples: list[tuple[float, int, int]] = []
    cpu: dict[int, float] = {}  # the last CPU time seen of every process of the run
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=SUITE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while proc.poll() is None:
            pids = tree(proc.pid)
            for p in pids:
                cpu[p] = max(cpu.get(p, 0.0), cpu_seconds(p))
            samples.append((time.monotonic() - t0, sum(pss_kib(p) for p in pids), shmem_kib() - base))
            time.sleep(0.05)
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    took = time.monotonic() - t0
    summary = [m.group(0) for m in re.finditer(r"^shmdedup: .*$", out, re.M)]
    passed = re.search(r"(\d+) passed", out)
    mean = (lambda i: sum(s[i] for s in samples) / max(len(samples), 1) / 1024)
    return {
        "shmdedup": shmdedup, "exit_status": proc.returncode, "seconds": round(took, 1),
        "cpu_seconds": round(sum(cpu.values()), 1),
        "passed": int(passed.group(1)) if passed else 0, "summary": summary,
        "peak_pss_mib": round(max((s[1] for s in samples), default=0) / 1024, 1),
        "mean_pss_mib": round(mean(1), 1),
        "peak_shmem_delta_mib": round(max((s[2] for s in samples), default=0) / 1024, 1),
        "mean_shmem_delta_mib": round(mean(2), 1),
        "output_tail": out.strip().splitlines()[-3:],
        # (seconds, Pss MiB, Shmem MiB), about one sample a second
        "series": [(round(t, 1), round(p / 1024), round(m / 1024))
                   for t, p, m in samples[::max(1, len(samples) // int(took + 1))]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256, help="the table's size (MiB per worker)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="coordinator control for the --shmdedup run (default: none, the default pacing)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    controls = args.set
    runs = [run_suite(args.workers, args.mib, on, controls) for on in (False, True)]
    if args.json:
        print(json.dumps({"workers": args.workers, "mib": args.mib, "runs": runs}))
    else:
        print(f"pytest -n {args.workers}, a {args.mib} MiB session table in every worker; Pss of all the "
              f"run's processes (MiB):")
        print(f"  {'':17}{'seconds':>8}{'CPU s':>8}{'peak':>8}{'mean':>8}   every 2 s")
        for r in runs:
            name = "with --shmdedup" if r["shmdedup"] else "without"
            timeline, next_t = [], 0.0
            for t, pss, _ in r["series"]:
                if t >= next_t:
                    timeline.append(f"{pss:>5}")
                    next_t += 2.0
            print(f"  {name:17}{r['seconds']:>8}{r['cpu_seconds']:>8}{r['peak_pss_mib']:>8.0f}{r['mean_pss_mib']:>8.0f}   "
                  + "".join(timeline))
        off, on = runs
        if off["peak_pss_mib"] and off["seconds"]:
            print(f"  with / without: peak {on['peak_pss_mib'] / off['peak_pss_mib']:.2f}x (target <= 0.5x), "
                  f"seconds {on['seconds'] / off['seconds']:.2f}x (target <= 1.1x), "
                  f"CPU {on['cpu_seconds'] / max(off['cpu_seconds'], 0.1):.2f}x")
        for r in runs:
            for line in r["summary"]:
                print(f"  {line}")
            if r["exit_status"] != 0:
                print(f"  run {'with' if r['shmdedup'] else 'without'} --shmdedup failed:", *r["output_tail"],
                      sep="\n    ")
    return 0 if all(r["exit_status"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
