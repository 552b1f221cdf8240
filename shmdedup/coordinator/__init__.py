"""The coordinator wing: the ksmd of a domain.

``server`` (event loop, connections), ``activation`` (a listening socket
passed by systemd), ``peers`` (connections and ghosts),
``inflight`` (merge and unmerge requests in flight, full-scan waits, run=2),
``surface`` (controls and statistics as served), ``security`` (vetting what
peers send), ``activity`` (what ``-v`` logs), ``metrics`` (Prometheus), and
``scan/`` (the algorithm).
Importing this package imports none of them: tools stay light.
"""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
