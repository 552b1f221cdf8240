"""The coordinator wing: the ksmd of a domain.

``server`` (the event loop, which owns the parts below and maps each message
type to one of their methods), ``inbox`` (reading messages, handing them
to the parts), ``outbox`` (sends, replies in order, drops),
``admission`` (accept, hello), ``workers`` (regions, ghosts), ``inflight``
(merge and unmerge requests in flight), ``replies`` (workers' answers to
them), ``mergenow`` (merge_now calls), ``unmergeall`` (run=2), ``waits``
(waits for full_scans), ``pacing`` (when the next batch runs), ``surface``
(controls and statistics as served), ``activation`` (a listening socket
passed by systemd), ``peers`` (connections and ghosts), ``quotas`` (caps per
uid), ``security`` (vetting what peers send), ``activity`` (what ``-v``
logs), ``metrics`` (Prometheus), and ``scan/`` (the algorithm).
Importing this package imports none of them: tools stay light.
"""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
