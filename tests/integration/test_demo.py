"""``shmdedup demo`` (the README's first command), smaller: both ways side by side.

The demo runs as the CLI runs it, in a child process, with ``--json``; the test
asserts on what it measured from outside (st_blocks of the workers' regions
and of the coordinator's stable object) and on every worker's own check of its
bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import shmdedup
from shmdedup.tools.demo import BLOCK, layout
from tests.helpers import REPO_ROOT, child_env

MiB = 2**20


def test_demo_shows_both_ways_and_every_copy_merges() -> None:
    workers, mib = 3, 8
    npages = mib * MiB // shmdedup.PAGE_SIZE
    shared, unique, volatile = layout(npages)
    page_mib = shmdedup.PAGE_SIZE / MiB
    proc = subprocess.run([sys.executable, "-m", "shmdedup", "demo", "--workers", str(workers), "--mib", str(mib),
                           "--json"], capture_output=True, text=True, check=False, env=child_env(),
                          cwd=str(REPO_ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    scan, write = res["scan"], res["write_time"]
    for way in (scan, write):
        assert way["byte_mismatches"] == 0 and way["all_workers_checked"]
        assert way["pages_sharing"] == (workers - 1) * shared
        assert way["peak_shm_objects_mib"] >= way["end_shm_objects_mib"] > 0
    # Scanning: in the end every worker holds only its own pages, plus one stable copy of the rest.
    assert scan["pages_shared"] == shared and scan["pages_merged_inline"] == 0
    assert scan["end_objects_mib"] == round(workers * (unique + volatile) * page_mib, 1)
    assert scan["stable_mib"] == round(shared * page_mib, 1)
    # At write time the pages of its own a worker declared final became stable pages too (kept for
    # inline_keep_millisecs in case another process loads them): at most that many more.
    assert shared <= write["pages_shared"] <= shared + workers * unique
    assert write["pages_merged_inline"] >= workers * shared
    # The copies never existed: a worker held at most a block of its final data privately,
    # besides the pages it keeps rewriting; scanning, each held its whole copy first.
    own = workers * (volatile + 2 * BLOCK) * page_mib
    assert write["peak_objects_mib"] <= own, write
    assert scan["peak_objects_mib"] >= mib > own / workers

