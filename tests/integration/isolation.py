"""Harness for the namespace and cgroup tests (docs/deploy.md): coordinators and
workers started in namespaces of their own with util-linux ``unshare``, or in a
memory cgroup (``MemoryCgroup``), talking over one socket.

* ``Coordinator``: ``python -m shmdedup coordinator --socket PATH`` under a
  command prefix (``unshare ...``, a cgroup launcher), statistics read from
  this process with ``Client``.
* ``NsWorker``: a worker process under a command prefix, driven by JSON lines
  on stdin/stdout (:data:`WORKER`).  It holds one region of ``npages`` pages
  drawn from ``seed`` (workers with the same seed hold the same pages), and
  can first drop to another uid and enter a user namespace of its own (what a
  rootless container does), having imported everything as root: the
  interpreter lives under a 0700 directory here.
* ``host_pid``: the pid, in this process's namespace, of the interpreter a
  prefix started (``unshare --fork`` puts it one level down), so that memory is
  checked from outside: st_blocks of ``/proc/<pid>/fd/<backing>``.

Every process is reaped at ``close()``; ``unshare --kill-child`` takes the
namespace's processes with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import cache
from typing import Any

from shmdedup.tools.client import Client
from shmdedup.errors import CoordinatorUnavailableError
from tests import helpers
from tests.helpers import DEFAULT_TIMEOUT, child_env, wait_for

UNSHARE = shutil.which("unshare")
# Inside a new mount namespace the process gets a /dev/shm of its own, as in a
# container: its shm objects are invisible to everyone else.
PRIVATE_SHM = ["sh", "-c", 'mount -t tmpfs -o size=512m,mode=1777 shm /dev/shm && exec "$0" "$@"']
PID_NS = ["--pid", "--fork", "--kill-child", "--mount-proc"]
USER_NS = ["--user", "--map-root-user"]
# unshare flags (and whether /dev/shm is made private) per case
NAMESPACES: dict[str, tuple[list[str], bool]] = {
    "pid": (PID_NS, False),
    "mount": (["--mount"], True),
    "ipc": (["--ipc"], False),
    "user": (USER_NS, False),
    "all": (USER_NS + PID_NS + ["--ipc", "--mount"], True),
}


@cache
def unshare_problem(flags: tuple[str, ...]) -> str | None:
    """Why ``unshare flags`` cannot run here (None: it can)."""
    if UNSHARE is None:
        return "util-linux unshare is not installed"
    try:
        r = subprocess.run([UNSHARE, *flags, "--", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare {' '.join(flags)}: {e}"
    return None if r.returncode == 0 else f"unshare {' '.join(flags)} not permitted: {r.stderr.strip()}"


def ns_prefix(name: str) -> list[str]:
    flags, private_shm = NAMESPACES[name]
    return [UNSHARE or "unshare", *flags, "--", *(PRIVATE_SHM if private_shm else [])]


def shared_socket_dir() -> str:
    """A socket directory every uid can traverse (the socket's mode decides)."""
    d = tempfile.mkdtemp(prefix="sd-ns-")
    os.chmod(d, 0o711)
    return d


def host_pid(pid: int) -> int:
    """The Python interpreter at or below pid (``unshare --fork`` forks it)."""
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().startswith("python"):
                    return p
            children: list[int] = []
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    children += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        todo += children
    raise AssertionError(f"no python process at or below pid {pid}")


def ns_pids(pid: int) -> list[int]:
    """NSpid of a process: its pid in each pid namespace, outermost first."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


def _spawn(argv: list[str], **kw: Any) -> tuple[subprocess.Popen, Any]:
    log = tempfile.TemporaryFile(prefix="shmdedup-ns-")  # noqa: SIM115 (closed by the owner)
    proc = subprocess.Popen(argv, stdout=kw.pop("stdout", log), stderr=log, env=child_env(),
                            cwd=str(helpers.REPO_ROOT), **kw)
    helpers._spawned_pids.add(proc.pid)
    return proc, log


def _read_log(log: Any) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def _reap(proc: subprocess.Popen, timeout: float = 30) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Coordinator:
    """``shmdedup coordinator`` under *prefix* (an unshare or cgroup launcher)."""

    def __init__(self, path: str, prefix: list[str] | tuple[str, ...] = (),
                 args: list[str] | tuple[str, ...] = (), wait: bool = True,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.path = path
        self.proc, self._log = _spawn([*prefix, sys.executable, "-m", "shmdedup", "coordinator",
                                       "--socket", path, "--set", "sleep_millisecs=0",
                                       "--set", "pages_to_scan=2000", *args],
                                      stdin=subprocess.DEVNULL, pass_fds=pass_fds)
        self._client: Client | None = None
        if wait:
            wait_for(self._answers, DEFAULT_TIMEOUT, f"the coordinator at {path} to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"coordinator exited with {self.proc.returncode}: {self.log()}")
        try:
            Client(self.path, timeout=2).close()
            return True
        except CoordinatorUnavailableError:
            return False

    @property
    def host_pid(self) -> int:
        return host_pid(self.proc.pid)

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.path, timeout=DEFAULT_TIMEOUT)
        return self._client

    def stats(self) -> dict[str, Any]:
        return self.client().stats()

    def wait_stats(self, pred: Any, what: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def ok() -> bool:
            out.clear()
            out.update(self.stats())
            return bool(pred(out))
        try:
            wait_for(ok, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; last stats: {out}") from None
        return out

    def log(self) -> str:
        return _read_log(self._log)

    def kill(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc.poll() is None:
            self.proc.kill()
        _reap(self.proc)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc.poll() is None:
            try:   # an orderly stop of the coordinator itself, not of unshare
                os.kill(host_pid(self.proc.pid), signal.SIGTERM)
            except (AssertionError, ProcessLookupError):
                self.proc.terminate()
        _reap(self.proc)
        self._log.close()


# The worker: one region, commands as JSON lines.  Everything is imported
# before a uid change (the interpreter's directory is 0700 here).
WORKER = r"""
import ctypes, hashlib, json, os, sys
import numpy as np
import numpy.random  # noqa: F401
import shmdedup
from shmdedup.worker import agent  # noqa: F401
from shmdedup.tools.client import Client
from shmdedup.errors import ControlError
from shmdedup import protocol  # noqa: F401

path, seed, npages, opts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
if "uid" in opts:
    # Drop to uid/gid, then (userns) enter a user namespace of our own where
    # that uid is root: a rootless container's view of itself.
    os.setgroups([])
    os.setgid(opts["uid"])
    os.setuid(opts["uid"])
    if opts.get("userns"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 1, 0, 0, 0)   # PR_SET_DUMPABLE, cleared by setuid: /proc/self is ours again
        if libc.unshare(0x10000000) != 0:          # CLONE_NEWUSER
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {opts['uid']} 1"),
                           ("gid_map", f"0 {opts['uid']} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)

def reply(**kw):
    print(json.dumps(kw), flush=True)

def digest():
    with memoryview(region) as m:
        return hashlib.sha256(m).hexdigest()

shmdedup.set_socket(path)
P = shmdedup.PAGE_SIZE
region = shmdedup.Region(npages * P)
a = region.ndarray(np.uint8)
a[:] = np.random.default_rng(seed).integers(0, 256, npages * P, dtype=np.uint8)
if opts.get("advise", True):
    region.advise(shmdedup.MERGEABLE)
reply(pid=os.getpid(), uid=os.getuid(), fd=region.backing_fd, digest=digest())
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "status":
        reply(merged=region.merged_pages(), digest=digest(), allocated=region.allocated_bytes())
    elif op == "write":                          # one byte in each page: copy-on-write
        for p in cmd["pages"]:
            a[p * P] ^= 0xFF
        reply(digest=digest())
    elif op == "advise":
        region.advise(shmdedup.MERGEABLE)
        reply(ok=True)
    elif op == "disconnect":                     # alive, but away from this coordinator
        shmdedup.set_socket(path + ".elsewhere")
        reply(ok=True)
    elif op == "set":
        try:
            with Client(path) as c:
                c.set(cmd["name"], cmd["value"])
            reply(set="allowed")
        except ControlError as e:
            reply(set=str(e))
    elif op == "stats":                          # the worker lines this uid is shown
        with Client(path) as c:
            got = c.stats()
        reply(workers=[w["pid"] for w in got["workers"]], uids=[u["uid"] for u in got["uids"]])
    elif op == "exit":
        break
del a
region.close()
"""


class NsWorker:
    """A worker process under *prefix*; see :data:`WORKER`."""

    def __init__(self, path: str, prefix: list[str] | tuple[str, ...] = (), seed: int = 1, npages: int = 64,
                 **opts: Any) -> None:
        self.npages = npages
        self.proc, self._log = _spawn([*prefix, sys.executable, "-c", WORKER, path, str(seed),
                                       str(npages), json.dumps(opts)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.pid_inside: int = hello["pid"]
        self.uid_inside: int = hello["uid"]
        self.fd: int = hello["fd"]
        self.digest: str = hello["digest"]
        self.pid = host_pid(self.proc.pid)   # in our pid namespace

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited ({_reap(self.proc)}): {self.log()}")
        return json.loads(line)

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def status(self) -> dict[str, Any]:
        return self.ask("status")

    def blocks(self) -> int:
        """Pages its backing object holds, seen from outside (st_blocks)."""
        return os.stat(f"/proc/{self.pid}/fd/{self.fd}").st_blocks * 512 // os.sysconf("SC_PAGE_SIZE")

    def log(self) -> str:
        return _read_log(self._log)

    def exit(self) -> int:
        """Close the region and exit cleanly; the exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.proc.stdin.close()
        code = _reap(self.proc)
        assert code == 0, f"worker exited {code}: {self.log()}"
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()   # EOF: the worker closes its region and exits
            except OSError:
                pass
            _reap(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


# ---- memory cgroups ----------------------------------------------------------------

def _memory_cgroup_dir() -> tuple[str, int] | None:
    """This process's memory cgroup directory and the cgroup version (2 or 1)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            with open("/sys/fs/cgroup/cgroup.controllers") as f:
                if "memory" in f.read().split():
                    return "/sys/fs/cgroup" + path.rstrip("/"), 2
        if "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory"
            if os.path.isdir(base):
                return base + path.rstrip("/"), 1
    return None


class MemoryCgroup:
    """A child memory cgroup of ours (v2 or v1), removed at ``close()``.

    ``prefix`` starts a command in it (the launcher moves itself in before
    exec, so every page the program touches is charged here).  ``shmem()``
    and ``anon()`` read the cgroup's own memory.stat (v1: this cgroup only,
    not its children), ``current()`` memory.current (v1 usage_in_bytes);
    ``set_limit()`` writes memory.max (v1 limit_in_bytes).
    """

    _count = 0

    def __init__(self, name: str) -> None:
        found = _memory_cgroup_dir()
        if found is None:
            raise OSError("no memory cgroup controller")
        parent, self.version = found
        if self.version == 2:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                if "memory" not in f.read().split():
                    with open(os.path.join(parent, "cgroup.subtree_control"), "w") as w:
                        w.write("+memory")   # EBUSY if the parent holds processes
        MemoryCgroup._count += 1
        self.path = os.path.join(parent, f"shmdedup-test-{os.getpid()}-{MemoryCgroup._count}-{name}")
        os.mkdir(self.path)
        self.prefix = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.path, "cgroup.procs")]

    def stat(self) -> dict[str, int]:
        with open(os.path.join(self.path, "memory.stat")) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}

    def shmem(self) -> int:
        return self.stat()["shmem"]

    def anon(self) -> int:
        return self.stat()["anon" if self.version == 2 else "rss"]

    def current(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        with open(os.path.join(self.path, name)) as f:
            return int(f.read())

    def set_limit(self, nbytes: int) -> None:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(nbytes))

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        with open(os.path.join(self.path, name)) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}.get("oom_kill", 0)

    def procs(self) -> list[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def close(self) -> None:
        """Remove it once its processes are gone (their charges move up)."""
        wait_for(lambda: not self.procs(), 30, f"{self.path} to have no process left")
        os.rmdir(self.path)


def memory_cgroup_problem() -> str | None:
    """Why no child memory cgroup can be made here (None: one can)."""
    try:
        MemoryCgroup("probe").close()
    except OSError as e:
        return f"cannot create a memory cgroup: {e}"
    return None
