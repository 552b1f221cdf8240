"""The coordinator's inbox: messages read off connections and handed to the parts.

``Inbox`` is the part of the server (``server.py``) that reads what peers
send; it runs in the coordinator's single thread.

* A readable connection is drained whole (not one message per wakeup): what
  a worker sent before a client's ``wait`` is settled before the next batch
  runs, so the scans that wait counts see that advice.
* Each peer's messages are rate limited (``max_msgs_per_sec``, burst
  ``max_msgs_burst``: ``security.TokenBucket``).
* A peer's first message, its hello, goes to ``Admission``; every later one
  to the handler its role's table names for its type (``worker_messages``,
  ``client_messages``, built by the server: message type -> a bound method
  of the part that handles it).  A type the table does not name is an
  offence.
* Every message is untrusted: a bad one (``ProtocolError``, ``ValueError``,
  ``OSError``, ``MemoryError`` from its handler), or a bug of ours while
  handling it, closes that connection with a logged reason, the descriptors
  it carried closed; everyone else keeps being served.
* A client held by a request answered later (``Outbox.hold``) has what it
  sends meanwhile queued (at most ``MAX_QUEUED_REQUESTS``), and handled in
  order once that reply is sent (``resume_held``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shmdedup._shm import close_fds
from shmdedup.errors import DescriptorShortageError, ProtocolError
from shmdedup.coordinator.admission import Admission
from shmdedup.coordinator.outbox import Outbox
from shmdedup.coordinator.peers import Peer

log: logging.Logger = logging.getLogger("shmdedup.coordinator")

MAX_QUEUED_REQUESTS = 64        # requests a client may send behind one still unanswered

# A message handler: (peer, message, its descriptors) -> None.
Handler = Callable[[Peer, dict[str, Any], list[int]], None]


class Inbox:
    """Reading, queueing and dispatching peers' messages."""

    def __init__(self, controls: dict[str, int], outbox: Outbox, admission: Admission,
                 worker_messages: dict[str, Handler], client_messages: dict[str, Handler]) -> None:
        self.controls = controls
        self.outbox = outbox
        self.admission = admission
        self.worker_messages = worker_messages
        self.client_messages = client_messages

    def readable(self, peer: Peer) -> None:
        """Take every message queued on this connection, in order.

        Draining the whole queue (not one message per wakeup) means that what
        a worker sent before a client's ``wait`` is settled before the next
        batch runs, so the scans that wait counts see that advice.  A client
        whose request awaits its reply is *held* (``Outbox.hold``): what it sends
        meanwhile is queued, and handled in order once that reply is sent."""
        while not peer.conn.closed and not self.outbox.dropping(peer):
            got = self._read_one(peer)
            if got is None:
                return
            msg, fds = got
            if peer.held:
                if len(peer.queued) >= MAX_QUEUED_REQUESTS:
                    close_fds(fds)
                    self.outbox.drop(peer, f"more than {MAX_QUEUED_REQUESTS} requests "
                                     f"outstanding (behind a wait or run=2)")
                    return
                peer.queued.append((msg, fds))
            else:
                self._handle(peer, msg, fds)

    def _read_one(self, peer: Peer) -> tuple[dict[str, Any], list[int]] | None:
        """One message off the connection, or None (nothing queued, or the
        connection is being dropped: the reason is scheduled)."""
        try:
            got = peer.conn.recv(timeout=0)
        except TimeoutError:
            return None
        except DescriptorShortageError as e:
            # Our shortage: a registration gets a clean refusal (Workers.on_register
            # sees its fds missing); fds on any other message do not belong.
            if e.message is None or e.message["t"] != "register":
                self.outbox.drop(peer, f"bad message: fds attached to a "
                                 f"{e.message and e.message['t']} message")
                return None
            got = (e.message, [])
        except ProtocolError as e:
            self.outbox.drop(peer, f"bad message: {e}")
            return None
        except ConnectionResetError:
            self.outbox.drop(peer, "")  # a worker exiting with a message unread
            return None
        except OSError as e:
            self.outbox.drop(peer, f"receive failed: {e}")
            return None
        if got is None:
            self.outbox.drop(peer, "")
            return None
        msg, fds = got
        if peer.bucket and not peer.bucket.take(self.controls["max_msgs_per_sec"],
                                                self.controls["max_msgs_burst"]):
            close_fds(fds)
            self.outbox.drop(peer, f"more than {self.controls['max_msgs_per_sec']} messages/s "
                             f"(burst {self.controls['max_msgs_burst']})")
            return None
        return msg, fds

    def _handle(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        try:
            self.dispatch(peer, msg, fds)
        except (ProtocolError, ValueError, OSError, MemoryError) as e:
            close_fds(fds)
            self.outbox.drop(peer, f"bad {msg.get('t')} message: {e}")
        except Exception as e:  # a bug of ours must not take the whole domain down
            log.error("internal error on a %s message of pid %d", msg.get("t"), peer.pid,
                      exc_info=True)
            close_fds(fds)
            self.outbox.drop(peer, f"internal error: {type(e).__name__}: {e}")

    def dispatch(self, peer: Peer, msg: dict[str, Any], fds: list[int]) -> None:
        """Hand a message to the part that handles it (errors: see ``_handle``)."""
        if peer.role is None:
            self.admission.on_hello(peer, msg)
            return
        handlers = self.worker_messages if peer.role == "worker" else self.client_messages
        handler = handlers.get(msg["t"])
        if handler is None:
            raise ProtocolError(f"a {peer.role} may not send {msg['t']}")
        handler(peer, msg, fds)

    def resume_held(self) -> None:
        """Handle what held clients sent meanwhile, now their reply is sent."""
        while self.outbox.resumable:
            peer = self.outbox.resumable.pop(0)
            while peer.queued and not peer.held and not peer.conn.closed \
                    and not self.outbox.dropping(peer):
                msg, fds = peer.queued.pop(0)
                self._handle(peer, msg, fds)
            self.outbox.flush()


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__: list[str] = []
