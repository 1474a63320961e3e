"""Sets of chunk ids too large for memory: ids sorted in an unnamed temporary file.

A ``SortedRun`` is ids sorted in a region of the file, found through fence keys kept in memory (the
first 8 bytes of every FENCE-th id: 1/16 byte an id), so a lookup reads one block of FENCE ids
(4 KiB) with ``pread``, not through a map, whose pages would count in the process's RSS.

``DiskIdSet`` is a vault's stored ids, which every backup deduplicates against: an ``IdSet`` of them
costs ~45 bytes an id (a vault of 2 million chunks took a backup past 150 MB). Built once from the
index, in partitions by Python's own per-process seeded hash (so ids crafted to share a prefix cannot
pile into one), each sorted in memory alone and written as a run; a lookup reads one block of one
run. ``Bloom`` is the filter ``SeenIds`` puts in front of its runs.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator
from typing import IO

from raksha.vault.format.constants import ID_SIZE
from raksha.vault.format.scratch import Partitions, read_at, scratch_file, write_at

FENCE = 128  # ids per fence: a lookup reads one block of FENCE ids (4 KiB)
PARTITION = 1 << 14  # ids a DiskIdSet partition holds on average, sorted in memory at once (~2 MB)
MAX_PARTITIONS = 1 << 12  # past 64 million ids partitions grow instead: their buffers would
BUFFER_BYTES = 2 << 20  # a DiskIdSet's write buffers while it is built, all partitions together
_BITS_PER_ID = 10
_HASHES = 7


class SortedRun:
    """``count`` distinct ids sorted at ``offset`` of a file, and the fences to find them."""

    __slots__ = ("count", "fence", "fences", "offset")

    def __init__(self, offset: int, count: int, fence: int, fences: array[int]) -> None:
        self.offset, self.count, self.fence, self.fences = offset, count, fence, fences

    @classmethod
    def write(cls, f: IO[bytes], offset: int, ids: list[bytes], what: str) -> SortedRun:
        """Write ``ids`` (sorted, distinct) at ``offset`` of ``f``."""
        write_at(f, b"".join(ids), offset, what)
        fences = array("Q", [int.from_bytes(ids[i][:8], "big") for i in range(0, len(ids), FENCE)])
        return cls(offset, len(ids), FENCE, fences)

    @property
    def size(self) -> int:
        return self.count * ID_SIZE

    def contains(self, f: IO[bytes], cid: bytes, what: str) -> bool:
        return self.find(f, cid, what) >= 0

    def find(self, f: IO[bytes], cid: bytes, what: str) -> int:
        """The id's position in the run (0 to count - 1), or -1."""
        key = int.from_bytes(cid[:8], "big")
        fences = self.fences
        block = bisect.bisect_right(fences, key) - 1
        if block < 0:
            return -1
        # Ids sharing their first 8 bytes may straddle a fence: start at the first block they may be in
        # (never more than one, in practice: 2^-64 a pair).
        first = block
        while first > 0 and fences[first] == key:
            first -= 1
        start = first * self.fence
        count = min(self.count, (block + 1) * self.fence) - start
        at = _find_id(read_at(f, count * ID_SIZE, self.offset + start * ID_SIZE, what), cid)
        return -1 if at < 0 else start + at


def _find_id(data: bytes, cid: bytes) -> int:
    """Which of the ids packed in ``data`` ``cid`` is, or -1: a search in C for its bytes at an id's
    boundary (a Python binary search of a 4 KiB block cost more than the block's read)."""
    pos = data.find(cid)
    while pos >= 0:
        if pos % ID_SIZE == 0:
            return pos // ID_SIZE
        pos = data.find(cid, pos + 1)  # its bytes across two ids: search on
    return -1


class Bloom:
    """A Bloom filter over ids for ``expected`` of them: 10 bits an id, 7 hashes, 1% false positives."""

    def __init__(self, expected: int) -> None:
        bits = 1 << max(16, (max(1, expected) * _BITS_PER_ID - 1).bit_length())
        self._mask = bits - 1
        self._bits = bytearray(bits // 8)

    def _positions(self, cid: bytes) -> list[int]:
        # Ids are hashes: two 64-bit pieces of one give every position (double hashing).
        h1, h2 = int.from_bytes(cid[:8], "little"), int.from_bytes(cid[8:16], "little") | 1
        return [(h1 + i * h2) & self._mask for i in range(_HASHES)]

    def add(self, cid: bytes) -> None:
        bits = self._bits
        for p in self._positions(cid):
            bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, cid: bytes) -> bool:
        bits = self._bits
        return all(bits[p >> 3] >> (p & 7) & 1 for p in self._positions(cid))


class DiskIdSet:
    """A set of chunk ids in a temporary file, built once: ``update`` with every id (about ``expected``
    of them), then ``finish``; then ``in`` and ``len``. ``close`` frees the file (so does losing it)."""

    def __init__(self, expected: int, what: str) -> None:
        self._what = what
        parts = min(MAX_PARTITIONS, 1 << (max(1, -(-expected // PARTITION)) - 1).bit_length())  # a power of two
        self._mask = parts - 1
        self._parts: Partitions | None = Partitions(parts, BUFFER_BYTES, what)
        self._file: IO[bytes] | None = None
        self._runs: list[SortedRun] = []
        self._count = 0

    def update(self, ids: Iterable[bytes]) -> None:
        parts = self._parts
        if parts is None:
            raise ValueError("a DiskIdSet is complete once finished")
        buffers, mask, flush_at = parts.buffers, self._mask, parts.flush_at
        for cid in ids:
            if len(cid) != ID_SIZE:
                raise ValueError("a chunk id is 32 bytes")
            part = hash(cid) & mask
            buf = buffers[part]
            buf += cid
            if len(buf) >= flush_at:
                parts.spill(part)

    def finish(self) -> DiskIdSet:
        """Sort each partition into its run. Returns self."""
        parts = self._parts
        if parts is None:
            return self
        self._parts = None
        self._file = scratch_file(self._what)
        offset = 0
        for part in range(self._mask + 1):
            data = parts.take(part)
            ids = sorted({data[i : i + ID_SIZE] for i in range(0, len(data), ID_SIZE)})
            del data
            run = SortedRun.write(self._file, offset, ids, self._what)
            self._runs.append(run)
            offset += run.size
            self._count += run.count
        parts.close()
        return self

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        """Every id, a run at a time (by run, sorted within it)."""
        if self._file is None:
            raise ValueError("a DiskIdSet answers once finished")
        for run in self._runs:
            data = read_at(self._file, run.size, run.offset, self._what)
            for i in range(0, run.count * ID_SIZE, ID_SIZE):
                yield data[i : i + ID_SIZE]

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, bytes) or len(cid) != ID_SIZE:
            return False
        if self._file is None:
            raise ValueError("a DiskIdSet answers once finished")
        return self._runs[hash(cid) & self._mask].contains(self._file, cid, self._what)

    @property
    def partitions(self) -> int:
        """How many runs the ids are spread over: an id is in run ``hash(id) % partitions`` (a power of
        two), so a caller can spread other records the same way and join them run by run."""
        return self._mask + 1

    def partition_rows(self, part: int) -> dict[bytes, int]:
        """The ids of run ``part`` and their rows (as ``row_of``): one read for many lookups."""
        if self._file is None:
            raise ValueError("a DiskIdSet answers once finished")
        run = self._runs[part]
        data = read_at(self._file, run.size, run.offset, self._what)
        base = run.offset // ID_SIZE
        return {data[i * ID_SIZE : (i + 1) * ID_SIZE]: base + i for i in range(run.count)}

    def row_of(self, cid: bytes) -> int:
        """The id's row (0 to len - 1, by run and order within it), or -1: a key into arrays beside the
        set, as ``IdSet.row_of``."""
        if self._file is None:
            raise ValueError("a DiskIdSet answers once finished")
        run = self._runs[hash(cid) & self._mask]
        at = run.find(self._file, cid, self._what)
        return -1 if at < 0 else run.offset // ID_SIZE + at

    def close(self) -> None:
        if self._parts is not None:
            self._parts.close()
            self._parts = None
        if self._file is not None:
            self._file.close()
            self._file = None
