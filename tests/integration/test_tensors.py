"""Tensors over regions: the recipe of docs/guide.md, "Tensors (torch, numpy)".

``torch.from_numpy(region.ndarray(dtype, shape))`` or
``torch.frombuffer(memoryview(region), dtype=...)`` gives a tensor over the
region's pages, no copy: the pages merge across workers, reads see the merged
bytes, a write to a merged page breaks it (copy-on-write, in that worker
only), and while the tensor lives the region cannot be closed under it.

What differs, and is checked here:
* torch.frombuffer keeps a *reference* to the object it is given but releases
  the buffer it took from it.  Given the region itself, nothing stops
  ``region.close()`` from unmapping the tensor's memory; given a memoryview,
  the memoryview holds the region's export, unless someone releases it (a
  ``with memoryview(region) as m:`` block does, at its end).  A numpy array
  holds an export in every case, and torch.from_numpy holds the array.
* torch has no read-only tensors: over a read-only buffer it warns and writes
  anyway (copy-on-write still keeps the other workers' bytes); numpy refuses
  the write.

The torch cases run where torch is installed and are skipped elsewhere (it is
not in the test extra: its Linux wheels on PyPI are CUDA builds of several GiB).
"""

from __future__ import annotations

import importlib.util

import pytest

import shmdedup
from tests.helpers import Worker, no_shm_leftovers, reaper, wait_for  # noqa: F401
from tests.integration.conftest import FAST, wait_stats

NPAGES = 64
RO_INDEX = shmdedup.PAGE_SIZE // 4 * 7         # the first float32 of page 7
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch is not installed")
HOWS = ["np.frombuffer", pytest.param("torch.frombuffer", marks=needs_torch),
        pytest.param("torch.from_numpy", marks=needs_torch)]

SETUP = """
import warnings
import numpy as np
import shmdedup
P = shmdedup.PAGE_SIZE
if HOW.startswith("torch"):
    import torch

def over(buf, count=-1):
    '''A float32 vector over buf, the way HOW makes one.'''
    if HOW == "np.frombuffer":
        return np.frombuffer(buf, dtype=np.float32, count=count)
    if HOW == "torch.frombuffer":
        return torch.frombuffer(buf, dtype=torch.float32, count=count)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=count))

n = NPAGES * P // 4
src = np.arange(n, dtype=np.float32)          # every page distinct, the same in each worker
region = shmdedup.Region(NPAGES * P)
if HOW == "torch.from_numpy":
    t = torch.from_numpy(region.ndarray(np.float32))
else:
    t = over(memoryview(region))
t[:] = torch.from_numpy(src) if HOW.startswith("torch") else src
region.advise(shmdedup.MERGEABLE)
"""


def tensor_worker(how: str) -> Worker:
    return Worker(setup=SETUP.replace("HOW", repr(how)).replace("NPAGES", str(NPAGES)))


@pytest.mark.parametrize("how", HOWS)
def test_tensor_over_a_region(how: str, coordinator, reaper: None) -> None:  # noqa: F811
    c = coordinator(**FAST)
    a, b = tensor_worker(how), tensor_worker(how)
    wait_stats(c, lambda s: s["pages_shared"] == NPAGES and s["pages_sharing"] == NPAGES,
               what="the tensors' pages to merge")
    for w in (a, b):
        wait_for(lambda: w.call("result = region.merged_pages()") == NPAGES, 30, "merged pages")
        assert w.call("result = bool((np.asarray(t) == src).all())")   # reads see merged bytes

    # A write through the tensor breaks that page, in that worker only.
    a.call("t[5] = -1.0")
    assert a.call("result = (region.merged_pages(), float(t[5]))") == (NPAGES - 1, -1.0)
    # (b's copy of that page, left alone on its stable page, may be unmerged too)
    assert b.call("result = float(t[5])") == 5.0
    assert b.call("result = region.merged_pages()") >= NPAGES - 1

    # The tensor holds the region open.
    err = a.call("""
try:
    region.close()
    result = None
except BufferError as e:
    result = str(e)
""")
    assert err is not None and "export" in err and not a.call("result = region.closed")

    # Over a read-only view: numpy refuses to write; torch warns and writes
    # (and copy-on-write keeps b's bytes).
    wrote, warned, value = a.call("""
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ro = over(memoryview(region).toreadonly())
try:
    ro[RO_INDEX] = -2.0
    wrote = True
except ValueError:
    wrote = False
result = (wrote, any("not writable" in str(w.message) for w in caught), float(t[RO_INDEX]))
del ro
""", RO_INDEX=RO_INDEX)
    if how.startswith("torch"):
        assert (wrote, warned, value) == (True, True, -2.0)
        assert a.call("result = region.merged_pages()") == NPAGES - 2
    else:
        assert (wrote, warned, value) == (False, False, float(RO_INDEX))
    assert b.call("result = bool((np.asarray(t) == src).all())")

    # Once the tensor is gone, the region closes.
    for w in (a, b):
        assert w.call("del t; region.close(); result = region.closed")
    a.close()
    b.close()


@pytest.mark.parametrize("how", HOWS)
def test_what_keeps_a_region_open(how: str) -> None:
    """Exports of the region (what ``close()`` refuses on) for each way of
    making a tensor, in this process (no coordinator needed)."""
    ns: dict = {}
    exec(SETUP.replace("HOW", repr(how)).replace("NPAGES", "1")  # noqa: S102
         .replace("region.advise(shmdedup.MERGEABLE)", ""), ns)
    region = ns["region"]
    try:
        assert region.exports == 1                       # the recipe's tensor t
        # over the region itself
        t2 = ns["over"](region, 4)
        assert region.exports == (1 if how == "torch.frombuffer" else 2)
        del t2
        # over a memoryview that is then released (a `with` block's end)
        m = memoryview(region)
        t3 = ns["over"](m, 4)
        m.release()
        # torch holds m, not an export: t3 now points at memory nobody holds
        # open; numpy's array holds the buffer m had (its export stays).
        assert region.exports == (1 if how == "torch.frombuffer" else 2)
        del t3
    finally:
        del ns["t"]
        region.close()
