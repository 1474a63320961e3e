"""The two small interfaces the engine reads disks through and writes them through."""

from __future__ import annotations

from typing import Protocol

Extent = tuple[int, int]  # (offset, length) in bytes


class DiskSource(Protocol):
    """A disk being backed up. ``pread`` must be safe to call from several threads at once."""

    path: str
    format: str
    virtual_size: int

    def data_extents(self) -> list[Extent]:
        """Extents that may hold data; everything else reads as zeros (holes, unallocated clusters)."""
        ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class DiskTarget(Protocol):
    """A disk being restored into. Starts all-zero when ``fresh``; ``pwrite`` is thread-safe.

    After ``close``, exactly one of ``commit`` (the disk is complete: make it visible at ``path``)
    or ``discard`` (it is not: remove what a fresh target wrote) is called.
    """

    path: str
    format: str
    fresh: bool

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Sort and coalesce overlapping or touching extents."""
    out: list[Extent] = []
    for off, length in sorted(e for e in extents if e[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out
