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


# What the pool keeps between operations at most: one backup's buffers at the default chunk size (its
# pipeline's 16 MiB, the packer's 8 MiB, the encoders' ~4 MiB) with room to spare.
POOL_LIMIT = 48 << 20


class MapPool:
    """Anonymous maps given back after an operation and handed out again to the next one of the process.

    A fresh map's pages fault in (and are zeroed) as they are first touched, and unmapping them costs
    the kernel again (and other cores, in TLB flushes): in a long-running agent every backup paid that
    for the same ~28 MiB of buffers, 15-20 ms of CPU an incremental of 20 MB (measured 2026-11-29, an
    API incremental 132 -> 111 ms). Only maps of the size asked for are reused; a miss first unmaps
    what the pool holds of other sizes, so what it keeps follows the last kind of operation and the
    process never holds one operation's idle buffers beside another's. Thread-safe.

    Give a map back only when no thread will touch it again: the next ``take`` hands it to another
    operation as it is (its old bytes in it)."""

    def __init__(self, limit: int = POOL_LIMIT) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0

    @property
    def held(self) -> int:
        """Bytes of maps kept for reuse now."""
        return self._bytes

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            same = self._free.get(size)
            if same:
                self._bytes -= size
                return same.pop()
            others = [m for maps in self._free.values() for m in maps]
            self._free.clear()
            self._bytes = 0
        for m in others:
            unmap(m)
        return anonymous_map(size)

    def give(self, *maps: mmap.mmap) -> None:
        for m in maps:
            if m.closed:
                continue
            with self._lock:
                same = self._free.setdefault(len(m), [])
                if any(kept is m for kept in same):
                    continue  # given twice: kept once, or two takers would share it
                keep = self._bytes + len(m) <= self._limit
                if keep:
                    same.append(m)
                    self._bytes += len(m)
            if not keep:
                unmap(m)

    def clear(self) -> None:
        """Unmap everything kept."""
        with self._lock:
            maps = [m for ms in self._free.values() for m in ms]
            self._free.clear()
            self._bytes = 0
        for m in maps:
            unmap(m)


def unmap(m: mmap.mmap) -> None:
    """Close ``m`` now, or, while something still views it, when its last view goes."""
    try:
        m.close()
    except BufferError:
        pass  # still viewed somewhere (a traceback's frame): unmapped when the last view goes


POOL = MapPool()
