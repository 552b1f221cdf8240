"""Fixtures shared by the scanner's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.test_steady_rescan import Fleet


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """A scanner over real memfd objects, with stand-in agents (test_steady_rescan)."""
    f = Fleet()
    yield f
    f.close()
