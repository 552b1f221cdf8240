"""The coordinator's controls: names, defaults and ranges, Linux KSM's where
the meaning is the same (``/sys/kernel/mm/ksm/*``), and their validation.
Everything that sets a control (constructor, CLI, protocol ``set``, the
pytest plugin) checks it here first, so a bad name or value changes nothing.

For type checkers, :class:`Controls` names every control with its meaning (a
coordinator's ``stats()`` holds them all) and :class:`ControlSettings` is any
subset of them, as ``Coordinator(**settings)`` takes them; both list exactly
the names of ``CONTROLS`` (tests/test_typing.py).
"""

from __future__ import annotations

from typing import TypedDict

from shmdedup.errors import ControlError

# vm.max_map_count's default, for when /proc/sys cannot be read.
MAX_MAP_COUNT_FALLBACK = 65530


def default_max_mappings() -> int:
    """Three quarters of vm.max_map_count: the rest is headroom for what the
    estimate cannot see (unreconciled breaks, the process's own growth)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = MAX_MAP_COUNT_FALLBACK
    return max(limit - limit // 4, 1)


# name: (default, minimum, maximum)
CONTROLS: dict[str, tuple[int, int, int]] = {
    "run": (1, 0, 2),
    "pages_to_scan": (4096, 1, 10_000_000),
    "sleep_millisecs": (20, 0, 3_600_000),
    "max_page_sharing": (256, 2, 2**31 - 1),
    "max_kernel_pages": (0, 0, 2**31 - 1),
    "use_zero_pages": (0, 0, 1),
    "smart_scan": (1, 0, 1),
    # The scan-time advisor (advisor.py) paces by default; setting
    # pages_to_scan by hand switches it off (advisor_mode 0).
    "advisor_mode": (1, 0, 1),
    "advisor_target_scan_time": (10, 1, 86_400),
    "advisor_max_cpu": (50, 1, 100),
    "advisor_min_pages_to_scan": (500, 1, 10_000_000),
    "advisor_max_pages_to_scan": (100_000, 1, 10_000_000),
    # Merging at write time (Region.merge_now): a stable page it created is
    # not given back to its only sharer for this long (the next process
    # loading the same bytes is usually close behind); then the scan's rule.
    "inline_keep_millisecs": (30_000, 0, 86_400_000),
    # Security (docs/security.md): 1 merges all-zero pages only, never a stable slot.
    "merge_zero_pages_only": (0, 0, 1),
    # Resource caps: a peer past one is refused with a logged reason.
    "max_connections": (1024, 1, 65536),
    "max_regions_per_worker": (4096, 1, 2**20),
    "max_pages_per_worker": (2**26, 1, 2**31),   # 256 GiB of 4 KiB pages, ~0.9 GB of metadata
    "max_msgs_per_sec": (20000, 1, 10_000_000),  # per connection, token bucket
    "max_msgs_burst": (5000, 1, 10_000_000),
    # Quotas per uid (quotas.py): the coordinator's own uid is bounded by the
    # global caps only, and a quarter of max_connections and max_fds is kept for it.
    "max_connections_per_uid": (256, 1, 65536),
    "max_regions_per_uid": (16384, 1, 2**24),
    "max_pages_per_uid": (2**27, 1, 2**40),      # 512 GiB of 4 KiB pages
    "max_fds": (0, 0, 2**31 - 1),                # 0: what RLIMIT_NOFILE leaves at start
    "max_fds_per_uid": (0, 0, 2**31 - 1),        # 0: a quarter of max_fds
    # Mappings (VMAs) a worker may reach through merges, estimated (budget.py);
    # the default leaves a quarter of vm.max_map_count as headroom.
    "max_mappings": (default_max_mappings(), 1, 2**31 - 1),
}


def check_control(name: object, value: object) -> int:
    """Validate one control; returns the int value or raises ControlError."""
    if not isinstance(name, str) or name not in CONTROLS:
        raise ControlError(f"unknown control {name!r}; known: {', '.join(sorted(CONTROLS))}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{name} must be an integer, got {value!r}")
    _, lo, hi = CONTROLS[name]
    if not lo <= value <= hi:
        raise ControlError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


class Controls(TypedDict):
    """Every control of a coordinator, as its ``stats()`` reports them (ints;
    ``CONTROLS`` has each one's default and range)."""

    run: int
    """0 stop, 1 merge, 2 stop and unmerge everything (the advice is kept)."""
    pages_to_scan: int
    """Advised pages the cursor passes per batch, merged ones included."""
    sleep_millisecs: int
    """Pause between batches."""
    max_page_sharing: int
    """Most worker pages mapped to one stable page."""
    max_kernel_pages: int
    """Cap on stable pages in use (0: none)."""
    use_zero_pages: int
    """1: all-zero pages map to anonymous read-only memory, no stable page."""
    smart_scan: int
    """1: pages that keep failing to merge are skipped for 1, 2, 4, then 8 full scans."""
    advisor_mode: int
    """1: the scan-time advisor sets pages_to_scan after every full scan; 0: manual."""
    advisor_target_scan_time: int
    """Seconds one full scan should take (advisor)."""
    advisor_max_cpu: int
    """Percent of one CPU the coordinator may use (advisor)."""
    advisor_min_pages_to_scan: int
    """Lower bound of the advisor's pages_to_scan."""
    advisor_max_pages_to_scan: int
    """Upper bound of the advisor's pages_to_scan."""
    inline_keep_millisecs: int
    """How long a stable page made by merge_now is kept from going back to its only sharer."""
    merge_zero_pages_only: int
    """1: merge all-zero pages only, never make a stable page."""
    max_connections: int
    """Connections beyond it are closed at accept."""
    max_regions_per_worker: int
    """Registrations past it are refused."""
    max_pages_per_worker: int
    """Registrations past it (in pages) are refused."""
    max_msgs_per_sec: int
    """Per-connection message rate; a faster peer is disconnected."""
    max_msgs_burst: int
    """Per-connection message burst."""
    max_connections_per_uid: int
    """Quota of each uid other than the coordinator's own."""
    max_regions_per_uid: int
    """Quota of each uid other than the coordinator's own."""
    max_pages_per_uid: int
    """Quota of each uid other than the coordinator's own."""
    max_fds: int
    """Descriptors the coordinator may hold for peers (0: what RLIMIT_NOFILE leaves)."""
    max_fds_per_uid: int
    """Descriptors per other uid (0: a quarter of max_fds)."""
    max_mappings: int
    """Most mappings a worker may reach through merges (estimated); merges past it are skipped."""


class ControlSettings(TypedDict, total=False):
    """Any of the controls (see :class:`Controls`), as keyword arguments:
    ``Coordinator(pages_to_scan=10000, sleep_millisecs=0)``."""

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    max_page_sharing: int
    max_kernel_pages: int
    use_zero_pages: int
    smart_scan: int
    advisor_mode: int
    advisor_target_scan_time: int
    advisor_max_cpu: int
    advisor_min_pages_to_scan: int
    advisor_max_pages_to_scan: int
    inline_keep_millisecs: int
    merge_zero_pages_only: int
    max_connections: int
    max_regions_per_worker: int
    max_pages_per_worker: int
    max_msgs_per_sec: int
    max_msgs_burst: int
    max_connections_per_uid: int
    max_regions_per_uid: int
    max_pages_per_uid: int
    max_fds: int
    max_fds_per_uid: int
    max_mappings: int


__all__ = ["CONTROLS", "ControlSettings", "Controls", "check_control"]
