"""The coordinator's controls: names, defaults and ranges, Linux KSM's where
the meaning is the same (``/sys/kernel/mm/ksm/*``), and their validation.
Everything that sets a control (constructor, CLI, protocol ``set``, the
pytest plugin) checks it here first, so a bad name or value changes nothing.
"""

from __future__ import annotations

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
