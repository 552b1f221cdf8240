"""A session fixture every xdist worker builds the same way: a 256 MiB table.

``shmdedup_array`` (from the shmdedup pytest plugin) gives an array in shared
memory, computed one block of rows at a time (``rows=``), each block merged at
write time as soon as it is computed, so a worker never holds more than a block
of private pages; or a plain numpy array filled the same way when the run is
not started with ``--shmdedup``: the suite is the same either way.
``TABLE_MIB`` in the environment changes the size.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

ROWS_PER_BLOCK = 1024
COLS = 1024  # float32: 4 KiB a row, one page


def table_rows() -> int:
    return int(os.environ.get("TABLE_MIB", "256")) * 2**20 // (COLS * 4)


def block(i: int) -> np.ndarray:
    """Rows [i * ROWS_PER_BLOCK, ...) of the table: deterministic, the same in
    every worker, and not free to compute (a stand-in for features computed
    from a data set), as session fixtures tend to be."""
    x = np.random.default_rng(i).standard_normal((ROWS_PER_BLOCK, 64), dtype=np.float32)
    return np.tanh(x @ _W)


_W = np.random.default_rng(0).standard_normal((64, COLS), dtype=np.float32) / 8


@pytest.fixture(scope="session")
def table(shmdedup_array):
    def fill(rows: np.ndarray, start: int) -> None:  # rows [start, start + ROWS_PER_BLOCK)
        rows[...] = block(start // ROWS_PER_BLOCK)[:len(rows)]

    return shmdedup_array((table_rows(), COLS), np.float32, fill, rows=ROWS_PER_BLOCK)
