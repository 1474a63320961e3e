"""A process that opens a vault fixes glibc's mmap threshold: freed index objects leave no heap behind."""

from __future__ import annotations

import subprocess
import sys

from raksha.vault import malloc

# Index objects of 5 MB decoded a few at a time while the chunk table grows in small pieces, as
# loading a large vault's index does; prints how much the RSS grew (MB) once the objects are freed.
LOAD = """
import sys
from raksha.vault import malloc
if sys.argv[1] == "fixed":
    assert malloc.fix_mmap_threshold() and malloc.fix_mmap_threshold()
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10
before = rss()
table, objects = [], []
for i in range(40):
    objects.append(bytearray(5 << 20))
    if len(objects) > 3:
        objects.pop(0)
    table.append(bytearray(64 << 10))
objects.clear()
print(rss() - before)
"""


def grown_mb(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", LOAD, mode], check=True, capture_output=True,
                              text=True).stdout)


def test_freed_index_objects_leave_the_rss_once_the_threshold_is_fixed() -> None:
    fixed, default = grown_mb("fixed"), grown_mb("default")
    assert fixed < 12  # the table's 2.5 MB, and allocator slack
    assert default > fixed + 10  # glibc's own threshold kept freed 5 MB objects in the heap
    assert malloc.THRESHOLD > 2 << 20  # above a 2 MiB pack read and a 1 MiB chunk's blob: those stay heap


CHURN = """
import resource, sys
from raksha.vault import malloc
if sys.argv[1] == "fixed":
    assert malloc.fix_mmap_threshold()
for _ in range(20):  # warm up
    b"x" * (1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    b"x" * (1 << 20)  # a chunk-sized buffer, written, freed at once, as the hot loops make them
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_chunk_sized_buffers_reuse_the_heap_instead_of_faulting_it_in_again() -> None:
    """A fixed mmap threshold would leave glibc's trim threshold at 128 KiB: the heap given back after
    every chunk and faulted in for the next (a restore took 240,000 page faults instead of 27,000)."""
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", CHURN, mode], check=True, capture_output=True,
                                  text=True).stdout)

    assert faults("fixed") < 200 * 256 // 10  # a tenth of faulting every page of every buffer
