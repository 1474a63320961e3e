"""The two small interfaces the engine reads disks through and writes them through."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, overload

Extent = tuple[int, int]  # (offset, length) in bytes


class ExtentArray(Sequence[Extent]):
    """Extents in two arrays: 16 bytes each instead of ~120 as a list of tuples (a dirty bitmap after a
    day of a database's scattered writes has hundreds of thousands of them)."""

    __slots__ = ("_lengths", "_offsets")

    def __init__(self, extents: Iterable[Extent] = ()) -> None:
        self._offsets, self._lengths = array("Q"), array("Q")
        for off, length in extents:
            self.append(off, length)

    @property
    def offsets(self) -> array[int]:
        return self._offsets

    @property
    def lengths(self) -> array[int]:
        return self._lengths

    def append(self, offset: int, length: int) -> None:
        self._offsets.append(offset)
        self._lengths.append(length)

    def append_joined(self, offset: int, length: int) -> None:
        """``append``, or lengthen the last extent when this one starts where it ends."""
        if self._offsets and self._offsets[-1] + self._lengths[-1] == offset:
            self._lengths[-1] += length
        else:
            self.append(offset, length)

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, k: int) -> Extent: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[Extent]: ...
    def __getitem__(self, k: int | slice) -> Extent | Sequence[Extent]:
        if isinstance(k, slice):
            return [(self._offsets[j], self._lengths[j]) for j in range(*k.indices(len(self)))]
        return self._offsets[k], self._lengths[k]

    def __iter__(self) -> Iterator[Extent]:
        return zip(self._offsets, self._lengths, strict=True)


class DiskSource(Protocol):
    """A disk being backed up. ``pread`` must be safe to call from several threads at once."""

    path: str
    format: str
    virtual_size: int

    def data_extents(self) -> Sequence[Extent]:
        """Extents that may hold data; everything else reads as zeros (holes, unallocated clusters)."""
        ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class InPlaceTarget(Protocol):
    """An existing disk written in place (``pwrite`` thread-safe): what is not written stays as it was."""

    path: str
    format: str

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class DiskTarget(InPlaceTarget, Protocol):
    """A disk being restored into. Starts all-zero when ``fresh``; ``pwrite`` is thread-safe.

    After ``close``, exactly one of ``commit`` (the disk is complete: make it visible at ``path``)
    or ``discard`` (it is not: remove what a fresh target wrote) is called.
    """

    fresh: bool
    takes_views: bool  # pwrite takes memoryviews, and writes page-aligned ones as they are (O_DIRECT)

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def merge_extents(extents: Sequence[Extent]) -> Iterator[Extent]:
    """Sorted, with overlapping or touching extents coalesced (and empty ones dropped). Extents already in
    order, as dirty bitmaps give them, are merged as they come, without a sorted copy of them all."""
    ordered = all(extents[k][0] <= extents[k + 1][0] for k in range(len(extents) - 1))
    items = iter(extents) if ordered else iter(sorted(extents))
    last: Extent | None = None
    for off, length in items:
        if length <= 0:
            continue
        if last is not None and off <= last[0] + last[1]:
            last = (last[0], max(last[1], off + length - last[0]))
            continue
        if last is not None:
            yield last
        last = (off, length)
    if last is not None:
        yield last
