"""Exceptions of shmdedup.

One base class; every subclass also inherits the builtin that fits, so callers
can catch either (``except ValueError`` works for a bad argument, ``except
shmdedup.Error`` for anything of ours).
"""


class Error(Exception):
    """Base class of every exception shmdedup raises on purpose."""


class ArgumentError(Error, ValueError):
    """A bad argument: wrong size, offset, type or range."""


class RegionClosedError(Error, ValueError):
    """The region was closed (or belongs to the parent of a fork)."""


class ProtocolError(Error, ValueError):
    """A malformed, oversized, out-of-order or hostile protocol message."""


class PeerRejectedError(Error, PermissionError):
    """The peer's credentials (SO_PEERCRED) are not allowed in this domain."""


class CoordinatorUnavailableError(Error, ConnectionError):
    """No coordinator answers on the domain's socket."""


class ControlError(Error, ValueError):
    """An unknown control name or an out-of-range value."""


class ShmError(Error, OSError):
    """A shared-memory object could not be created, sized or opened."""


class DescriptorShortageError(Error, OSError):
    """This process ran out of descriptors: the kernel dropped descriptors that
    came with a message (``message`` holds the message, checked, or None)."""

    message: dict | None = None


class FormatError(Error, ValueError):
    """A file's header is malformed or describes data shmdedup cannot hold (.npy, safetensors)."""


class ShortFileError(Error, EOFError):
    """A file holds fewer bytes than the read asked for (known before reading)."""


class FileChangedError(Error, OSError):
    """A file changed (size, mtime or ctime) while it was being read: its bytes may be a mix."""
