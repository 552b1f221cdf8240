"""The scan's settings: the controls the scanner and its collaborators read.

One :class:`ScanSettings` per scanner, shared by reference: the scanner
(``smart_scan``, ``inline_keep``), the matcher and the inliner
(``max_page_sharing``, ``use_zero_pages``, ``zero_pages_only``), the stable
index (``max_kernel_pages``) and the mapping budget (``max_mappings``) all
hold the same object, so a control the coordinator sets (``surface.py``
fills it) is seen by every part at its next read, between two batches (the
coordinator runs in one thread).  Values are checked before they get here
(``controls.check_control``); the defaults are the controls' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from shmdedup.controls import CONTROLS


@dataclass
class ScanSettings:
    """The scan's share of the controls (``controls.CONTROLS`` names and checks them)."""

    smart_scan: bool = bool(CONTROLS["smart_scan"][0])   # skip pages that keep failing to merge
    max_page_sharing: int = CONTROLS["max_page_sharing"][0]   # most sharers of one stable page
    max_kernel_pages: int = CONTROLS["max_kernel_pages"][0]   # most stable pages in use; 0: no cap
    use_zero_pages: bool = bool(CONTROLS["use_zero_pages"][0])   # zero pages onto the zero page
    zero_pages_only: bool = bool(CONTROLS["merge_zero_pages_only"][0])   # no stable page at all
    max_mappings: int = CONTROLS["max_mappings"][0]   # each worker's mapping budget (budget.py)
    inline_keep: float = CONTROLS["inline_keep_millisecs"][0] / 1000   # seconds a merge_now page is kept


# Internal to shmdedup: no public names (the API is shmdedup.__all__).
__all__ = []
