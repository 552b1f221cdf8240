"""The coordinator's control and statistics surface.

``ControlSurface`` is the part of the server (``server.py``) that answers
clients' ``set`` and ``stats`` messages (``stats()`` also feeds the metrics
endpoint); it runs in the coordinator's single thread.

* Controls follow Linux KSM's (``controls.py`` lists them and checks values);
  ``set_control`` applies one and passes the scanner's share on to it
  (``apply_scan_controls``).  An explicit ``pages_to_scan`` turns the
  scan-time advisor off, and ``run`` cannot change while a run=2 unmerge is
  in progress.
* Every client request gets exactly one reply, in order: a ``set`` is
  answered at once, except run=2, which ``unmergeall.py`` answers when the
  unmerge ends.
* Only the coordinator's own uid may set controls; allow-listed uids may
  merge and read statistics, and see only their own uid's workers in them,
  as ``/proc/<pid>/ksm_stat`` shows only one's own processes.
* ``stats()`` is KSM's counters (from the scanner) plus the controls, this
  coordinator's identity, one entry per worker and one per uid holding
  something (its quota usage); it reads, never changes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, cast

from shmdedup.controls import check_control
from shmdedup.errors import ControlError
from shmdedup.stats import Stats
from shmdedup.coordinator.activity import Activity
from shmdedup.coordinator.mergenow import MergeNow
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.quotas import Quotas
from shmdedup.coordinator.scan.scanner import Scanner
from shmdedup.coordinator.unmergeall import UnmergeAll


class ControlSurface:
    """``set_control`` and ``stats``, and the client messages that reach them.

    ``wake_scan()`` is the server's: the next batch runs now (a control may
    change what it does).  ``socket_path`` and ``metrics_port`` say where
    this coordinator serves, in its statistics."""

    def __init__(self, controls: dict[str, int], peers: dict[int, Peer], scanner: Scanner,
                 quotas: Quotas, merge_now: MergeNow, unmerge_all: UnmergeAll, outbox: Outbox,
                 activity: Activity, wake_scan: Callable[[], None],
                 socket_path: str, metrics_port: int | None) -> None:
        self.controls = controls
        self.peers = peers
        self.scanner = scanner
        self.quotas = quotas
        self.merge_now = merge_now
        self.unmerge_all = unmerge_all
        self.outbox = outbox
        self.activity = activity
        self.wake_scan = wake_scan
        self.socket_path = socket_path
        self.metrics_port = metrics_port

    # -- client messages --------------------------------------------------

    def on_stats(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        # Like /proc/<pid>/ksm_stat: another uid sees its own processes only,
        # told apart by uid (in a pid namespace every peer's pid reads 0).
        out = self.stats(None if peer.uid == os.getuid() else peer.uid)
        self.outbox.reply(peer, True, out)

    def on_set(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        if peer.uid != os.getuid():
            # Allow-listed uids may merge and read statistics; controls stay ours.
            self.outbox.reply(peer, False, None, f"uid {peer.uid} may not set controls "
                                                 f"(only uid {os.getuid()})")
            return
        try:
            deferred = self.set_control(msg["name"], msg["value"], client=peer)
        except ControlError as e:
            self.outbox.reply(peer, False, None, str(e))
            return
        # Exactly one reply per request: a run=2 answers when its unmerge ends
        # (perhaps already, inside set_control, when nothing was merged).
        if not deferred:
            self.outbox.reply(peer, True, {msg["name"]: self.controls[msg["name"]]})
        elif self.unmerge_all.active:
            self.outbox.hold(peer)      # answered (and released) by UnmergeAll.check

    # -- controls ----------------------------------------------------------

    def apply_scan_controls(self) -> None:
        """Pass the scanner its share of the controls (at start, and after each change)."""
        self.scanner.settings.smart_scan = bool(self.controls["smart_scan"])
        self.scanner.settings.max_page_sharing = self.controls["max_page_sharing"]
        self.scanner.settings.max_kernel_pages = self.controls["max_kernel_pages"]
        self.scanner.settings.use_zero_pages = bool(self.controls["use_zero_pages"])
        self.scanner.settings.zero_pages_only = bool(self.controls["merge_zero_pages_only"])
        self.scanner.settings.max_mappings = self.controls["max_mappings"]
        self.scanner.settings.inline_keep = self.controls["inline_keep_millisecs"] / 1000

    def set_control(self, name: str, value: int, client: Peer | None = None) -> bool:
        """Apply a control.  Returns True when it started a run=2 unmerge,
        which then owns the reply to ``client`` (``UnmergeAll`` sends it when
        the unmerge ends, which may be before this returns)."""
        value = check_control(name, value)
        if name == "run" and self.unmerge_all.active:
            raise ControlError("run: an unmerge (run=2) is still in progress")
        old = self.controls[name]
        self.controls[name] = value
        if name == "pages_to_scan":
            self.controls["advisor_mode"] = 0   # explicit pacing wins
        self.apply_scan_controls()
        self.wake_scan()
        self.activity.control(name, old, value, client)
        if name == "run" and value == 2 and old != 2:
            self.unmerge_all.start(client)
            return True
        return False

    # -- statistics --------------------------------------------------------

    def stats(self, uid: int | None = None) -> Stats:
        """Every control and statistic (``shmdedup.stats.Stats`` names each key);
        with ``uid``, the worker lines and quota usage of that uid only."""
        out: dict[str, Any] = dict(self.controls)
        peers = [p for p in self.peers.values()
                 if p.role == "worker" and (uid is None or p.uid == uid)]
        counters, per_worker = self.scanner.counters(peers)   # one pass over the regions
        out.update(counters)
        out["pages_merged_inline"] = self.merge_now.pages_merged
        out["merge_now_cpu_usecs"] = self.merge_now.cpu_ns // 1000
        out["last_error"] = self.unmerge_all.last_error
        out["coordinator_pid"] = os.getpid()
        out["socket"] = self.socket_path
        if self.metrics_port is not None:
            out["metrics_port"] = self.metrics_port
        workers = []
        for peer in peers:
            w = {"pid": peer.pid, "regions": len(peer.regions), "pages": peer.pages,
                 "requests": len(peer.requests),   # merges and unmerges in flight
                 "pages_merged_inline": peer.merged_inline}
            w.update(per_worker[peer])
            workers.append(w)
        out["workers"] = workers
        # Quotas per uid (quotas.py): what each uid's peers and ghosts hold.
        out["uids"] = self.quotas.stats(uid)
        out["fds_held"] = self.quotas.total.fds
        out["fds_budget"] = self.quotas.max_fds()
        # Assembled from the controls and the scanner's counters, as dicts:
        # tests/test_typing.py checks its keys and types against Stats.
        return cast(Stats, out)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
