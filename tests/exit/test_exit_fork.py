"""Exit and os.fork: what a forked child inherits must not hang it, nor stop
what belongs to its parent.

* The exit hooks (``atexit``) are inherited: a child that ends normally
  stops its own agent, and leaves alone the embedded coordinator its parent
  started (stopping it there would remove the parent's socket).
* A lock of the agent module held by another thread at the fork is never
  released in the child: the child gets a fresh one.
"""

from __future__ import annotations

from tests.helpers import run_python

TIMEOUT = 30.0


def test_forked_child_exit_leaves_the_parents_coordinator() -> None:
    res = run_python("""
        import os, sys
        import numpy as np
        import shmdedup

        c = shmdedup.Coordinator(sleep_millisecs=0).start()
        path = c.socket_path
        pid = os.fork()
        if pid == 0:   # a child that uses a region, then ends normally (atexit runs)
            r = shmdedup.Region(64 * shmdedup.PAGE_SIZE)
            a = r.ndarray()
            a[:] = 1
            r.advise(shmdedup.MERGEABLE)
            sys.exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert os.path.exists(path), "the child's exit removed the parent's socket"
        assert c.stats()["run"] == 1
        c.stop()
        assert not os.path.exists(os.path.dirname(path))
        print("ok")
    """, timeout=TIMEOUT)
    res.check()
    assert res.stdout == "ok\n"


def test_agent_lock_held_at_fork_does_not_hang_the_child() -> None:
    res = run_python("""
        import os, sys
        import shmdedup
        from shmdedup.worker import agent

        with agent._agent_lock:      # as another thread may hold it at the fork
            pid = os.fork()
            if pid == 0:
                shmdedup.enable_process_merging()   # takes that lock
                r = shmdedup.Region(shmdedup.PAGE_SIZE)
                sys.exit(0 if r.advice_runs() == [(0, 1)] else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        print("ok")
    """, timeout=TIMEOUT)
    res.check()
    assert res.stdout == "ok\n"
