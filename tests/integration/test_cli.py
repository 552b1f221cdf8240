"""The ``shmdedup`` command against a real coordinator process:
``python -m shmdedup coordinator|stats|set``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmdedup
from shmdedup.controls import default_max_mappings
from tests.helpers import REPO_ROOT, child_env
from tests.integration.conftest import (
    CONTROL_NAMES,
    STAT_NAMES,
    WORKER_STAT_NAMES,
    counts,
    merged_counts,
    wait_for,
    wait_stats,
)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m shmdedup ARGS`` to completion (killed and reaped on timeout)."""
    return subprocess.run([sys.executable, "-m", "shmdedup", *args], capture_output=True, text=True, check=False,
                          env=env or child_env(), cwd=str(REPO_ROOT), timeout=timeout)


class CliCoordinator:
    def __init__(self, proc: subprocess.Popen, path: str, stderr_path: str) -> None:
        self.proc, self.path, self.stderr_path = proc, path, stderr_path

    @property
    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()

    def client(self) -> shmdedup.Client:
        return shmdedup.Client(self.path)

    def controls(self) -> dict[str, int]:
        with self.client() as c:
            s = c.stats()
        return {k: s[k] for k in CONTROL_NAMES}

    def stop(self) -> int:
        """SIGTERM and reap; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_coordinator(socket_dir: str, tmp_path: Any) -> Iterator[Callable[..., CliCoordinator]]:
    """``start_coordinator(*extra_args)``: ``python -m shmdedup coordinator
    --socket P`` running and answering; stopped with SIGTERM at teardown,
    which must exit 0 and remove the socket."""
    started: list[CliCoordinator] = []

    def start(*extra: str) -> CliCoordinator:
        path = os.path.join(socket_dir, f"c{len(started)}.sock")
        err = str(tmp_path / f"coordinator{len(started)}.stderr")
        with open(err, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "shmdedup", "coordinator", "--socket", path, *extra],
                                    stdout=subprocess.DEVNULL, stderr=f, env=child_env(), cwd=str(REPO_ROOT))
        co = CliCoordinator(proc, path, err)
        started.append(co)

        def answers() -> bool:
            assert proc.poll() is None, f"coordinator exited {proc.returncode}: {co.stderr}"
            try:
                co.client().close()
                return True
            except shmdedup.CoordinatorUnavailableError:
                return False
        wait_for(answers, 30, f"the coordinator at {path} to answer")
        return co

    yield start
    for co in started:
        rc = co.stop()
        assert rc == 0, f"coordinator exited {rc} on SIGTERM: {co.stderr}"
        assert not os.path.exists(co.path), "the coordinator left its socket behind"


def test_stats_json_has_every_statistic_and_control(start_coordinator):
    co = start_coordinator()
    r = cli("stats", "--json", "--socket", co.path)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    missing = [k for k in STAT_NAMES + CONTROL_NAMES if k not in stats]
    assert not missing, f"stats --json lacks {missing}"
    for k in STAT_NAMES:
        if k != "last_error":
            assert isinstance(stats[k], int), (k, stats[k])
    assert stats["last_error"] == ""
    assert stats["workers"] == []
    assert stats["run"] == 1 and stats["pages_to_scan"] == 4096  # KSM-like defaults
    assert f"listening on {co.path}" in co.stderr


def test_stats_prints_name_value_lines(start_coordinator):
    co = start_coordinator()
    r = cli("stats", "--socket", co.path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(":" in line for line in lines), r.stdout
    plain = dict(line.split(":", 1) for line in lines)
    for k in STAT_NAMES + CONTROL_NAMES:
        assert k in plain, f"no {k}: line in\n{r.stdout}"
    for k in CONTROL_NAMES:
        assert int(plain[k]) == co.controls()[k]
    assert plain["last_error"] == ""


def test_set_changes_controls_visible_in_stats(start_coordinator):
    co = start_coordinator()
    r = cli("set", "--socket", co.path, "pages_to_scan=123")
    assert r.returncode == 0, r.stderr
    assert co.controls()["pages_to_scan"] == 123
    r = cli("stats", "--json", "--socket", co.path)
    assert json.loads(r.stdout)["pages_to_scan"] == 123
    r = cli("set", "--socket", co.path, "sleep_millisecs=7", "max_page_sharing=2", "use_zero_pages=1", "run=0")
    assert r.returncode == 0, r.stderr
    assert co.controls() == {"run": 0, "pages_to_scan": 123, "sleep_millisecs": 7,
                             "max_page_sharing": 2, "max_kernel_pages": 0, "use_zero_pages": 1,
                             "max_mappings": default_max_mappings()}


def test_set_finds_the_coordinator_through_the_environment(start_coordinator):
    co = start_coordinator()
    r = cli("set", "pages_to_scan=99", env=child_env({"SHMDEDUP_SOCKET": co.path}))
    assert r.returncode == 0, r.stderr
    assert co.controls()["pages_to_scan"] == 99


@pytest.mark.parametrize("assignments, message", [
    (["bogus=1"], "unknown control 'bogus'"),
    (["run=7"], "run must be between 0 and 2, got 7"),
    (["run=x"], "value must be an integer"),
    (["run=1.5"], "value must be an integer"),
    (["run"], "expected NAME=VALUE"),
    (["=1"], "expected NAME=VALUE"),
    (["pages_to_scan=0"], "pages_to_scan must be between 1 and"),
    (["max_page_sharing=1"], "max_page_sharing must be between 2 and"),
    (["sleep_millisecs=-1"], "sleep_millisecs must be between 0 and"),
    # All checked before any is applied: the good one is not applied either.
    (["pages_to_scan=555", "bogus=1"], "unknown control 'bogus'"),
    (["pages_to_scan=555", "run=3"], "run must be between 0 and 2, got 3"),
])
def test_bad_set_exits_nonzero_with_a_clear_message_and_changes_nothing(start_coordinator, assignments,
                                                                         message):
    co = start_coordinator()
    before = co.controls()
    r = cli("set", "--socket", co.path, *assignments)
    assert r.returncode == 2   # a usage error: checked before anything is sent
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    assert co.controls() == before
    assert co.proc.poll() is None


def test_coordinator_takes_initial_controls(start_coordinator):
    co = start_coordinator("--set", "pages_to_scan=321", "--set", "run=0", "--set", "sleep_millisecs=0")
    c = co.controls()
    assert (c["pages_to_scan"], c["run"], c["sleep_millisecs"]) == (321, 0, 0)


@pytest.mark.parametrize("bad, message", [("run=9", "run must be between 0 and 2, got 9"),
                                          ("bogus=1", "unknown control 'bogus'")])
def test_coordinator_with_a_bad_initial_control_exits_nonzero(socket_dir, bad, message):
    path = os.path.join(socket_dir, "bad.sock")
    r = cli("coordinator", "--socket", path, "--set", bad)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(path)


def test_stats_without_a_coordinator_fails_clearly(socket_dir):
    path = os.path.join(socket_dir, "nobody.sock")
    for args in (["stats", "--socket", path], ["set", "--socket", path, "run=1"]):
        r = cli(*args)
        assert r.returncode == 3
        assert f"no coordinator at {path}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr, r.stderr


def test_sigterm_stops_the_coordinator_cleanly(start_coordinator):
    co = start_coordinator()
    assert os.path.exists(co.path)
    assert co.stop() == 0
    assert not os.path.exists(co.path)
    r = cli("stats", "--socket", co.path)
    assert r.returncode == 3 and "no coordinator at" in r.stderr


def test_cli_coordinator_merges_workers_and_run2_unmerges(monkeypatch, start_coordinator, spawn_workers):
    """Workers find the CLI coordinator through $SHMDEDUP_SOCKET; stats shows
    them, per worker too; ``set run=2`` returns once all is unmerged; ``set
    run=1`` merges again."""
    co = start_coordinator("--set", "pages_to_scan=10000", "--set", "sleep_millisecs=0")
    monkeypatch.setenv("SHMDEDUP_SOCKET", co.path)
    npages = 1024
    workers = spawn_workers(2, npages, shared_seed=61)
    want = merged_counts(npages, 2)
    with co.client() as c:
        wait_stats(c, lambda s: counts(s) == want, 60, f"convergence to {want}")

    r = cli("stats", "--json", "--socket", co.path)
    stats = json.loads(r.stdout)
    assert counts(stats) == want
    assert {w["pid"] for w in stats["workers"]} == {w.pid for w in workers}
    for w in stats["workers"]:
        assert all(k in w for k in WORKER_STAT_NAMES), w
        assert w["ksm_merging_pages"] == npages

    plain = dict(line.split(":", 1) for line in cli("stats", "--socket", co.path).stdout.splitlines())
    assert int(plain["pages_sharing"]) == want["pages_sharing"]
    for w in workers:
        assert int(plain[f"workers/{w.pid}/ksm_merging_pages"]) == npages

    r = cli("set", "--socket", co.path, "run=2")
    assert r.returncode == 0, r.stderr
    stats = json.loads(cli("stats", "--json", "--socket", co.path).stdout)
    assert stats["run"] == 2
    assert counts(stats) == {"pages_shared": 0, "pages_sharing": 0}
    for w in workers:
        assert w.status()["merged"] == 0
        assert w.blocks() == npages

    assert cli("set", "--socket", co.path, "run=1").returncode == 0
    with co.client() as c:
        wait_stats(c, lambda s: counts(s) == want, 60, f"re-merge to {want}")
    for w in workers:
        w.assert_intact()


def test_second_coordinator_on_a_live_socket_exits_with_a_message(start_coordinator):
    co = start_coordinator()
    r = cli("coordinator", "--socket", co.path)
    assert r.returncode == 1
    assert "already listening" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    # The first one keeps its socket and keeps answering.
    assert cli("stats", "--socket", co.path).returncode == 0


def test_coordinator_socket_in_a_missing_directory_exits_with_a_message(socket_dir):
    path = os.path.join(socket_dir, "missing", "c.sock")
    r = cli("coordinator", "--socket", path)
    assert r.returncode == 1
    assert path in r.stderr and "Traceback" not in r.stderr, r.stderr
