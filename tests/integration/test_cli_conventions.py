"""The ``shmdedup`` command as a new user meets it: ``--version``, exit
statuses (0 success, 1 failure, 2 usage error, 3 no coordinator, 130
Ctrl-C: ``shmdedup --help``, docs/guide.md), usage errors found before
anything is done, help that lists the controls, what ``coordinator -v``
logs, signals and closed pipes.  Real processes throughout."""

from __future__ import annotations

import ctypes
import importlib.metadata
import platform
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import shmdedup
from shmdedup.controls import CONTROLS
from shmdedup.coordinator.activity import CONN_BURST, CONN_LINES_PER_SEC, SCAN_LINE_INTERVAL
from tests.helpers import REPO_ROOT, child_env
from tests.integration.conftest import counts, merged_counts, wait_for, wait_stats
from tests.integration.test_cli import cli, start_coordinator  # noqa: F401  (a fixture)

UID = os.getuid()
# tgkill and the epoll waits by architecture (asm/unistd*.h).
SYSCALLS = {"x86_64": (234, {"232", "281", "441"}), "aarch64": (131, {"22", "441"})}.get(platform.machine())


# -- version -----------------------------------------------------------------

def test_version_is_the_same_everywhere() -> None:
    r = cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"shmdedup {shmdedup.__version__}\n"
    exe = shutil.which("shmdedup")
    if exe is not None:  # the console script, when installed, runs the same main()
        r2 = subprocess.run([exe, "--version"], capture_output=True, text=True, env=child_env(),
                            cwd=str(REPO_ROOT), timeout=60)
        assert (r2.returncode, r2.stdout) == (0, r.stdout), r2.stderr
    try:
        assert importlib.metadata.version("shmdedup") == shmdedup.__version__
    except importlib.metadata.PackageNotFoundError:
        pass
    # One source: the build takes the version from shmdedup.__version__.
    tomllib = pytest.importorskip("tomllib")
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "shmdedup.__version__"}


# -- usage errors: 2, before anything is done ----------------------------------

S = "{sock}"   # replaced by a socket path in the test's own directory

USAGE_ERRORS = [
    ([], "the following arguments are required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["stats", "--socket", S, "--domain", "d"], "argument --domain: not allowed with argument --socket"),
    (["set", "--domain", "d", "--socket", S, "run=1"], "argument --socket: not allowed with argument --domain"),
    (["top", "--socket", S, "--domain", "d"], "not allowed with argument --socket"),
    (["coordinator", "--socket", S, "--domain", "d"], "not allowed with argument --socket"),
    (["stats", "--socket", ""], "argument --socket: expected a socket path"),
    (["stats", "--socket", "/" + "x" * 200], "longer than 107 bytes"),
    (["stats", "--domain", ""], "argument --domain: a domain name matches"),
    (["stats", "--domain", "../x"], "argument --domain: a domain name matches"),
    (["demo", "--workers", "0"], "argument --workers: expected an integer between 2 and 128 "
                                 "(merging needs two copies), got '0'"),
    (["demo", "--workers", "1"], "argument --workers: expected an integer between 2 and 128"),
    (["demo", "--workers", "x"], "argument --workers: expected an integer between 2 and 128"),
    (["demo", "--mib", "-1"], "argument --mib: expected an integer between 1 and 1048576, got '-1'"),
    (["demo", "--mib", "0.5"], "argument --mib: expected an integer between 1 and 1048576"),
    (["coordinator", "--socket", S, "--metrics-port", "70000"],
     "argument --metrics-port: expected a TCP port between 0 and 65535, got '70000'"),
    (["coordinator", "--socket", S, "--metrics-port", "-1"], "argument --metrics-port"),
    (["coordinator", "--socket", S, "--parent-pid", "0"], "argument --parent-pid: expected a process id"),
    (["coordinator", "--socket", S, "--set", "run=9"], "argument --set: run must be between 0 and 2, got 9"),
    (["coordinator", "--socket", S, "--set", "bogus=1"], "argument --set: unknown control 'bogus'"),
    (["set", "--socket", S, "pages_to_scan=0"], "pages_to_scan must be between 1 and 10000000, got 0"),
    (["set", "--socket", S, "run=x"], "run: value must be an integer between 0 and 2, got 'x'"),
    (["set", "--socket", S, "bogus=x"], "unknown control 'bogus'"),
    (["top", "--socket", S, "--interval", "0"], "argument --interval: must be between 0.05 and 3600"),
]


@pytest.mark.parametrize("args, message", USAGE_ERRORS)
def test_usage_errors_exit_2_at_once_and_do_nothing(socket_dir: str, args: list[str], message: str) -> None:
    """argparse's status, its usage line and one clear message: no traceback,
    no socket created, no wait (``demo --workers 0`` used to hang 120 s)."""
    path = os.path.join(socket_dir, "c.sock")
    t0 = time.monotonic()
    r = cli(*[a.replace(S, path) for a in args], timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("usage: shmdedup"), r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert not os.path.exists(path)
    assert time.monotonic() - t0 < 30


# -- runtime failures: 1; no coordinator: 3 ------------------------------------

def test_no_coordinator_exits_3_with_a_hint(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "nobody.sock")
    for args in (["stats", "--socket", path], ["stats", "--json", "--socket", path],
                 ["set", "--socket", path, "run=1"]):
        r = cli(*args)
        assert r.returncode == 3, (args, r.returncode, r.stderr)
        assert f"no coordinator at {path}" in r.stderr, r.stderr
        assert f"Start one with: shmdedup coordinator --socket {path}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    domain = f"nobody-{os.getpid()}"
    r = cli("stats", "--domain", domain)
    assert r.returncode == 3 and f"shmdedup coordinator --domain {domain}" in r.stderr, r.stderr


def test_runtime_failures_exit_1(start_coordinator, socket_dir: str) -> None:
    co = start_coordinator()
    r = cli("coordinator", "--socket", co.path)                      # socket in use
    assert r.returncode == 1 and f"a coordinator is already listening on {co.path}" in r.stderr, r.stderr
    missing = os.path.join(socket_dir, "missing", "c.sock")           # cannot bind
    r = cli("coordinator", "--socket", missing)
    assert r.returncode == 1 and f"{missing}: No such file or directory" in r.stderr, r.stderr
    assert "[Errno" not in r.stderr
    done = subprocess.Popen(["true"])
    done.wait()
    path = os.path.join(socket_dir, "orphan.sock")                   # --parent-pid of a dead process
    r = cli("coordinator", "--socket", path, "--parent-pid", str(done.pid))
    assert r.returncode == 1 and f"parent process {done.pid} is gone" in r.stderr, r.stderr
    assert not os.path.exists(path), "a coordinator that could not start left its socket"
    for r in (cli("coordinator", "--socket", co.path), cli("coordinator", "--socket", missing)):
        assert "Traceback" not in r.stderr
    assert cli("stats", "--socket", co.path).returncode == 0


def test_a_socket_we_may_not_open_is_named(monkeypatch, capsys, socket_dir: str) -> None:
    """EACCES from connect() (another user's socket directory; as root here,
    simulated in-process): status 1, and the message says which socket."""
    from shmdedup import protocol
    from shmdedup.tools import cli as cli_module

    def refuse(path: str, timeout: float | None = 5.0) -> None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(protocol, "connect", refuse)
    path = os.path.join(socket_dir, "theirs.sock")
    assert cli_module.main(["stats", "--socket", path]) == 1
    assert capsys.readouterr().err == f"shmdedup: {path}: Permission denied\n"


def test_metrics_port_in_use_exits_1_and_names_the_port(socket_dir: str) -> None:
    pytest.importorskip("prometheus_client")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        path = os.path.join(socket_dir, "c.sock")
        r = cli("coordinator", "--socket", path, "--metrics-port", str(port))
    finally:
        busy.close()
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"127.0.0.1:{port}" in r.stderr, r.stderr
    assert path not in r.stderr, "the metrics error names the socket instead of the port: " + r.stderr
    assert "Traceback" not in r.stderr and "[Errno" not in r.stderr, r.stderr
    assert not os.path.exists(path)


def test_demo_without_room_in_dev_shm_exits_1_before_starting() -> None:
    r = cli("demo", "--workers", "2", "--mib", "1048576", timeout=60)
    assert r.returncode == 1, r.stderr
    assert "MiB in /dev/shm" in r.stderr and "use a smaller --mib or fewer --workers" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_top_without_a_terminal_is_a_failure_not_a_usage_error() -> None:
    r = cli("top", "--socket", "/nonexistent/c.sock")
    assert r.returncode == 1 and "needs a terminal" in r.stderr, r.stderr


# -- help ----------------------------------------------------------------------

def test_help_of_every_command() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for name in ("coordinator", "stats", "set", "top", "demo"):
        assert name in r.stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert re.search(rf"^  {code}", r.stdout, re.M), r.stdout   # the exit status table
    for name in ("coordinator", "stats", "set", "top", "demo"):
        r = cli(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: shmdedup {name}"), r.stderr
        assert "exit status: 0 success, 1 failure, 2 usage error, 3 no coordinator answers,\n" \
               "130 Ctrl-C" in r.stdout, r.stdout
    r = cli("coordinator", "--help")
    assert re.search(r"-v, --verbose\s+log connections, disconnections, full scans", r.stdout), r.stdout
    # every argument of every command says what it is
    from shmdedup.tools.cli import build_parser
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"shmdedup {name} {action.option_strings or action.dest}: no help text"


def test_set_help_lists_every_control_with_its_default_and_range() -> None:
    r = cli("set", "--help")
    assert r.returncode == 0, r.stderr
    for name, (default, lo, hi) in CONTROLS.items():
        # and a line that says what it is
        assert re.search(rf"^  {name} = {default}  \(range {lo}\.\.{hi}\)\n      \w", r.stdout, re.M), \
            (name, r.stdout)


# -- what coordinator -v logs ----------------------------------------------------

def test_quiet_coordinator_logs_only_where_it_listens(start_coordinator) -> None:
    co = start_coordinator()
    assert cli("set", "--socket", co.path, "sleep_millisecs=5").returncode == 0
    assert cli("stats", "--socket", co.path).returncode == 0
    assert co.stop() == 0
    assert co.stderr.splitlines() == [f"shmdedup coordinator listening on {co.path}"]


def test_verbose_coordinator_logs_connections_scans_and_controls(monkeypatch, start_coordinator,
                                                                 spawn_workers) -> None:
    co = start_coordinator("-v", "--set", "pages_to_scan=10000", "--set", "sleep_millisecs=0")
    monkeypatch.setenv("SHMDEDUP_SOCKET", co.path)
    npages = 256
    workers = spawn_workers(2, npages, shared_seed=17)
    want = merged_counts(npages, 2)
    with co.client() as c:
        wait_stats(c, lambda s: counts(s) == want, 60, f"convergence to {want}")
    r = cli("set", "--socket", co.path, "sleep_millisecs=3", "max_page_sharing=300")
    assert r.returncode == 0, r.stderr
    scan_line = re.compile(r"full scans? [\d-]+.* took \d+\.\d{3} s: pages_shared (\d+), "
                           r"pages_sharing (\d+) \([+-]\d+\), pages_unshared \d+, pages_volatile \d+; "
                           r"pages_to_scan 10000$", re.M)
    wait_for(lambda: any(m.groups() == (str(want["pages_shared"]), str(want["pages_sharing"]))
                         for m in scan_line.finditer(co.stderr)), 60, "a full-scan line with the merges")
    err = co.stderr
    assert "controls set at start: pages_to_scan=10000, sleep_millisecs=0" in err
    for w in workers:
        assert f"pid {w.pid} uid {UID} connected as a worker" in err, err
    assert re.search(rf"pid \d+ uid {UID} connected as a client", err), err
    assert re.search(rf"control sleep_millisecs: 0 -> 3, set by pid \d+ uid {UID}$", err, re.M), err
    assert re.search(rf"control max_page_sharing: 256 -> 300, set by pid \d+ uid {UID}$", err, re.M), err
    for w in workers:
        assert w.close() == 0          # its bytes intact; then the process ends
        w.kill()
    wait_for(lambda: all(f"pid {w.pid} uid {UID} (worker) disconnected: connection closed by the peer"
                         in co.stderr for w in workers), 30, "the disconnections logged")
    assert co.stop() == 0
    assert co.stderr.rstrip().endswith("stopped by SIGTERM"), co.stderr
    assert "Traceback" not in co.stderr and "closing connection" not in co.stderr


def _scan_numbers(err: str) -> list[int]:
    return [int(n) for n in re.findall(r"full scan (\d+) took", err)]


def test_verbose_full_scan_lines_are_rate_limited(monkeypatch, start_coordinator, spawn_workers) -> None:
    """Hundreds of full scans a second (a tiny domain) make about one line a
    second at -v, a line covering every full scan since the previous one."""
    co = start_coordinator("-v", "--set", "pages_to_scan=10000", "--set", "sleep_millisecs=0")
    monkeypatch.setenv("SHMDEDUP_SOCKET", co.path)
    t0 = time.monotonic()
    spawn_workers(1, 16, shared_seed=3)
    with co.client() as c:
        n = wait_stats(c, lambda s: s["full_scans"] >= 300, 60, "300 full scans")["full_scans"]
    # The counters have not moved since the first line (one worker's pages
    # are unique); a twin makes them move, and the next line folds the scans.
    spawn_workers(1, 16, shared_seed=3)
    folded = re.compile(r"full scans \d+-(\d+) \((\d+) since the last line\)")
    wait_for(lambda: folded.search(co.stderr), 30, "a line for several full scans")
    elapsed = time.monotonic() - t0
    lines = [line for line in co.stderr.splitlines() if "full scan" in line]
    assert 1 <= len(lines) <= elapsed / SCAN_LINE_INTERVAL + 2, (elapsed, lines)
    assert n > 10 * len(lines), (n, lines)


def test_very_verbose_coordinator_logs_every_full_scan(monkeypatch, start_coordinator, spawn_workers) -> None:
    co = start_coordinator("-vv", "--set", "pages_to_scan=10000", "--set", "sleep_millisecs=1")
    monkeypatch.setenv("SHMDEDUP_SOCKET", co.path)
    spawn_workers(1, 16, shared_seed=3)
    with co.client() as c:
        n = wait_stats(c, lambda s: s["full_scans"] >= 30, 60, "30 full scans")["full_scans"]
    wait_for(lambda: set(range(1, n + 1)) <= set(_scan_numbers(co.stderr)), 30,
             f"a line for each of full scans 1-{n}")


def test_connection_lines_are_rate_limited(start_coordinator) -> None:
    """A peer connecting in a loop cannot flood the log: lines past the burst
    are counted, and the next line that passes says how many."""
    co = start_coordinator("-v")
    t0 = time.monotonic()
    for _ in range(3 * CONN_BURST):
        co.client().close()            # two lines each: connected, disconnected

    def conn_lines() -> list[str]:
        return [line for line in co.stderr.splitlines() if "as a client" in line or "(client)" in line]
    wait_for(lambda: len(conn_lines()) >= CONN_BURST, 30, "the first burst of lines")
    elapsed = time.monotonic() - t0
    assert len(conn_lines()) <= CONN_BURST + CONN_LINES_PER_SEC * (elapsed + 1) + 2, len(conn_lines())
    assert len(conn_lines()) < 6 * CONN_BURST

    def one_more() -> bool:
        co.client().close()
        return any("connection lines suppressed before this one" in line for line in conn_lines())
    wait_for(one_more, 30, "a line that reports the suppressed ones")


# -- signals and pipes -----------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_a_stop_signal_stops_the_coordinator_cleanly(start_coordinator, sig: signal.Signals) -> None:
    """Ctrl-C (SIGINT) in a terminal, SIGHUP when the terminal goes, SIGTERM
    from a service manager: exit 0, socket removed, no traceback."""
    co = start_coordinator("-v")
    co.proc.send_signal(sig)
    assert co.proc.wait(30) == 0, co.stderr
    assert not os.path.exists(co.path)
    assert "Traceback" not in co.stderr and f"stopped by {sig.name}" in co.stderr, co.stderr


def _main_thread_waits(pid: int) -> bool:
    """The process's main thread is asleep in an epoll wait: the
    coordinator's loop has nothing to do."""
    assert SYSCALLS is not None
    with open(f"/proc/{pid}/task/{pid}/syscall") as f:
        return f.read().split()[0] in SYSCALLS[1]


@pytest.mark.skipif(SYSCALLS is None, reason="syscall numbers known for x86-64 and arm64 only")
def test_a_stop_signal_taken_by_another_thread_still_stops_the_coordinator(start_coordinator) -> None:
    """A stop signal whose Python handler cannot wake the loop: here it is
    delivered to the metrics thread while the main thread sleeps in its
    selector with no timeout (the same as a signal that lands just before
    the loop enters the selector).  The loop must still wake and stop: the
    signal itself writes to the loop's wakeup pipe."""
    co = start_coordinator("-v", "--metrics-port", "0")
    pid = co.proc.pid
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the metrics server runs a thread"
    wait_for(lambda: _main_thread_waits(pid), 30, "the coordinator's loop asleep in its selector")
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYSCALLS[0], pid, others[0], int(signal.SIGTERM)) == 0, ctypes.get_errno()
    assert co.proc.wait(30) == 0, co.stderr
    assert not os.path.exists(co.path)
    assert "stopped by SIGTERM" in co.stderr and "Traceback" not in co.stderr, co.stderr


def test_ctrl_c_in_a_waiting_client_exits_130(socket_dir: str) -> None:
    """A coordinator that accepts but never answers: Ctrl-C gets the user out
    at once, with status 130 and no traceback."""
    path = os.path.join(socket_dir, "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(path)
    mute.listen(1)
    proc = subprocess.Popen([sys.executable, "-m", "shmdedup", "stats", "--socket", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=str(REPO_ROOT))
    try:
        mute.settimeout(60)
        conn, _ = mute.accept()       # it is connected and now waits for the welcome
        conn.recv(4096)               # its hello
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mute.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == "", err


def test_stats_into_a_closed_pipe_is_quiet(start_coordinator) -> None:
    """``shmdedup stats | head -0``: the reader is gone; no traceback."""
    co = start_coordinator()
    proc = subprocess.Popen([sys.executable, "-m", "shmdedup", "stats", "--socket", co.path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
                            cwd=str(REPO_ROOT))
    proc.stdout.close()               # before it has written anything (it is still starting)
    err = proc.stderr.read().decode()
    proc.wait(60)
    proc.stderr.close()
    assert proc.returncode == 1, err
    assert err == "", err
