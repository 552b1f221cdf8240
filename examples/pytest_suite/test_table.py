"""Tests that use the shared table: nearest-neighbour queries over all of it."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ROWS_PER_BLOCK, block, table_rows


@pytest.mark.parametrize("i", range(160))
def test_nearest_rows(table, i):
    rng = np.random.default_rng(i)
    rows = rng.integers(0, table_rows(), 8)
    # The stored rows are what the fixture computed.
    for r in rows[:2]:
        b = r // ROWS_PER_BLOCK
        assert np.array_equal(table[r], block(b)[r - b * ROWS_PER_BLOCK])
    # A slightly perturbed row's nearest neighbour (by dot product) is that row.
    queries = table[rows] + rng.standard_normal((8, table.shape[1]), dtype=np.float32) * 0.1
    assert np.array_equal(np.argmax(table @ queries.T, axis=0), rows)
