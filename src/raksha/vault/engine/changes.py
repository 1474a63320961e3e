"""What an incremental is given and reads, in memory that follows neither the disk nor the change's count.

A database's disk can change in hundreds of thousands of scattered extents between two backups. Held as
Python lists, dicts and sets per changed chunk (its ranges, whether it is layered or rebuilt, its parent
blob) that was ~1 KB a chunk: 287 MB for 131,072 changed chunks. Here extents are two arrays (16 bytes
an extent), chunk sets are spans in two arrays (16 bytes a span), and a per-chunk flag is a bit.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator, Sequence

from raksha.vault.format.manifest import Manifest
from raksha.vault.sources.base import Extent, ExtentArray, merge_extents

# Manifests are compared this many chunk ids at a time (16 GiB of disk at 1 MiB chunks).
_COMPARE_STEP = 1 << 14


class ChunkSpans:
    """Indexes of chunks, ascending, held as [first, last] spans: 16 bytes a span instead of 8 a chunk
    (a dense 16 TiB disk's 16 million chunks are one span). Iterable again and again; ``len`` and ``in``
    without iterating."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._firsts, self._lasts = array("Q"), array("Q")
        self._len = 0
        for first, last in spans:
            self._add(first, last)

    def _add(self, first: int, last: int) -> None:
        if self._lasts and first <= self._lasts[-1] + 1:  # touching or overlapping the last span
            if last > self._lasts[-1]:
                self._len += last - self._lasts[-1]
                self._lasts[-1] = last
            return
        self._firsts.append(first)
        self._lasts.append(last)
        self._len += last - first + 1

    @property
    def spans(self) -> int:
        return len(self._firsts)

    def __iter__(self) -> Iterator[int]:
        for first, last in zip(self._firsts, self._lasts, strict=True):
            yield from range(first, last + 1)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int):
            return False
        k = bisect.bisect_right(self._firsts, i) - 1
        return k >= 0 and i <= self._lasts[k]

    def union(self, chunks: Iterable[int]) -> ChunkSpans:
        """These and ``chunks`` (any order), as new spans."""
        extra = sorted(set(chunks))
        out, j = ChunkSpans(), 0
        for first, last in zip(self._firsts, self._lasts, strict=True):
            while j < len(extra) and extra[j] < first:
                out._add(extra[j], extra[j])
                j += 1
            out._add(first, last)
        for i in extra[j:]:
            out._add(i, i)
        return out


    def merged(self, other: ChunkSpans) -> ChunkSpans:
        """These and ``other``'s chunks, as new spans."""
        a = list(zip(self._firsts, self._lasts, strict=True))
        b = list(zip(other._firsts, other._lasts, strict=True))
        return ChunkSpans(sorted(a + b))

    def clipped(self, lo: int, hi: int) -> ChunkSpans:
        """The chunks in [lo, hi)."""
        return ChunkSpans((max(first, lo), min(last, hi - 1))
                          for first, last in zip(self._firsts, self._lasts, strict=True) if first < hi and last >= lo)


def chunks_touching(extents: Sequence[Extent], chunk_size: int, virtual_size: int) -> ChunkSpans:
    """Indexes of the chunks that ``extents`` overlap, ascending, clipped to the disk."""
    out = ChunkSpans()
    for off, length in merge_extents(extents):
        end = min(off + length, virtual_size)
        if end > off:
            out._add(off // chunk_size, (end - 1) // chunk_size)
    return out


class ChangedExtents:
    """The changed extents of a disk, sorted, merged and clipped to it; each chunk's share on demand.
    Extents that arrive that way already as an ``ExtentArray`` (a dirty bitmap's) are used as they are."""

    def __init__(self, extents: Sequence[Extent], chunk_size: int, virtual_size: int) -> None:
        self.chunk_size = chunk_size
        self.count = len(extents)
        self.bytes = sum(n for _, n in extents)  # as given, overlaps and all (what the caller said changed)
        if isinstance(extents, ExtentArray) and _normalized(extents, virtual_size):
            self._extents = extents
            return
        self._extents = ExtentArray()
        for off, length in merge_extents(extents):
            end = min(off + length, virtual_size)
            if end > off:
                self._extents.append(off, end - off)

    def chunks(self) -> ChunkSpans:
        cs = self.chunk_size
        return ChunkSpans((off // cs, (off + n - 1) // cs) for off, n in self._extents)

    def ranges(self, i: int) -> list[Extent]:
        """Chunk ``i``'s changed ranges, relative to its start, in order."""
        start, stop = i * self.chunk_size, (i + 1) * self.chunk_size
        offs, lens = self._extents.offsets, self._extents.lengths
        k = bisect.bisect_right(offs, start) - 1  # the last extent starting at or before the chunk
        if k < 0 or offs[k] + lens[k] <= start:
            k += 1
        out: list[Extent] = []
        while k < len(offs) and offs[k] < stop:
            lo, hi = max(offs[k], start), min(offs[k] + lens[k], stop)
            out.append((lo - start, hi - lo))
            k += 1
        return out


def _normalized(extents: ExtentArray, virtual_size: int) -> bool:
    """In order, apart (not even touching), not empty, inside the disk: what merging would give."""
    end = -1
    for off, n in extents:
        if n <= 0 or off <= end or off + n > virtual_size:
            return False
        end = off + n
    return True


class ChunkFlags:
    """One bit per chunk of a disk: 128 KiB for a million chunks, whatever is set."""

    def __init__(self, n: int) -> None:
        self._bits = bytearray((n + 7) // 8)
        self.count = 0

    def add(self, i: int) -> None:
        if not self._bits[i >> 3] >> (i & 7) & 1:
            self._bits[i >> 3] |= 1 << (i & 7)
            self.count += 1

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and 0 <= i < len(self._bits) * 8 and bool(self._bits[i >> 3] >> (i & 7) & 1)


Ranges = dict[int, list[tuple[int, int]]]  # chunk index -> [start, end) byte ranges inside it


def chunks_to_roll_back(point: Manifest, since: Manifest, dirty: Sequence[Extent]) -> tuple[list[int], Ranges]:
    """What to write so that a disk holding backup ``since`` except in the ``dirty`` extents holds backup
    ``point`` (the disks are of one size and chunk size): the chunks, in order, whose ids or layers
    differ between the two manifests or that ``dirty`` touches; and, for each of the latter that the
    manifests agree on, the ranges inside it that ``dirty`` covers: only those need writing."""
    if (point.chunk_size, point.virtual_size) != (since.chunk_size, since.virtual_size):
        raise ValueError("the two backups are of disks of other sizes or chunk sizes")
    size, end_of_disk = point.chunk_size, point.virtual_size
    differ = set(manifests_differ(point, since))
    parts: Ranges = {}
    for off, length in merge_extents(dirty):
        end = min(off + length, end_of_disk)
        for i in range(off // size, (end - 1) // size + 1 if end > off else off // size):
            if i in differ:
                continue
            start, stop = max(off, i * size) - i * size, min(end, (i + 1) * size) - i * size
            ranges = parts.setdefault(i, [])
            if ranges and ranges[-1][1] >= start:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], stop))
            else:
                ranges.append((start, stop))
    return sorted(differ | parts.keys()), parts


def manifests_differ(a: Manifest, b: Manifest) -> Iterator[int]:
    """The chunks whose content two manifests of one disk size may not agree on (ids or layers differ)."""
    for start in range(0, a.chunk_count, _COMPARE_STEP):
        end = min(start + _COMPARE_STEP, a.chunk_count)
        ids_a, ids_b = list(a.chunk_ids.ids(start, end)), list(b.chunk_ids.ids(start, end))
        if ids_a != ids_b:
            yield from (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True), start) if x != y)
    for i in sorted(set(a.deltas.indexes()) | set(b.deltas.indexes())):
        if a.deltas.get(i, []) != b.deltas.get(i, []):
            yield i
