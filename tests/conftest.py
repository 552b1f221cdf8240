"""Suite-wide setting: copy-on-write fault-around off.

Most tests check KSM's exact accounting: a write to K merged pages breaks K
pages.  The trap's fault-around (``shmdedup.cow_fault_around``) breaks up to
64 pages ahead of a sequential writer, so those counts would depend on the
order of the writes.  Every process of the suite (this one, and through the
environment every worker it spawns) starts with it off; the tests of the
fault-around itself (tests/unit/test_fault_around.py) switch it on.
"""

from __future__ import annotations

import os

os.environ["SHMDEDUP_COW_FAULT_AROUND"] = "1"

from shmdedup import cow_fault_around  # noqa: E402  (after the environment is set)

cow_fault_around(1)   # shmdedup may have been imported already (the pytest11 plugin)
