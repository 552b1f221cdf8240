"""The scan: KSM's algorithm over the workers' advised pages.

``scanner`` (the cursor, checksums, the two-visit rule; it owns the matcher
and the inliner), ``matching`` (steps 3-5: index lookups, compares, queued
merges), ``inline`` (merging at write time: the coordinator's side of
``Region.merge_now``), ``mergequeue`` (queued merges holding their slots),
``settings`` (the controls the scan reads, shared by reference),
``accounting`` (replies, releases, statistics), ``registry`` (regions and
lanes), ``tracking`` (per-region page arrays), ``pagetable`` (per-page fields
by block), ``indexes`` (stable and unstable indexes), ``stable`` (stable
segments and slots), ``budget`` (each worker's mapping budget), ``advisor``
(pacing).
"""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
