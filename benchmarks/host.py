"""What the benchmarks read from the host: /proc (memory, CPU, Pss, ksm_stat),
the other processes' CPU, and Linux KSM's sysfs (``KsmSysfs``: every knob it
sets is put back, in a finally block, at exit and on SIGTERM/SIGHUP).

Shared by ``vs_ksm.py`` and ``vs_ksm_scale.py``; not a test, not part of the package.
"""

from __future__ import annotations

import atexit
import glob
import os
import sys
import time
from typing import Any

KSM_DIR = "/sys/kernel/mm/ksm"


def say(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def cpu_ns(pid: int) -> int:
    """CPU time of a process, all threads (schedstat: ns); stat ticks as fallback."""
    total, seen = 0, False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
                seen = True
        except (OSError, ValueError, IndexError):
            pass
    if seen:
        return total
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0


def cpu_by_pid() -> dict[int, tuple[str, int, int]]:
    """Every process's (comm, parent pid, utime + stime in ticks), from /proc/<pid>/stat."""
    out = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                text = f.read()
            comm = text[text.find("(") + 1:text.rfind(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[int(path.split("/")[2])] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def top_cpu(before: dict[int, tuple[str, int, int]], n: int = 4) -> list[tuple[str, int, float]]:
    """The n processes other than this script, its descendants and ksmd that
    used the most CPU since *before* (and are still alive): (command, pid, s)."""
    tick = os.sysconf("SC_CLK_TCK")
    now = cpu_by_pid()
    me = os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):
            if pid == me:
                return True
            if pid not in now or pid <= 1:
                return False
            pid = now[pid][1]
        return False

    used = []
    for pid, (comm, _, t) in now.items():
        dt = (t - before.get(pid, (comm, 0, 0))[2]) / tick
        if dt >= 0.05 and pid != 1 and comm != "ksmd" and not ours(pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
                if args and args[0]:
                    comm = " ".join(" ".join([os.path.basename(args[0])] + args[1:]).split())[:50]
            except OSError:
                pass
            used.append((comm, pid, dt))
    return sorted(used, key=lambda u: -u[2])[:n]


def system_busy_ns() -> int:
    """CPU time all CPUs spent not idle (/proc/stat), in ns."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    busy = sum(v[:8]) - idle          # user nice system idle iowait irq softirq steal
    return busy * 10**9 // os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, label: str, threshold: float = 0.25) -> float:
    """Wait (up to max_wait s) until the other processes on the machine use
    less than ``threshold`` CPUs over one second; returns the last busy level."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy_ns(), time.monotonic()
        time.sleep(1.0)
        busy = (system_busy_ns() - b0) / 1e9 / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            if busy >= threshold and max_wait > 0:
                say(f"  {label}: the machine is still busy ({busy:.2f} CPUs used by others); going on")
            return busy
        say(f"  {label}: waiting for a quiet machine ({busy:.2f} CPUs busy)")


def proc_kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    return proc_kib(pid, "smaps_rollup", "Pss")


def ksm_stat(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                try:
                    out[k] = int(v)
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def find_ksmd() -> int | None:
    for path in glob.glob("/proc/[0-9]*/comm"):
        try:
            with open(path) as f:
                if f.read().strip() == "ksmd":
                    return int(path.split("/")[2])
        except OSError:
            pass
    return None


def ksmd_nice() -> int:
    """ksmd's nice value (5 on Linux), so the coordinator can run at the same."""
    pid = find_ksmd()
    if pid is not None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[16])
        except (OSError, IndexError, ValueError):
            pass
    return 5


def dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


class KsmSysfs:
    """/sys/kernel/mm/ksm, with the controls this script changes saved first
    and restored (run=2, run=0, then the saved values) however it ends."""

    CHANGED = ("pages_to_scan", "sleep_millisecs")

    def __init__(self) -> None:
        self.saved: dict[str, int] | None = None

    @staticmethod
    def usable() -> str | None:
        """None, or why KSM cannot be used here."""
        if not os.path.isdir(KSM_DIR):
            return f"{KSM_DIR} does not exist (kernel without CONFIG_KSM)"
        if not os.access(os.path.join(KSM_DIR, "run"), os.W_OK):
            return f"{KSM_DIR}/run is not writable (needs root, and a writable /sys)"
        return None

    @staticmethod
    def read(name: str) -> int:
        with open(os.path.join(KSM_DIR, name)) as f:
            return int(f.read().split()[0])

    @staticmethod
    def has(name: str) -> bool:
        return os.path.exists(os.path.join(KSM_DIR, name))

    @staticmethod
    def write(name: str, value: int) -> None:
        with open(os.path.join(KSM_DIR, name), "w") as f:
            f.write(str(value))

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing",
                     "merge_across_nodes", "use_zero_pages", "smart_scan"):
            if self.has(name):
                out[name] = self.read(name)
        if self.has("advisor_mode"):
            with open(os.path.join(KSM_DIR, "advisor_mode")) as f:
                text = f.read()
            out["advisor_mode"] = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
        return out

    def save(self) -> None:
        if self.saved is not None:
            return
        run = self.read("run")
        if run != 0:
            raise SystemExit(
                f"KSM is already running ({KSM_DIR}/run = {run}): something else uses it, and its "
                f"pages would be counted as ours. Stop it first (echo 2 > {KSM_DIR}/run; "
                f"echo 0 > {KSM_DIR}/run) or use --only shmdedup.")
        self.saved = {name: self.read(name) for name in self.CHANGED}
        atexit.register(self.restore)

    def restore(self) -> None:
        """Unmerge, stop, put the saved controls back.  Idempotent."""
        if self.saved is None:
            return
        errors = []
        for name, value in (("run", 2), ("run", 0)) + tuple(self.saved.items()):
            try:
                if self.read(name) != value:
                    self.write(name, value)
            except OSError as e:
                errors.append(f"{name}={value}: {e}")
        try:
            if self.read("run") != 0:       # never leave ksmd running
                self.write("run", 0)
        except OSError as e:
            errors.append(f"run=0: {e}")
        if errors:
            say("vs_ksm: WARNING: could not fully restore KSM: " + "; ".join(errors))


KSM = KsmSysfs()
