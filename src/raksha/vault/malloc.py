"""Memory the vault asks the system for: glibc malloc's mmap threshold, fixed for processes that use a
vault, and the anonymous maps its buffers are.

glibc serves an allocation from its own mmap only above a threshold that it raises, up to 32 MiB,
each time such a block is freed. So after the first index object (5 MB) was freed, the next ones came
from the heap, and with the chunk index grown past them the heap could not shrink: loading a vault of
a million chunks left 26 MB of freed memory in the RSS for the rest of every backup and restore.
A fixed threshold just above the largest buffer of the hot loops (a chunk, its blob, a 2 MiB pack
read) keeps larger transient buffers (index objects, manifests) in mmaps given back when freed, while
the per-chunk allocations stay on the heap: an mmap each would page-fault on every chunk.
"""

from __future__ import annotations

import mmap
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt(3) parameters
THRESHOLD = (2 << 20) + (64 << 10)
# A fixed mmap threshold also stops glibc raising its trim threshold (to twice the mmap one) from the
# default 128 KiB: the heap was then given back after nearly every chunk and faulted in again for the
# next (a restore: 27,000 -> 240,000 page faults, 2.05 -> 2.73 CPU-s). Keep this much free at its top.
TRIM_THRESHOLD = 8 << 20
# glibc gives each thread that allocates its own arena (up to 8 a core), and each keeps what its thread
# freed: a backup's readers, workers and pack threads held ~16 MB more after half a million small layer
# blobs (1 TiB layered bench, in-process: pipeline peak 140 -> 124 MB with one arena). Python allocates
# under its lock, so the threads hardly contend for the shared ones (a full: same time, same CPU).
ARENAS = 2
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
    ok = (bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
          and bool(mallopt(M_ARENA_MAX, ARENAS)))
    if ok:
        _done.set()
    return ok


def anonymous_map(size: int) -> mmap.mmap:
    """A page-aligned buffer of ``size`` bytes, private to this process.

    ``mmap.mmap(-1, size)`` maps shared memory: each page it touches is a shmem page, whose fault and
    release cost the kernel about twice a private page's. An incremental's buffers are touched once
    each, so those faults were a fifth of its CPU (perf, 2026-11-27)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
