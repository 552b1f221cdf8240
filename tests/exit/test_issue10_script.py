"""The script of issue 10, defect 1, exactly, run RUNS times.

With no coordinator running it hung at interpreter exit in most runs: the
agent thread, started by ``advise`` while the main thread held the agent's
lock, got that lock just as the main thread began finalizing and was ended
there (a daemon thread that wants the GIL back during finalization never
runs again); the Region's finalizer, run when the memoryview was released at
module teardown, then waited for the lock forever.  Each run must exit 0
within DEADLINE seconds, run from a directory outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from tests import helpers

RUNS = 20
DEADLINE = 10.0   # s; a run takes ~0.3 s

SCRIPT = """\
import shmdedup, numpy as np
r = shmdedup.Region(1 << 20)
mv = memoryview(r)
a = r.ndarray(np.uint8, (1 << 20,))
a[:] = 7
r.advise(shmdedup.MERGEABLE)
print("region api ok")
"""


def test_issue10_script_exits_every_time() -> None:
    with tempfile.TemporaryDirectory(prefix="shmdedup-exit-") as tmp:
        path = os.path.join(tmp, "script.py")
        with open(path, "w") as f:
            f.write(SCRIPT)
        env = dict(os.environ, PYTHONPATH=str(helpers.REPO_ROOT),
                   SHMDEDUP_SOCKET=os.path.join(tmp, "nobody.sock"))  # no coordinator, for sure
        env.pop("PYTHONFAULTHANDLER", None)
        slowest = 0.0
        for run in range(RUNS):
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, path], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            helpers._spawned_pids.add(proc.pid)
            try:
                out, err = proc.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise AssertionError(f"run {run + 1} of {RUNS} hung at exit (killed after {DEADLINE} s)") from None
            slowest = max(slowest, time.monotonic() - start)
            assert (proc.returncode, out, err) == (0, "region api ok\n", ""), f"run {run + 1}: {err}"
    print(f"{RUNS} runs, slowest {slowest:.2f} s")
