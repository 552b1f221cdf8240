"""The user guide says what the code does.

* Its API example (section 3), run as a script, prints what its comment says.
* What it says about writes from another process into merged pages, and about
  a stable page left with one sharer, matches what
  tests/integration/test_debugger_writes.py and test_coordinator.py measure
  (EIO, not EFAULT, for /proc/<pid>/mem and PTRACE_POKEDATA; the page is given
  back, which Linux does not do).
"""

from __future__ import annotations

import re

from tests.helpers import REPO_ROOT, run_python

GUIDE = (REPO_ROOT / "docs" / "guide.md").read_text()


def _section(title: str) -> str:
    start = GUIDE.index(title)
    end = GUIDE.find("\n## ", start + len(title))
    return GUIDE[start:end if end >= 0 else None]


def test_guide_api_example_prints_what_its_comment_says():
    code = re.search(r"```python\n(.*?)```", _section("## 3. The API"), re.S).group(1)
    claim = re.search(r"^\s*# ([\d ]+):", code, re.M)
    assert claim, "the example no longer says what it prints"
    for _ in range(3):
        r = run_python(code, timeout=120).check()
        assert r.stdout.strip() == claim.group(1).strip()


def test_guide_says_debugger_writes_fail_with_eio():
    io = " ".join(_section("## 5. The I/O caveat").split())
    assert re.search(r"`/proc/<pid>/mem` fails with \*\*`EIO`\*\*", io), io
    assert re.search(r"`ptrace\(PTRACE_POKEDATA\)`[^.;]* fails with \*\*`EIO`\*\*", io), io
    assert re.search(r"`process_vm_writev`[^.;]* fails with \*\*`EFAULT`\*\*", io), io


def test_guide_does_not_credit_linux_with_the_give_back():
    concepts = " ".join(_section("### pages_shared and pages_sharing").split())
    assert "as KSM does" not in concepts
    assert "is given back" in concepts and "**Linux does not**" in concepts
    assert "`pages_shared` counts it" in concepts
