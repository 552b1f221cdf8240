"""shmdedup: Kernel Samepage Merging for POSIX shared memory, without root.

Workers allocate :class:`Region` objects and advise them mergeable; a
:class:`Coordinator` (the ksmd of a domain) merges identical pages onto
read-only stable copies; a write to a merged page gets a private copy back
through a SIGSEGV copy-on-write trap.
"""

import sys as _sys

if not _sys.platform.startswith("linux"):
    raise ImportError("shmdedup needs Linux (POSIX shared memory, fallocate and a SIGSEGV trap)")

from shmdedup.errors import (  # noqa: E402
    ArgumentError,
    ControlError,
    CoordinatorUnavailableError,
    Error,
    FileChangedError,
    FormatError,
    PeerRejectedError,
    ProtocolError,
    RegionClosedError,
    ShmError,
    ShortFileError,
)
from shmdedup.worker.region import MERGEABLE, PAGE_SIZE, UNMERGEABLE, Region, cow_fault_around  # noqa: E402
from shmdedup.tools.client import Client  # noqa: E402
from shmdedup.tools.embedded import Coordinator  # noqa: E402
from shmdedup.worker.agent import enable_process_merging, process_merging, set_socket  # noqa: E402
from shmdedup.worker.loading import fill, fromfile, region_of, share  # noqa: E402
from shmdedup.worker.formats import load_npy, load_safetensors  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "Client",
    "ControlError",
    "Coordinator",
    "CoordinatorUnavailableError",
    "Error",
    "FileChangedError",
    "FormatError",
    "MERGEABLE",
    "PAGE_SIZE",
    "PeerRejectedError",
    "ProtocolError",
    "Region",
    "RegionClosedError",
    "ShmError",
    "ShortFileError",
    "UNMERGEABLE",
    "cow_fault_around",
    "enable_process_merging",
    "fill",
    "fromfile",
    "load_npy",
    "load_safetensors",
    "process_merging",
    "region_of",
    "set_socket",
    "share",
]
