"""The worker wing: what runs inside every process that uses shmdedup.

``region`` (shared-memory regions, their advice and views, the COW trap's Python
side) and ``agent`` (the background thread that carries out the coordinator's
merge and unmerge requests on this process's own mappings); ``loading`` and
``formats`` (writing regions chunk by chunk, each chunk merged at write time:
fromfile, share, fill, .npy and safetensors), on ``reading`` (files read into
pinned ranges, watched for changes).
"""
