"""A coordinator process started by an application ends with it, even when the
application is killed (it watches its parent's pidfd)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap


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
