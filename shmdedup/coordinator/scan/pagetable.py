"""Per-page state of a registered region, kept only where pages need it.

A worker may register 2**26 pages of an object that holds nothing (a sparse
object costs it nothing) and advise all of them; the coordinator must not pay
per page it is told about, only per page that holds data.  So:

* :class:`PageTable` keeps the scanner's per-page arrays (checksum, slot,
  status, smart_scan age and skips: 15 bytes a page) in *chunks* of
  ``CHUNK_PAGES`` pages, and inside a chunk only for the *blocks* of
  ``BLOCK_PAGES`` pages that were given a value (a page the scan read, a page
  merged).  A page of no block reads as the defaults (never visited, no
  slot).  A block costs 15 * 256 bytes, less than the one page of data a
  worker must write to make the scanner create it.  A chunk's arrays hold its
  blocks side by side in page order (``Chunk.pages`` says which page each
  entry is), so a dense chunk is plain arrays indexed by page offset, as
  before, and the scanner works on them without a copy.
* :class:`AdviceRuns` keeps which pages are advised mergeable as sorted,
  disjoint runs: an advice message costs O(log runs) plus the runs it
  changes, whatever its length.

Both are the coordinator's own memory, never shared; nothing here does I/O.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from typing import Any

import numpy as np

CHUNK_PAGES = 2048           # pages per chunk: the scanner's unit of work
BLOCK_PAGES = 256            # pages per block: the unit of allocation
BLOCKS_PER_CHUNK = CHUNK_PAGES // BLOCK_PAGES
_CSHIFT = 11                 # log2(CHUNK_PAGES)
_BSHIFT = 8                  # log2(BLOCK_PAGES)
assert 1 << _CSHIFT == CHUNK_PAGES and 1 << _BSHIFT == BLOCK_PAGES

# name: (dtype, value of a page no block holds)
FIELDS: dict[str, tuple[Any, int]] = {
    "checksum": (np.uint64, 0),
    "slot": (np.int32, -1),
    "status": (np.uint8, 0),
    "age": (np.uint8, 0),
    "skip": (np.uint8, 0),
}
BYTES_PER_PAGE = sum(np.dtype(t).itemsize for t, _ in FIELDS.values())

# Most runs of advice one region may have: each advise message can split a
# run in two, and the scan seeks once per run at most.  Honest programs
# advise a handful of ranges per region.
MAX_ADVICE_RUNS = 65536


def _distinct(a: np.ndarray) -> list[int]:
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))].tolist() if len(s) else []


class Chunk:
    """The blocks of one chunk that hold values, side by side in page order.

    ``pos[b]`` is where block ``b`` starts in the field arrays, or -1;
    ``pages`` the page number of each entry.  ``full`` when every block is
    there: entry i is then page base + i.  ``calm`` and ``calm_upto``:
    the scanner's notes for the mapping budget (``Scanner._note_calm``);
    reset whenever the blocks change.
    """

    __slots__ = ("index", "base", "pos", "rank", "full", "nblocks", "calm", "calm_upto",
                 "checksum", "slot", "status", "age", "skip")

    # The per-page fields (FIELDS), one entry per page of the blocks held.
    checksum: np.ndarray
    slot: np.ndarray
    status: np.ndarray
    age: np.ndarray
    skip: np.ndarray

    def __init__(self, index: int, blocks: list[int]) -> None:
        self.index: int = index
        self.base: int = index << _CSHIFT
        self.pos: np.ndarray
        self.rank: list[int]
        self.full: bool
        self.nblocks: int
        self.calm: bool = False
        self.calm_upto: int = 0
        self._layout(blocks)
        self._allocate()

    def _allocate(self) -> None:
        """The field arrays for nblocks blocks, at their defaults: views of
        one allocation (a chunk is made or regrouped at every merge_now of
        a fresh range; five allocations cost more than the fill)."""
        n = self.nblocks * BLOCK_PAGES
        buf = np.zeros(n * BYTES_PER_PAGE, np.uint8)
        off = 0
        for name, (dtype, default) in FIELDS.items():
            size = np.dtype(dtype).itemsize
            arr = buf[off:off + n * size].view(dtype)
            if default:
                arr[:] = default
            setattr(self, name, arr)
            off += n * size

    def _layout(self, blocks: list[int]) -> None:
        self.pos = np.full(BLOCKS_PER_CHUNK, -1, np.int64)
        self.pos[blocks] = np.arange(len(blocks)) * BLOCK_PAGES
        self.nblocks = len(blocks)
        self.full = self.nblocks == BLOCKS_PER_CHUNK
        present = set(blocks)
        self.rank = []
        k = 0
        for b in range(BLOCKS_PER_CHUNK):
            self.rank.append(k)
            k += b in present

    def blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(self.pos >= 0)]

    @property
    def pages(self) -> np.ndarray:
        """The page number of each entry (int64, ascending)."""
        if self.full:
            return self.base + _CHUNK_RANGE
        b = np.flatnonzero(self.pos >= 0)
        return (self.base + (b[:, None] * BLOCK_PAGES + _BLOCK_RANGE)).reshape(-1)

    def positions(self, pages: np.ndarray) -> np.ndarray:
        """Entry of each page (all in this chunk), -1 where its block is absent."""
        local = pages - self.base
        if self.full:
            return local
        start = self.pos[local >> _BSHIFT]
        return np.where(start >= 0, start + (local & (BLOCK_PAGES - 1)), -1)

    def span(self, p0: int, p1: int) -> tuple[int, int]:
        """[lo, hi): the entries of the pages in [p0, p1)."""
        a, b = max(p0 - self.base, 0), min(p1 - self.base, CHUNK_PAGES)
        if b <= a:
            return (0, 0)
        if self.full:
            return a, b
        return self._entry(a), self._entry(b)

    def _entry(self, x: int) -> int:
        """The first entry whose page is at offset x or after (x <= CHUNK_PAGES)."""
        if x >= CHUNK_PAGES:
            return self.nblocks * BLOCK_PAGES
        b = x >> _BSHIFT
        start = int(self.pos[b])
        return start + (x & (BLOCK_PAGES - 1)) if start >= 0 else self.rank[b] * BLOCK_PAGES

    def regroup(self, blocks: list[int]) -> None:
        """Hold exactly these blocks (values of blocks kept stay, new ones
        get the defaults)."""
        old_pos, old = self.pos.tolist(), {n: getattr(self, n) for n in FIELDS}
        self.calm, self.calm_upto = False, 0
        self._layout(blocks)
        pos = self.pos.tolist()
        # The blocks kept, as runs that sit side by side in both layouts: one
        # copy per run and field (a streaming load grows a chunk by one run).
        moves: list[list[int]] = []           # [from, to, entries]
        for b in blocks:
            s0 = old_pos[b]
            if s0 < 0:
                continue
            if moves and moves[-1][0] + moves[-1][2] == s0 and moves[-1][1] + moves[-1][2] == pos[b]:
                moves[-1][2] += BLOCK_PAGES
            else:
                moves.append([s0, pos[b], BLOCK_PAGES])
        self._allocate()
        for name in FIELDS:
            arr, src = getattr(self, name), old[name]
            for s, d, k in moves:
                arr[d:d + k] = src[s:s + k]

    @property
    def nbytes(self) -> int:
        return int(self.nblocks * BLOCK_PAGES * BYTES_PER_PAGE)


_CHUNK_RANGE = np.arange(CHUNK_PAGES, dtype=np.int64)
_BLOCK_RANGE = np.arange(BLOCK_PAGES, dtype=np.int64)


class PageTable:
    """The per-page fields of one region (see the module docstring)."""

    def __init__(self, npages: int) -> None:
        self.npages: int = npages
        self._chunks: dict[int, Chunk] = {}
        self._order: list[int] = []          # chunk indexes, ascending

    # -- chunks ------------------------------------------------------------

    def chunk(self, c: int) -> Chunk | None:
        return self._chunks.get(c)

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk holding blocks, in page order (a snapshot: callers may
        change the table while they iterate)."""
        for c in list(self._order):
            ch = self._chunks.get(c)
            if ch is not None:
                yield ch

    def next_chunk(self, c: int) -> int | None:
        """The first chunk index >= c that holds blocks."""
        i = bisect_left(self._order, c)
        return self._order[i] if i < len(self._order) else None

    def ensure(self, c: int, blocks: list[int]) -> Chunk:
        """Chunk c, holding at least these blocks."""
        ch = self._chunks.get(c)
        if ch is None:
            ch = self._chunks[c] = Chunk(c, sorted(set(blocks)))
            insort(self._order, c)
        elif any(ch.pos[b] < 0 for b in blocks):
            ch.regroup(sorted(set(ch.blocks()) | set(blocks)))
        return ch

    def keep(self, ch: Chunk, blocks: list[int]) -> None:
        """Keep only these blocks of the chunk (none: drop it)."""
        if not blocks:
            del self._chunks[ch.index]
            self._order.remove(ch.index)
        elif len(blocks) != int(np.count_nonzero(ch.pos >= 0)):
            ch.regroup(blocks)

    def retain(self, ch: Chunk, mask: np.ndarray) -> None:
        """Keep the blocks of the chunk where ``mask`` (one bool per entry)
        has a True; drop the others."""
        self.keep(ch, [b for b in ch.blocks()
                       if mask[int(ch.pos[b]):int(ch.pos[b]) + BLOCK_PAGES].any()])

    def clear(self) -> None:
        self._chunks.clear()
        self._order.clear()

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def nbytes(self) -> int:
        return sum(ch.nbytes for ch in self._chunks.values())

    # -- values by page ----------------------------------------------------

    def _one(self, pages: np.ndarray) -> tuple[Chunk, np.ndarray] | None:
        """(chunk, entries) when every page is in one chunk that holds all
        their blocks: the common case (the scanner works a chunk at a time),
        a few index operations."""
        ch = self._chunks.get(int(pages[0]) >> _CSHIFT)
        if ch is None:
            return None
        local = pages - ch.base
        if len(local) > 1 and not (local.view(np.uint64) < CHUNK_PAGES).all():
            return None
        if ch.full:
            return ch, local
        start = ch.pos[local >> _BSHIFT]
        if (start < 0).any():
            return None
        return ch, start + (local & (BLOCK_PAGES - 1))

    def _groups(self, pages: np.ndarray) -> Iterator[tuple[int, Any]]:
        """(chunk index, selection of ``pages``) for each chunk the pages fall in."""
        c = pages >> _CSHIFT
        c0 = int(c[0])
        if len(c) == 1 or (c == c0).all():
            yield c0, slice(None)
            return
        order = np.argsort(c, kind="stable")
        cs = c[order]
        cut = np.flatnonzero(cs[1:] != cs[:-1]) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(cs)]):
            yield int(cs[a]), order[a:b]

    def get(self, name: str, pages: np.ndarray) -> np.ndarray:
        """The field of each page (int64 array), defaults where no block holds it."""
        if len(pages):
            one = self._one(pages)
            if one is not None:
                got: np.ndarray = getattr(one[0], name)[one[1]]
                return got
        dtype, default = FIELDS[name]
        out = np.full(len(pages), default, dtype)
        if not len(pages) or not self._chunks:
            return out
        for c, sel in self._groups(pages):
            ch = self._chunks.get(c)
            if ch is None:
                continue
            pos = ch.positions(pages[sel])
            arr = getattr(ch, name)
            if ch.full:
                out[sel] = arr[pos]
            else:
                have = pos >= 0
                idx = np.arange(len(out))[sel] if isinstance(sel, slice) else sel
                out[idx[have]] = arr[pos[have]]
        return out

    def set(self, name: str, pages: np.ndarray, value: Any) -> None:
        """Set the field of each page (int64 array) to value (a scalar, or an
        array like pages); blocks are created as needed, but not to hold a
        default."""
        self.assign(pages, {name: value})

    def assign(self, pages: np.ndarray, values: dict[str, Any]) -> None:
        """Several fields of the same pages at once (one lookup); a range of
        pages (ascending by one) as slices (``assign_range``)."""
        n = len(pages)
        if not n:
            return
        a = int(pages[0])
        if n > 1 and int(pages[-1]) - a == n - 1 and (pages[1:] > pages[:-1]).all():
            self.assign_range(a, a + n, values)
            return
        self._assign_pages(pages, values)

    def _assign_pages(self, pages: np.ndarray, values: dict[str, Any]) -> None:
        one = self._one(pages)
        if one is not None:
            for name, v in values.items():
                getattr(one[0], name)[one[1]] = v
            return
        arrays = {n: v for n, v in values.items() if isinstance(v, np.ndarray) and v.ndim}
        defaults = all(n not in arrays and v == FIELDS[n][1] for n, v in values.items())
        if defaults and not self._chunks:
            return
        for c, sel in self._groups(pages):
            p = pages[sel]
            ch = self._chunks.get(c)
            if ch is None or not ch.full:
                if defaults:
                    if ch is None:
                        continue            # absent pages already read as the default
                else:
                    ch = self.ensure(c, _distinct((p - (c << _CSHIFT)) >> _BSHIFT))
            pos = ch.positions(p)
            have = None if ch.full else pos >= 0
            if have is not None:
                pos = pos[have]
            for name, v in values.items():
                if name in arrays:
                    v = v[sel] if have is None else v[sel][have]
                getattr(ch, name)[pos] = v

    def assign_range(self, a: int, b: int, values: dict[str, Any]) -> None:
        """Several fields of the pages [a, b) at once (each value a scalar
        or an array of b - a): slices of each chunk's arrays, no index per
        page; blocks are created as needed, but not to hold a default."""
        if b <= a:
            return
        defaults = all(not (isinstance(v, np.ndarray) and v.ndim) and v == FIELDS[n][1]
                       for n, v in values.items())
        p = a
        while p < b:
            c = p >> _CSHIFT
            q = min(b, (c + 1) << _CSHIFT)
            ch = self._chunks.get(c)
            if ch is None or not ch.full:
                if ch is None and defaults:
                    p = q
                    continue        # absent pages already read as the default
                base = c << _CSHIFT
                blocks = list(range((p - base) >> _BSHIFT, ((q - 1 - base) >> _BSHIFT) + 1))
                if ch is None or (ch.pos[blocks] < 0).any():
                    if defaults:            # no block made to hold a default: page by page
                        self._assign_pages(np.arange(p, q, dtype=np.int64), values)
                        p = q
                        continue
                    ch = self.ensure(c, blocks)
            # Every block of [p, q) is held, in page order: one slice.
            lo, hi = ch.span(p, q)
            for name, v in values.items():
                if isinstance(v, np.ndarray) and v.ndim:
                    v = v[p - a:q - a]
                getattr(ch, name)[lo:hi] = v
            p = q

    def get_range(self, name: str, a: int, b: int) -> np.ndarray:
        """The field for the pages [a, b), defaults where no block holds them."""
        dtype, default = FIELDS[name]
        out = np.full(max(b - a, 0), default, dtype)
        i = bisect_left(self._order, a >> _CSHIFT)
        while i < len(self._order) and self._order[i] << _CSHIFT < b:
            ch = self._chunks[self._order[i]]
            lo, hi = ch.span(a, b)
            if hi > lo:
                arr = getattr(ch, name)
                if ch.full:
                    first = ch.base + lo - a
                    out[first:first + hi - lo] = arr[lo:hi]
                else:
                    out[ch.pages[lo:hi] - a] = arr[lo:hi]
            i += 1
        return out


class Field:
    """``reg.status`` and the like: index with an int, a slice or an int
    array of pages, read or assign, like the dense array this replaces."""

    __slots__ = ("table", "name")

    def __init__(self, table: PageTable, name: str) -> None:
        self.table: PageTable = table
        self.name: str = name

    def __len__(self) -> int:
        return self.table.npages

    @staticmethod
    def _pages(key: Any) -> np.ndarray:
        if type(key) is np.ndarray and key.dtype == np.int64:
            return key
        arr = np.asarray(key)
        if arr.dtype == bool:
            raise TypeError("index a page field with page numbers, not a mask")
        pages: np.ndarray = arr.astype(np.int64).reshape(-1)
        return pages

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(self.table.npages)
            out = self.table.get_range(self.name, a, b) if b > a else \
                np.zeros(0, FIELDS[self.name][0])
            return out[::step] if step != 1 else out
        if isinstance(key, (int, np.integer)):
            return self.table.get(self.name, np.array([int(key)], np.int64))[0]
        return self.table.get(self.name, self._pages(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, slice):
            a, b, step = key.indices(self.table.npages)
            pages = np.arange(a, b, step, dtype=np.int64)
        elif isinstance(key, (int, np.integer)):
            pages = np.array([int(key)], np.int64)
        else:
            pages = self._pages(key)
        if isinstance(value, (list, tuple)):
            value = np.asarray(value)
        self.table.set(self.name, pages, value)


class AdviceRuns:
    """The pages advised mergeable, as sorted disjoint runs [start, end)
    that never touch (adjacent runs are one)."""

    def __init__(self, npages: int) -> None:
        self.npages: int = npages
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def set(self, start: int, n: int, on: bool) -> None:
        """Advise [start, start + n) on or off.  Raises ValueError past
        MAX_ADVICE_RUNS runs (nothing changes then)."""
        a, b = start, start + n
        if n <= 0:
            return
        i = bisect_left(self.ends, a)          # first run ending at or after a
        j = bisect_right(self.starts, b)       # runs starting at or before b
        if on:
            if i < j:
                a, b = min(a, self.starts[i]), max(b, self.ends[j - 1])
            new_s, new_e = [a], [b]
        else:
            new_s, new_e = [], []
            if i < j and self.starts[i] < a:
                new_s.append(self.starts[i])
                new_e.append(a)
            if i < j and self.ends[j - 1] > b:
                new_s.append(b)
                new_e.append(self.ends[j - 1])
        if len(self.starts) - (j - i) + len(new_s) > MAX_ADVICE_RUNS:
            raise ValueError(f"more than {MAX_ADVICE_RUNS} separate advised ranges in one region")
        self.starts[i:j] = new_s
        self.ends[i:j] = new_e
        self._arrays = None

    def __len__(self) -> int:
        return len(self.starts)

    def any(self) -> bool:
        return bool(self.starts)

    def count(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))

    def next_run(self, p: int) -> tuple[int, int] | None:
        """The first run that ends after page p: (start, end)."""
        i = bisect_right(self.ends, p)
        return (self.starts[i], self.ends[i]) if i < len(self.starts) else None

    def mask(self, a: int, b: int) -> np.ndarray:
        """Advised or not, for each page of [a, b)."""
        out = np.zeros(max(b - a, 0), bool)
        i = bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            out[max(self.starts[i], a) - a:min(self.ends[i], b) - a] = True
            i += 1
        return out

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(self.npages)
            return self.mask(a, b)[::step]
        if isinstance(key, (int, np.integer)):
            r = self.next_run(int(key))
            return r is not None and r[0] <= int(key)
        pages = np.asarray(key, np.int64)
        if self._arrays is None:
            self._arrays = (np.asarray(self.starts, np.int64), np.asarray(self.ends, np.int64))
        s, e = self._arrays
        i = np.searchsorted(e, pages, side="right")
        ok = i < len(s)
        return ok & (s[np.minimum(i, max(len(s) - 1, 0))] <= pages) if len(s) else np.zeros(len(pages), bool)



# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
