"""The host process that runs the simulator: keep freed memory for the next allocation.

Pricing a move or running a kernel allocates and frees arrays of megabytes many times a
second. By default glibc hands freed memory above a small threshold back to the operating
system, and the next allocation of that size touches every page again (a fault per 4 KiB
page, slow in a virtual machine): about a third of a dry run's host time. Raising the trim
and mmap thresholds keeps up to ``TRIM_BYTES`` of freed memory in the process for reuse.
Only host time changes; nothing the simulator computes does. A host without glibc keeps
its allocator's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
TRIM_BYTES = 512 << 20  # freed memory kept before it is returned to the system
MMAP_BYTES = 64 << 20  # allocations below this come from the reusable heap


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as the module docstring says; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES))
