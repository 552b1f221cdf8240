"""The coordinator's outbox: sends that never block, replies in order, drops.

One ``Outbox`` is shared by every part of the server (``server.py``): it is
how they all talk to peers, and how any of them gives up on one.  It runs in
the coordinator's single thread.

* **Sends never block.**  Peer sockets are non-blocking.  A message the socket
  cannot take now waits, encoded and with its fds, in the peer's
  ``SendQueue`` (``peers.py``) and goes out in order when the socket turns
  writable; SEQPACKET sends a message whole or not at all, so framing and
  SCM_RIGHTS stay intact.  A peer whose queue would pass
  ``OUTBOX_MAX_MESSAGES`` or ``OUTBOX_MAX_BYTES`` has stopped reading: it is
  dropped, never waited for.  So is one whose message would take what waits
  for all its uid's peers past ``OUTBOX_MAX_BYTES_PER_UID``, or, for a uid
  other than the coordinator's, what waits for all other uids' peers past
  ``OUTBOX_MAX_BYTES_OTHERS``: connections that each stay under their own
  cap must not add up to gigabytes of the coordinator's memory.
  Descriptors queued for a peer are charged to its uid (``quotas.py``).
* **One reply per request, in order.**  Every client request gets exactly
  one ``reply``, while its connection lives.  A request answered later (a
  wait for full_scans, a run=2) *holds* its client: what the client sends
  meanwhile is queued by the server and handled once that reply is sent
  (``unhold`` marks the client ready; the server's loop resumes it).
* **Drops are scheduled**, then done by the server between messages
  (``flush``): a part that finds a peer misbehaving, or a send that fails,
  never tears the connection down under the code that is using it.
"""

from __future__ import annotations

import logging
import os
import selectors
from typing import Any, Callable

from shmdedup import protocol
from shmdedup._shm import close_fds
from shmdedup.errors import ProtocolError
from shmdedup.coordinator.peers import Peer
from shmdedup.coordinator.quotas import Quotas

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

OUTBOX_MAX_MESSAGES = 1024      # per peer: past either, the peer has stopped reading
OUTBOX_MAX_BYTES = 8 << 20
OUTBOX_MAX_BYTES_PER_UID = 64 << 20     # all of one uid's peers together
OUTBOX_MAX_BYTES_OTHERS = 256 << 20     # all peers of uids other than the coordinator's


class Outbox:
    """Sending to peers, replying to clients in order, and dropping peers.

    ``drop_peer(peer, why)`` is the server's: it forgets a connection at once
    (``flush`` calls it for each drop scheduled)."""

    def __init__(self, sel: selectors.BaseSelector, quotas: Quotas,
                 drop_peer: Callable[[Peer, str], None]) -> None:
        self.sel = sel
        self.quotas = quotas
        self._drop_peer = drop_peer
        self.drops: list[tuple[Peer, str]] = []   # (peer, why) to drop at the next flush
        self.resumable: list[Peer] = []           # held clients whose reply was sent
        self.waiting: dict[int, int] = {}         # uid -> bytes queued for its peers
        self.others_waiting = 0                   # bytes queued for other uids' peers

    def _count(self, uid: int, n: int) -> None:
        w = self.waiting.get(uid, 0) + n
        if w:
            self.waiting[uid] = w
        else:
            self.waiting.pop(uid, None)
        if uid != self.quotas.owner:
            self.others_waiting += n

    def _too_much(self, peer: Peer, n: int) -> str | None:
        """Why a message of n more bytes may not wait for ``peer``, or None."""
        box = peer.unsent
        if len(box) >= OUTBOX_MAX_MESSAGES or box.bytes + n > OUTBOX_MAX_BYTES:
            return f"stopped reading: {len(box)} messages ({box.bytes} bytes) wait for it"
        mine = self.waiting.get(peer.uid, 0)
        if mine + n > OUTBOX_MAX_BYTES_PER_UID:
            return (f"stopped reading: {box.bytes} bytes wait for it, {mine} for all of uid "
                    f"{peer.uid}'s connections (at most {OUTBOX_MAX_BYTES_PER_UID})")
        if peer.uid != self.quotas.owner and self.others_waiting + n > OUTBOX_MAX_BYTES_OTHERS:
            return (f"stopped reading: {box.bytes} bytes wait for it, {self.others_waiting} for "
                    f"all other uids' connections (at most {OUTBOX_MAX_BYTES_OTHERS})")
        return None

    def discard(self, peer: Peer) -> int:
        """Forget what waits for a peer that is gone; the fds it carried (closed)."""
        self._count(peer.uid, -peer.unsent.bytes)
        return peer.unsent.clear()

    # -- sending -------------------------------------------------------------

    def send(self, peer: Peer, msg: dict[str, Any], fds: list[int] | None = None,
             own_items: bool = False) -> bool:
        """Send now, or queue behind what is already waiting; never block.
        The caller keeps its *fds* (a queued message carries duplicates).
        ``own_items``: see ``protocol.encode``."""
        if peer.conn.closed:
            return False
        fds = fds or []
        box = peer.unsent
        try:
            data = protocol.encode(msg, len(fds), own_items=own_items)
            if not box and peer.conn.try_send(data, fds):
                return True
        except (BrokenPipeError, ConnectionResetError):
            self.drop(peer, "")   # it went away (a worker exiting): nothing to warn of
            return False
        except (OSError, ProtocolError) as e:
            self.drop(peer, f"send failed: {e}")
            return False
        why = self._too_much(peer, len(data))
        if why is not None:
            self.drop(peer, why)
            return False
        own: list[int] = []
        try:
            for fd in fds:
                own.append(os.dup(fd))
        except OSError as e:
            close_fds(own)
            self.drop(peer, f"cannot queue a message: {e}")
            return False
        if not box:
            self.sel.modify(peer.conn.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
        box.push(data, own)
        self._count(peer.uid, len(data))
        self.quotas.charge(peer.uid, fds=len(own))
        return True

    def writable(self, peer: Peer) -> None:
        """The peer's socket takes messages again: send what waits, in order."""
        box = peer.unsent
        if peer.conn.closed:
            return
        try:
            while box:
                data, fds = box.queue[0]
                if not peer.conn.try_send(data, fds):
                    return
                box.pop()
                self._count(peer.uid, -len(data))
                self.quotas.charge(peer.uid, fds=-len(fds))
        except (BrokenPipeError, ConnectionResetError):
            self.drop(peer, "")
            return
        except OSError as e:
            self.drop(peer, f"send failed: {e}")
            return
        self.sel.modify(peer.conn.fileno(), selectors.EVENT_READ, peer)

    def reply(self, peer: Peer, ok: bool, data: Any = None, error: str = "") -> None:
        """The one reply to a client's request."""
        self.send(peer, {"t": "reply", "ok": ok, "data": data, "error": error[:1000]})

    # -- replies answered later ------------------------------------------------

    def hold(self, peer: Peer) -> None:
        """A request of this client is answered later (a wait, a run=2):
        the server queues what it sends meanwhile, so its replies stay in order."""
        peer.held = True

    def unhold(self, peer: Peer) -> None:
        """The held request is answered: its queued requests are handled
        next (by the server's loop, never from inside the code that sent the
        reply)."""
        if peer.held:
            peer.held = False
            if peer.queued:
                self.resumable.append(peer)

    # -- dropping ------------------------------------------------------------

    def drop(self, peer: Peer, why: str) -> None:
        """Close this connection at the next ``flush``; *why* is logged
        (nothing when empty: the peer simply went away)."""
        if all(p is not peer for p, _ in self.drops):
            self.drops.append((peer, why))

    def dropping(self, peer: Peer) -> bool:
        """Whether this peer is to be dropped: nothing more is read from it."""
        return any(p is peer for p, _ in self.drops)

    def flush(self) -> None:
        """Drop the connections scheduled for it."""
        while self.drops:
            peer, why = self.drops.pop()
            self._drop_peer(peer, why)


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
