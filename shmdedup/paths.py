"""Finding a domain's socket: the one rule workers, clients and tools share.

First match wins: an explicit path, ``$SHMDEDUP_SOCKET`` (unless a domain is
named), then the per-user default for the domain (``protocol.default_socket_path``:
a 0700 directory owned by the user).
"""

from __future__ import annotations

import os

from shmdedup import protocol

ENV_SOCKET = "SHMDEDUP_SOCKET"


def resolve_socket_path(socket_path: str | None = None, domain: str | None = None) -> str:
    """The socket a worker or client should use (see module docstring)."""
    if socket_path:
        return socket_path
    if domain is None and os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    return protocol.default_socket_path(domain or "default")


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
