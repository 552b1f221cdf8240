"""What a wait means: after ``wait_full_scans(n)``, the merges those scans
asked for have landed, so the statistics (and the worker's own pages) count
them.  And the README's first example, run as a script, prints what it says
every time."""

from __future__ import annotations

import re

from tests.helpers import REPO_ROOT, Worker, run_python
from tests.integration.conftest import FAST

# A worker process that, round after round, allocates a region holding two
# copies of M fresh random pages, advises it, waits for 2 full scans through
# its own Client and reads the statistics at once: everything must be merged.
ROUNDS = r"""
import numpy as np
import shmdedup
from shmdedup import PAGE_SIZE as P
client = shmdedup.Client(path, timeout=60)
seen = []
for rnd in range(rounds):
    half = np.random.default_rng(rnd).integers(0, 256, (M, P), dtype=np.uint8)
    r = shmdedup.Region(2 * M * P)
    a = r.ndarray(np.uint8, (2, M, P))
    a[:] = half
    r.advise(shmdedup.MERGEABLE)
    client.wait_full_scans(2, timeout=60)
    s = client.stats()
    seen.append((s["pages_shared"], s["pages_sharing"], r.merged_pages(), r.allocated_bytes() // P))
    del a
    r.close()
client.close()
result = seen
"""


def test_stats_right_after_wait_full_scans_count_every_merge(coordinator):
    """Each round's pages are merged when the wait returns: M stable pages,
    M pages saved, all 2M pages of the region merged and punched."""
    M, rounds = 2048, 8
    c = coordinator(**FAST)
    w = Worker()
    seen = w.call(ROUNDS, path=c.socket_path, rounds=rounds, M=M, timeout=300)
    assert seen == [(M, M, 2 * M, 0)] * rounds, seen
    assert w.close() == 0


def _readme_first_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code, "README.md has no python example"
    return code.group(1)


def test_readme_first_example_prints_the_pages_saved_20_times_of_20(tmp_path):
    """The README's first example, as a script in a fresh interpreter each
    time: it says it saves 4096 pages (a 16 MiB table held twice), and so it
    prints, 20 runs of 20."""
    # It writes its input file where it runs: not in the checkout.
    code = f"import os; os.chdir({str(tmp_path)!r})\n" + _readme_first_example()
    claim = re.search(r"pages saved: (\d+)", code)
    assert claim, "the example no longer says what it prints"
    want = claim.group(1)
    outputs = []
    for _ in range(20):
        r = run_python(code, timeout=120).check()
        outputs.append(r.stdout.strip())
    assert outputs == [want] * 20, outputs
