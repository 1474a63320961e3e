"""The ids a backup has stored so far, in memory that does not grow with the disk.

A backup must know every chunk it stored itself (a chunk seen twice in one disk is stored once), and an
``IdSet`` of them grows ~58 bytes a chunk: 60 MB for a dense 1 TiB disk. Here the newest RUN ids are an
``IdSet``; older ones are sorted into runs in an unnamed temporary file (``$TMPDIR``), found through a
Bloom filter over all of them (10 bits an id: 1% false positives) and, on a hit, one read per run located
by fence keys kept in memory (8 bytes per FENCE ids). A dense 1 TiB disk: ~2 MB in all.
"""

from __future__ import annotations

from typing import IO

from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.scratch import scratch_file
from raksha.vault.format.sorted_ids import Bloom, SortedRun

RUN = 1 << 16  # ids held in memory before they become a sorted run in the file (~4 MB of IdSet)
_WHAT = "the ids this backup stored"


class SeenIds:
    """A set of chunk ids that only grows: ``add``, ``in``, ``len``. Not thread-safe (the backup adds and
    asks under its own lock). ``expected``: at most how many ids will be added (sizes the filter)."""

    def __init__(self, expected: int) -> None:
        self._recent = IdSet()
        self._runs: list[SortedRun] = []
        self._file: IO[bytes] | None = None
        self._size = 0  # bytes written to the file
        self._count = 0
        self._expected = expected
        self._bloom: Bloom | None = None  # made at the first spill: a small backup never needs it

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
        if self._bloom is None or cid not in self._bloom:
            return False
        file = self._file
        assert file is not None
        return any(run.contains(file, cid, _WHAT) for run in self._runs)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _spill(self) -> None:
        ids = sorted(self._recent)
        if self._file is None:
            self._file = scratch_file(_WHAT)  # closed by close(), or with this object
            self._bloom = Bloom(self._expected)
        bloom = self._bloom
        assert bloom is not None
        for cid in ids:
            bloom.add(cid)
        run = SortedRun.write(self._file, self._size, ids, _WHAT)
        self._runs.append(run)
        self._size += run.size
        self._recent = IdSet()
