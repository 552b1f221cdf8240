"""What a coordinator's ``stats()`` holds, for type checkers and readers.

``Client.stats()`` and ``Coordinator.stats()`` return a plain dict at run time
(``shmdedup stats --json`` prints the same object); :class:`Stats` names every
key in it with its meaning: the controls (:class:`~shmdedup.controls.Controls`),
KSM's counters as ``/sys/kernel/mm/ksm/`` has them, shmdedup's own, one
:class:`WorkerStats` per connected worker (``/proc/<pid>/ksm_stat``) and one
:class:`UidStats` per uid holding something.  tests/test_typing.py checks these
keys against what a running coordinator serves.
"""

from __future__ import annotations

from typing import TypedDict

from shmdedup.controls import Controls


class WorkerStats(TypedDict):
    """One connected worker process: ``/proc/<pid>/ksm_stat`` and more."""

    pid: int
    regions: int
    """Regions it registered."""
    pages: int
    """Pages of those regions."""
    requests: int
    """Merge and unmerge requests in flight."""
    pages_merged_inline: int
    """Pages its ``merge_now`` calls merged."""
    ksm_rmap_items: int
    """Its pages the scanner tracks (visited at least once)."""
    ksm_merging_pages: int
    """Its pages mapped to stable pages."""
    ksm_zero_pages: int
    """Its pages mapped to the zero page (``use_zero_pages``)."""
    ksm_inherited_pages: int
    """Its pages merged by a previous coordinator."""
    ksm_process_profit: int
    """(merging + zero pages) x page size - tracked pages x the scanner's metadata per page."""
    mappings_estimate: int
    """Its mappings as the mapping budget counts them (``max_mappings``)."""


class UidStats(TypedDict):
    """What one uid's connections and their regions hold (its quota usage)."""

    uid: int
    connections: int
    regions: int
    pages: int
    fds: int
    """Descriptors the coordinator holds for them."""


class _OptionalStats(TypedDict, total=False):
    metrics_port: int
    """The Prometheus port on 127.0.0.1; present only when metrics are on."""


class Stats(Controls, _OptionalStats):
    """A coordinator's statistics and controls (``stats()``)."""

    pages_shared: int
    """Stable pages in use."""
    pages_sharing: int
    """How many more sites share them: the pages saved."""
    pages_unshared: int
    """Unique pages waiting in the unstable index."""
    pages_volatile: int
    """Tracked pages in neither index (changing too fast, or first seen)."""
    pages_scanned: int
    """Advised pages the cursor has passed, less those smart_scan skipped (cumulative)."""
    full_scans: int
    """Completed passes over all advised pages."""
    ksm_zero_pages: int
    """Pages mapped to the zero page (``use_zero_pages``)."""
    pages_skipped: int
    """Page visits skipped by smart_scan (cumulative)."""
    stable_node_chains: int
    """Checksums with more than one stable page."""
    stable_node_dups: int
    """The stable pages inside those chains."""
    general_profit: int
    """Bytes saved minus the scanner's metadata (may be negative)."""
    rmap_items: int
    """Worker pages the scanner tracks (visited at least once)."""
    stable_pages_allocated: int
    """Stable pages allocated, including ones whose merge is still in flight."""
    pages_inherited: int
    """Pages a previous coordinator merged, left merged on its stable object."""
    pages_skipped_budget: int
    """Pages not merged (or not read) because their worker was at max_mappings (cumulative)."""
    pages_merged_inline: int
    """Pages ``merge_now`` merged."""
    merge_now_cpu_usecs: int
    """The coordinator's CPU time spent on merge_now requests."""
    last_error: str
    """Why the last run=2 failed, or empty."""
    coordinator_pid: int
    socket: str
    """The socket the coordinator listens on."""
    workers: list[WorkerStats]
    """One entry per connected worker (another uid sees only its own)."""
    uids: list[UidStats]
    """One entry per uid holding something (another uid sees only its own)."""
    fds_held: int
    """Descriptors held for all peers."""
    fds_budget: int
    """Descriptors peers may use in all."""


__all__ = ["Stats", "UidStats", "WorkerStats"]
