"""The worker wing: what runs inside every process that uses shmdedup.

``region`` (shared-memory regions, their advice and views, the COW trap's Python
side) and ``agent`` (the background thread that carries out the coordinator's
merge and unmerge requests on this process's own mappings).
"""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
