"""A coordinator process started by an application ends with it, even when the
application is killed (it watches its parent's pidfd)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

from tests.helpers import Worker, wait_for
from tests.integration.conftest import FAST


def test_coordinator_process_exits_when_its_parent_is_killed(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import sys, time, shmdedup
        c = shmdedup.Coordinator({str(tmp_path / 'c.sock')!r}, process=True).start()
        print(c.pid, flush=True)
        time.sleep(120)
    """)
    app = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        coord = int(app.stdout.readline())
        pidfd = os.pidfd_open(coord)
        app.send_signal(signal.SIGKILL)
        app.wait(10)
        ready, _, _ = select.select([pidfd], [], [], 30)
        os.close(pidfd)
        assert ready, f"coordinator {coord} outlived its killed parent"
        assert not (tmp_path / "c.sock").exists()
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        app.stdout.close()
        app.stderr.close()



def test_a_process_with_no_advised_region_left_does_not_connect(coordinator) -> None:
    """A process that advised regions and closed them all before a coordinator
    started does not connect to it (no connection slot, not a worker); its
    next advised region connects."""
    w = Worker(setup="from shmdedup import MERGEABLE, Region\nfrom shmdedup.worker import agent\n"
                     "connected = lambda: agent.get_agent().connected.is_set()")
    w.call("r = Region(16 * 4096); r.advise(MERGEABLE); r.close()")
    c = coordinator(**FAST)                     # exports SHMDEDUP_SOCKET to new processes only
    w.call("agent.set_socket(path)", path=c.socket_path)
    other = Worker(setup="from shmdedup import MERGEABLE, Region\n"
                         "r = Region(16 * 4096); r.advise(MERGEABLE)")
    pids = lambda: {x["pid"] for x in c.stats()["workers"]}  # noqa: E731
    wait_for(lambda: other.pid in pids(), 30, "the other process to connect")
    assert w.pid not in pids() and not w.call("result = connected()")
    w.call("r2 = Region(16 * 4096); r2.advise(MERGEABLE)")
    wait_for(lambda: w.pid in pids(), 30, "the process to connect once it advises again")
    w.call("r2.close()")
    other.call("r.close()")
    assert w.close() == 0 and other.close() == 0
