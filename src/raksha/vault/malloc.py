"""glibc malloc's mmap threshold, fixed for processes that use a vault.

glibc serves an allocation from its own mmap only above a threshold that it raises, up to 32 MiB,
each time such a block is freed. So after the first index object (5 MB) was freed, the next ones came
from the heap, and with the chunk index grown past them the heap could not shrink: loading a vault of
a million chunks left 26 MB of freed memory in the RSS for the rest of every backup and restore.
A fixed threshold just above the largest buffer of the hot loops (a chunk, its blob, a 2 MiB pack
read) keeps larger transient buffers (index objects, manifests) in mmaps given back when freed, while
the per-chunk allocations stay on the heap: an mmap each would page-fault on every chunk.
"""

from __future__ import annotations

import threading

M_MMAP_THRESHOLD = -3  # mallopt(3) parameter
THRESHOLD = (2 << 20) + (64 << 10)
_done = threading.Event()


def fix_mmap_threshold() -> bool:
    """Set the threshold once per process; False where the C library is not glibc."""
    if _done.is_set():
        return True
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    if ok:
        _done.set()
    return ok
