"""Trust boundaries (docs/security.md): peers' credentials, read-only stable pages,
a non-dumpable coordinator, bounds on what the coordinator reads, lying state
bytes, domains, and the zero-pages-only mode.

Cross-uid cases run a child that starts as root (these tests need root), imports
everything, then drops to uid/gid 65534 before it creates its regions, so its
objects belong to that uid.  The harness is tests/integration/hostile.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest

from shmdedup import _native
from shmdedup.tools.embedded import Coordinator
from shmdedup.coordinator.security import TMPFS_MAGIC, _fs_type
from tests.helpers import (  # noqa: F401
    REPO_ROOT,
    child_env,
    no_shm_leftovers,
    reaper,
    run_python,
    wait_for,
)
from tests.integration.hostile import PAGE, Domain, RawPeer, memfd, register_raw, rewrite, spawn_worker

NOBODY = 65534
NPAGES = 32
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")

# Everything a child needs is imported before it drops root: the interpreter
# lives under /root (0700 here), so later imports would fail.
PRELUDE = """
import ctypes, errno, hashlib, json, logging, mmap, os, sys, time
import numpy as np
import numpy.random
import shmdedup
from shmdedup.worker import agent
from shmdedup.tools import cli
from shmdedup.tools import client as control
from shmdedup.coordinator import server as coordinator
from shmdedup.coordinator import security
from shmdedup.tools.client import Client
from shmdedup.errors import ControlError
libc = ctypes.CDLL(None, use_errno=True)

def drop(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)

def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

def links(pid="self"):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out

def attempt(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
"""

CROSS_UID_WORKER = PRELUDE + """
SOCKET, UID, GID, MODE = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
warnings = []
class H(logging.Handler):
    def emit(self, r): warnings.append(r.getMessage())
logging.getLogger("shmdedup.agent").addHandler(H(logging.WARNING))
drop(UID, GID)
agent.set_socket(SOCKET)
P = shmdedup.worker.region.PAGE_SIZE
N = 16
region = shmdedup.Region(N * P)  # created after the drop: its objects are UID's
arr = region.ndarray(np.uint8)
half = np.random.default_rng(4).integers(0, 256, (N // 2, P), dtype=np.uint8)
arr[:] = np.concatenate([half, half]).reshape(-1)
sha = hashlib.sha256(memoryview(region)).hexdigest()
region.advise(shmdedup.MERGEABLE)
out = {"uid": os.getuid(), "pid": os.getpid()}
if MODE == "rejected":
    out["warned"] = until(lambda: any("refused us" in w and "not allowed" in w for w in warnings))
    out["warnings"] = warnings
    out["merged"] = region.merged_pages()
    # A client is told why at once (not allowed: no retry), not "reset by peer".
    from shmdedup.errors import PeerRejectedError
    try:
        Client(SOCKET).close()
        out["client"] = "admitted"
    except PeerRejectedError as e:
        out["client"] = str(e)
else:
    out["merged"] = until(lambda: region.merged_pages() == N) and region.merged_pages()
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rc = libc.mprotect(region.address, P, mmap.PROT_READ | mmap.PROT_WRITE)
    out["mprotect"] = [rc, ctypes.get_errno()]
    stable = [fd for fd, link in links().items() if "shmdedup-stable" in link]
    out["stable_fds"] = len(stable)
    fd = stable[0]
    out["mmap_write"] = attempt(lambda: mmap.mmap(fd, P, mmap.MAP_SHARED,
                                                  mmap.PROT_READ | mmap.PROT_WRITE))
    out["reopen_rdwr"] = attempt(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR)))
    # copy-on-write still works, and the bytes are the worker's
    arr[0] ^= 1
    arr[0] ^= 1
    out["sha_ok"] = hashlib.sha256(memoryview(region)).hexdigest() == sha
    with Client(SOCKET) as c:
        out["stats_pids"] = [w["pid"] for w in c.stats()["workers"]]
        try:
            c.set("run", 0)
            out["set"] = "allowed"
        except ControlError as e:
            out["set"] = str(e)
del arr
region.close()
print(json.dumps(out))
"""


def run_as(uid: int, gid: int, code: str, *args: str) -> dict:
    r = run_python(code, args=tuple(str(a) for a in args)).check()
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def shared_domain(request: pytest.FixtureRequest, no_shm_leftovers: None) -> Iterator[Domain]:
    """A domain other uids can reach: 0711 directory, 0666 socket."""
    d = Domain(dir_mode=0o711, socket_mode=0o666, **getattr(request, "param", {}))
    yield d
    d.close()


# ---- peer credentials ------------------------------------------------------------

@needs_root
def test_other_uid_rejected_by_default(shared_domain: Domain) -> None:
    honest, sha = spawn_worker(shared_domain.path, NPAGES, 1)
    shared_domain.wait_merging(honest.pid, NPAGES)
    out = run_as(NOBODY, NOBODY, CROSS_UID_WORKER, shared_domain.path, NOBODY, NOBODY, "rejected")
    assert out["uid"] == NOBODY
    assert out["warned"], out["warnings"]  # the agent said why it stays unmerged
    assert out["merged"] == 0
    assert "refused the connection: uid 65534 is not allowed" in out["client"], out["client"]
    shared_domain.wait_logged(f"uid {NOBODY} gid {NOBODY} is not allowed")
    assert honest.call("result = digest()") == sha
    assert shared_domain.worker_stats(honest.pid)["ksm_merging_pages"] == NPAGES


@needs_root
@pytest.mark.parametrize("shared_domain, uid, gid", [
    ({"allow_uids": {NOBODY}}, NOBODY, NOBODY),
    ({"allow_gids": {NOBODY}}, NOBODY - 1, NOBODY),
], indirect=["shared_domain"])
def test_allowed_uid_merges_through_read_only_stable_pages(shared_domain: Domain, uid: int, gid: int) -> None:
    honest, sha = spawn_worker(shared_domain.path, NPAGES, 1)
    out = run_as(uid, gid, CROSS_UID_WORKER, shared_domain.path, uid, gid, "allowed")
    assert out["merged"] == 16
    # invariant 5: a merged page cannot be made writable, nor the stable object
    # mapped writable or reopened writable through /proc (0600, another owner)
    assert out["mprotect"] == [-1, errno.EACCES]
    assert out["stable_fds"] == 1
    assert out["mmap_write"] == errno.EACCES
    assert out["reopen_rdwr"] == errno.EACCES
    assert out["sha_ok"]
    # another uid sees only its own workers and cannot set controls
    assert out["stats_pids"] == [out["pid"]]
    assert f"uid {uid} may not set controls" in out["set"]
    assert shared_domain.stats()["run"] == 1
    shared_domain.wait_merging(honest.pid, NPAGES)
    assert honest.call("result = digest()") == sha


@needs_root
def test_cli_allow_uid_and_socket_mode(no_shm_leftovers: None) -> None:
    """The same through ``Coordinator(process=True)``, i.e. ``shmdedup coordinator
    --allow-uid --socket-mode``."""
    d = tempfile.mkdtemp(prefix="shmdedup-trust-")
    os.chmod(d, 0o711)
    path = os.path.join(d, "c.sock")
    try:
        with Coordinator(path, process=True, export_env=False, allow_uids=[NOBODY],
                         socket_mode=0o666, sleep_millisecs=2) as coord:
            assert os.stat(path).st_mode & 0o777 == 0o666
            out = run_as(NOBODY, NOBODY, CROSS_UID_WORKER, path, NOBODY, NOBODY, "allowed")
            assert out["merged"] == 16 and out["reopen_rdwr"] == errno.EACCES
            assert coord.stats()["run"] == 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_socket_is_private_by_default(no_shm_leftovers: None) -> None:
    d = Domain()
    try:
        assert os.stat(d.path).st_mode & 0o777 == 0o600
    finally:
        d.close()


# ---- a non-dumpable coordinator ------------------------------------------------

COORDINATOR_AS = PRELUDE + """
uid, path = int(sys.argv[1]), sys.argv[2]
drop(uid, uid)
# A process started as this user is dumpable; the drop from root cleared it.
security.set_dumpable(True)
sys.exit(cli.main(["coordinator", "--socket", path, *sys.argv[3:]]))
"""

ATTACKER = PRELUDE + """
uid, pid = int(sys.argv[1]), int(sys.argv[2])
drop(uid, uid)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local, remote = iovec(ctypes.addressof(buf), 8), iovec(0x10000, 8)
libc.process_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
rc = libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
out = {"vm_writev": ctypes.get_errno() if rc < 0 else 0}
out["list_fds"] = attempt(lambda: os.listdir(f"/proc/{pid}/fd"))
if out["list_fds"] == 0:
    stable = [fd for fd, link in links(pid).items() if "shmdedup-stable" in link]
    out["open_stable_rdwr"] = attempt(
        lambda: os.close(os.open(f"/proc/{pid}/fd/{stable[0]}", os.O_RDWR)))
print(json.dumps(out))
"""


@needs_root
@pytest.mark.parametrize("dumpable", [False, True])
def test_coordinator_process_is_not_dumpable(dumpable: bool, tmp_path, no_shm_leftovers: None) -> None:
    """A same-uid, unprivileged process can neither write the coordinator's memory
    nor open its writable stable segment through /proc, unless --dumpable."""
    d = tempfile.mkdtemp(prefix="shmdedup-trust-")
    os.chown(d, NOBODY, NOBODY)
    path = os.path.join(d, "c.sock")
    err = tmp_path / "stderr"
    cmd = [sys.executable, "-c", textwrap.dedent(COORDINATOR_AS), str(NOBODY), path]
    cmd += ["--dumpable"] if dumpable else []
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, stderr=f, env=child_env(), cwd=str(REPO_ROOT))
    try:
        wait_for(lambda: "listening on" in err.read_text() or proc.poll() is not None,
                 30, what="the coordinator to listen")
        assert proc.poll() is None, err.read_text()
        out = run_as(NOBODY, NOBODY, ATTACKER, NOBODY, proc.pid)
        if dumpable:  # the attack this prevents: same uid, plain permissions
            assert out["vm_writev"] == errno.EFAULT  # allowed; only the address was bad
            assert out["list_fds"] == 0 and out["open_stable_rdwr"] == 0
        else:
            assert out == {"vm_writev": errno.EPERM, "list_fds": errno.EACCES}
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode == 0, err.read_text()


def test_embedded_process_coordinator_asks_for_non_dumpable(no_shm_leftovers: None) -> None:
    with Coordinator(process=True, export_env=False) as c:
        cmdline = open(f"/proc/{c.pid}/cmdline", "rb").read().split(b"\0")
        assert b"coordinator" in cmdline and b"--dumpable" not in cmdline
        assert c.stats()["coordinator_pid"] == c.pid
    with Coordinator(process=True, export_env=False, dumpable=True) as c:
        assert b"--dumpable" in open(f"/proc/{c.pid}/cmdline", "rb").read().split(b"\0")


# ---- bounds: what the coordinator reads, and how ------------------------------------

@pytest.fixture
def domain(no_shm_leftovers: None) -> Iterator[Domain]:
    d = Domain()
    yield d
    d.close()


def _wronly() -> int:
    m = memfd(4 * PAGE)
    fd = os.open(f"/proc/self/fd/{m}", os.O_WRONLY | os.O_CLOEXEC)
    os.close(m)
    return fd


def _opath() -> int:
    m = memfd(4 * PAGE)
    fd = os.open(f"/proc/self/fd/{m}", os.O_PATH | os.O_CLOEXEC)
    os.close(m)
    return fd


def _pipe() -> int:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    return r


def _disk_file() -> int:
    fd, name = tempfile.mkstemp(prefix="shmdedup-trust-")
    os.unlink(name)
    os.ftruncate(fd, 4 * PAGE)
    if _fs_type(fd) == TMPFS_MAGIC:
        os.close(fd)
        pytest.skip("the temporary directory is on tmpfs here")
    return fd


@pytest.mark.parametrize("make, reason", [
    (lambda: memfd(PAGE), "backing object holds 4096 bytes, 16384 needed"),
    (lambda: memfd(0), "backing object holds 0 bytes"),
    (_pipe, "backing object is not a shared memory object"),
    (lambda: os.open("/", os.O_RDONLY | os.O_CLOEXEC), "backing object is not a shared memory object"),
    (_wronly, "backing object descriptor is not open for reading"),
    (_opath, "backing object descriptor is not open for reading"),
    (_disk_file, "backing object is not on tmpfs"),
], ids=["short", "empty", "pipe", "directory", "write-only", "O_PATH", "disk-file"])
def test_register_refuses_objects_it_must_not_read(domain: Domain, make, reason: str) -> None:
    """npages claims 4 pages: the coordinator reads only what it has vetted."""
    if PAGE != 4096 and "4096" in reason:
        pytest.skip("sizes written for 4 KiB pages")
    backing, meta = make(), memfd(PAGE)
    peer = RawPeer(domain.path)
    peer.hello()
    peer.send({"t": "register", "rid": 1, "npages": 4}, [backing, meta])
    assert peer.wait_closed()
    domain.wait_logged(reason)
    peer.close()
    os.close(backing), os.close(meta)


def test_worker_shrinking_its_objects_cannot_crash_the_coordinator(domain: Domain) -> None:
    """The meta object is the worker's: once it was mapped by the coordinator,
    truncating it killed the coordinator with SIGBUS.  Now it is only pread."""
    honest, sha = spawn_worker(domain.path, NPAGES, 1)
    peer = RawPeer(domain.path)
    peer.hello()
    page = os.urandom(PAGE)
    backing, meta = register_raw(peer, 1, page * 8)
    req = peer.recv(timeout=30)  # scanned and found mergeable
    assert req is not None and req["t"] == "merge"
    os.ftruncate(meta, 0)
    os.ftruncate(backing, 0)
    # Answered (refused), as a worker must: a wait covers the merges its scans
    # asked for, and an unanswered one would hold it until the request timeout.
    npages = int(np.frombuffer(req["items"], "<i8").reshape(-1, 4)[:, 2].sum())
    assert peer.send({"t": "merged", "req": req["req"], "result": bytes(npages)})
    domain.wait_full_scans(2)
    assert domain.alive()
    domain.wait_merging(honest.pid, NPAGES)
    rewrite(honest, 5)
    wait_for(lambda: honest.call("result = region.merged_pages()") == NPAGES, 30, what="merging")
    peer.close()
    os.close(backing), os.close(meta)


def test_coordinator_maps_no_worker_object(domain: Domain) -> None:
    """Invariant 4 and "never writes a worker's memory": the coordinator (this
    process) holds the workers' objects as fds only, never as mappings."""
    ws = [spawn_worker(domain.path, NPAGES, 1) for _ in range(2)]
    for w, _ in ws:
        domain.wait_merging(w.pid, NPAGES)
    with open("/proc/self/maps") as f:
        maps = f.read()
    fds = os.listdir("/proc/self/fd")
    links = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")]
    for w, _ in ws:
        mine = [link for link in links if f"shmdedup-region-{w.pid}-" in link]
        assert mine, "the coordinator holds no fd of the worker's backing"
        assert f"-{w.pid}-" not in maps, [line for line in maps.splitlines() if f"-{w.pid}-" in line]
    for w, _ in ws:
        w.close()


# ---- lying state bytes ----------------------------------------------------------------

LIAR = """
import mmap
region2 = shmdedup.Region(3 * NPAGES * P)
a2 = region2.ndarray(np.uint8).reshape(3, -1)
a2[0] = content(NPAGES, 1)           # shared with the honest workers
a2[1] = content(NPAGES, 3)           # shared with itself
a2[2] = np.random.default_rng(77).integers(0, 256, NPAGES * P, dtype=np.uint8)  # unique
region2.advise(shmdedup.MERGEABLE)
"""


def test_lying_state_bytes_only_hurt_the_liar(domain: Domain) -> None:
    honest = [spawn_worker(domain.path, NPAGES, 1) for _ in range(2)]
    liar, _ = spawn_worker(domain.path, NPAGES, 9)
    liar.call(LIAR)
    for w, _ in honest:
        domain.wait_merging(w.pid, NPAGES)
    domain.wait_merging(liar.pid, 3 * NPAGES)  # its own region + 2/3 of region2
    before = {w.pid: domain.worker_stats(w.pid) for w, _ in honest}
    # The liar writes its own state bytes: PRIVATE over merged pages (so the
    # coordinator drops its sharers), MERGED over pages never merged.
    liar.call(f"""
        meta = mmap.mmap(region2.meta_fd, P, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        meta[0:2 * NPAGES] = bytes([{_native.PRIVATE}]) * (2 * NPAGES)
        meta[2 * NPAGES:3 * NPAGES] = bytes([{_native.MERGED}]) * NPAGES
    """)
    scans = domain.wait_full_scans(3)
    assert domain.alive()
    for w, sha in honest:
        assert w.call("result = digest()") == sha
        after = domain.worker_stats(w.pid)
        assert {k: after[k] for k in before[w.pid]} == before[w.pid]
        assert w.call("result = region.merged_pages()") == NPAGES
    # the liar's own accounting believed it
    assert domain.worker_stats(liar.pid)["ksm_merging_pages"] == NPAGES  # only its honest region
    stats = domain.stats()
    assert stats["full_scans"] >= scans and stats["last_error"] == ""
    rewrite(honest[0][0], 12)
    wait_for(lambda: honest[0][0].call("result = region.merged_pages()") == NPAGES, 30,
             what="the honest worker to merge again")
    liar.proc.kill()  # its mappings disagree with its state bytes: don't let it tidy up
    liar.close()


def test_trust_arguments_are_checked() -> None:
    from shmdedup.errors import ArgumentError
    for kw in ({"allow_uids": [-1]}, {"allow_uids": [True]}, {"allow_gids": ["0"]},
               {"socket_mode": 0o1777}, {"socket_mode": "666"}):
        with pytest.raises(ArgumentError):
            Coordinator(**kw)
    for args, text in ((["--allow-uid", "root"], "expected a numeric id"),
                       (["--allow-gid", "-3"], "id out of range"),
                       (["--socket-mode", "9"], "expected an octal mode")):
        r = run_python("import sys; from shmdedup.tools import cli; sys.exit(cli.main(sys.argv[1:]))",
                       args=("coordinator", "--socket", "/nonexistent/x.sock", *args))
        assert r.returncode == 2 and text in r.stderr, r.stderr
