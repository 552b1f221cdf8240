"""The scan: KSM's algorithm over the workers' advised pages.

``scanner`` (the cursor, checksums, the two-visit rule), ``matching`` (steps
3-5: index lookups, compares, queued merges), ``inline`` (merging at write
time: the coordinator's side of ``Region.merge_now``), ``tracking`` (per-region page
arrays), ``indexes`` (stable and unstable indexes), ``stable`` (stable segments
and slots), ``budget`` (each worker's mapping budget), ``advisor`` (pacing).
"""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
