"""The tools wing: clients of a coordinator and ways to start one.

``client`` (the control connection), ``embedded`` (the in-process or child
coordinator an application starts), ``cli``, ``top``, ``demo``, ``pytest_plugin``.
None of them imports the coordinator's server unless it starts one.
"""


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
