"""The ids a backup has stored so far, in memory that does not grow with the disk.

A backup must know every chunk it stored itself (a chunk seen twice in one disk is stored once), and an
``IdSet`` of them grows ~58 bytes a chunk: 60 MB for a dense 1 TiB disk. Here the newest RUN ids are an
``IdSet``; older ones are sorted into runs in an unnamed temporary file (``$TMPDIR``), found through a
Bloom filter over all of them (10 bits an id: 1% false positives) and, on a hit, one read per run located
by fence keys kept in memory (8 bytes per FENCE ids). A dense 1 TiB disk: ~2 MB in all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import IO

from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import ID_SIZE
from raksha.vault.format.scratch import read_at, scratch_file, write_at

RUN = 1 << 16  # ids held in memory before they become a sorted run in the file (~4 MB of IdSet)
FENCE = 128  # ids per fence: a lookup in a run reads one block of FENCE ids (4 KiB)
_BITS_PER_ID = 10
_HASHES = 7
_WHAT = "the ids this backup stored"


@dataclass
class _Run:
    offset: int  # in the file
    count: int
    fences: list[bytes] = field(default_factory=list)  # the first 8 bytes of every FENCE-th id


class SeenIds:
    """A set of chunk ids that only grows: ``add``, ``in``, ``len``. Not thread-safe (the backup adds and
    asks under its own lock). ``expected``: at most how many ids will be added (sizes the filter)."""

    def __init__(self, expected: int) -> None:
        self._recent = IdSet()
        self._runs: list[_Run] = []
        self._file: IO[bytes] | None = None
        self._size = 0  # bytes written to the file
        self._count = 0
        bits = 1 << max(16, (max(1, expected) * _BITS_PER_ID - 1).bit_length())
        self._mask = bits - 1
        self._bloom: bytearray | None = None  # made at the first spill: a small backup never needs it
        self._bloom_bytes = bits // 8

    def __len__(self) -> int:
        return self._count

    def add(self, cid: bytes) -> bool:
        """Add ``cid`` unless it is in already; whether it was new (one lookup for the caller's two)."""
        if cid in self:
            return False
        self._recent.add(cid)
        self._count += 1
        if len(self._recent) >= RUN:
            self._spill()
        return True

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, bytes):
            return False
        if cid in self._recent:
            return True
        if self._bloom is None or not self._maybe(cid):
            return False
        return any(self._in_run(run, cid) for run in self._runs)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _positions(self, cid: bytes) -> list[int]:
        # Ids are hashes: two 64-bit pieces of one give every position (double hashing).
        h1, h2 = int.from_bytes(cid[:8], "little"), int.from_bytes(cid[8:16], "little") | 1
        return [(h1 + i * h2) & self._mask for i in range(_HASHES)]

    def _maybe(self, cid: bytes) -> bool:
        bloom = self._bloom
        assert bloom is not None
        return all(bloom[p >> 3] >> (p & 7) & 1 for p in self._positions(cid))

    def _spill(self) -> None:
        ids = sorted(self._recent)
        if self._file is None:
            self._file = scratch_file(_WHAT)  # closed by close(), or with this object
            self._bloom = bytearray(self._bloom_bytes)
        bloom = self._bloom
        assert bloom is not None
        for cid in ids:
            for p in self._positions(cid):
                bloom[p >> 3] |= 1 << (p & 7)
        data = b"".join(ids)
        write_at(self._file, data, self._size, _WHAT)
        self._runs.append(_Run(self._size, len(ids), [ids[i][:8] for i in range(0, len(ids), FENCE)]))
        self._size += len(data)
        self._recent = IdSet()

    def _in_run(self, run: _Run, cid: bytes) -> bool:
        block = bisect.bisect_right(run.fences, cid[:8]) - 1
        if block < 0:
            return False
        # Ids sharing their first 8 bytes may straddle a fence: look in the block before too (never, in
        # practice: 2^-64 a pair).
        first = block
        while first > 0 and run.fences[first] == cid[:8]:
            first -= 1
        start = first * FENCE
        count = min(run.count, (block + 1) * FENCE) - start
        assert self._file is not None
        data = read_at(self._file, count * ID_SIZE, run.offset + start * ID_SIZE, _WHAT)
        ids = [data[i : i + ID_SIZE] for i in range(0, len(data), ID_SIZE)]
        i = bisect.bisect_left(ids, cid)
        return i < len(ids) and ids[i] == cid
