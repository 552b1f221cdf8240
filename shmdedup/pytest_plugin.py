"""The name this module had before the package was split by role: the plugin
itself is ``shmdedup.tools.pytest_plugin`` (the ``pytest11`` entry point loads
it).  Kept so that ``from shmdedup.pytest_plugin import share`` goes on working;
it registers no hooks, so load the plugin as ``-p shmdedup.tools.pytest_plugin``."""

from shmdedup.tools.pytest_plugin import region_of, share

__all__ = ["region_of", "share"]
