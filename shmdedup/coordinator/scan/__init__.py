"""The scan: KSM's algorithm over the workers' advised pages.

``scanner`` (the cursor, checksums, the two-visit rule), ``matching`` (steps
3-5: index lookups, compares, queued merges), ``tracking`` (per-region page
arrays), ``indexes`` (stable and unstable indexes), ``stable`` (stable segments
and slots), ``budget`` (each worker's mapping budget), ``advisor`` (pacing).
"""
