"""A manifest's chunk ids in one buffer, 32 bytes a chunk.

A list of 32-byte ``bytes`` objects costs about 73 bytes a chunk: 77 MB for the million chunks of a
1 TiB disk, before the copies encoding and decoding make. One buffer keeps it at 32, and a large one
is an anonymous map whose pages of zero ids are never touched: a sparse disk's zero chunks (most of a
1 TiB disk with little data) take no memory at all.
"""

from __future__ import annotations

import mmap
import operator
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import overload

from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import ID_SIZE, ZERO_ID

_ROW = struct.Struct(f"{ID_SIZE}s")
_MAPPED = 1 << 20  # buffers this large are anonymous maps (a 32 GiB disk's ids at 1 MiB chunks)
_PIECE = 64 << 10  # ``fill`` reads in pieces of 2048 ids
_ZERO_PIECE = bytes(_PIECE)


class ChunkIds:
    """A fixed-length sequence of chunk ids (``bytes`` of 32) over one ``bytearray``."""

    __slots__ = ("_buf", "_written")
    _buf: bytearray | mmap.mmap
    # For a map: which pieces of _PIECE bytes were ever written (a byte each). The others hold zero ids
    # and are never read either: reading a page of an anonymous map makes it count in the RSS too.
    _written: bytearray | None

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self._written = None
        self._buf = bytearray(b"".join(ids))
        if len(self._buf) % ID_SIZE:
            raise ValueError("chunk ids must be 32 bytes each")

    @classmethod
    def zeros(cls, count: int) -> ChunkIds:
        """``count`` zero ids; pages nothing writes stay unallocated."""
        out = cls()
        if count * ID_SIZE >= _MAPPED:
            out._buf = mmap.mmap(-1, count * ID_SIZE)
            out._written = bytearray(-(-count * ID_SIZE // _PIECE))
        else:
            out._buf = bytearray(count * ID_SIZE)
        return out

    def fill(self, read_into: Callable[[memoryview], None]) -> None:
        """Replace every id with what ``read_into`` reads (in order, into the views it is given), writing
        only the pieces that are not all zero ids: those pages of a fresh ``zeros`` stay untouched."""
        view = memoryview(self._buf)
        piece = memoryview(bytearray(_PIECE))
        for start in range(0, len(view), _PIECE):
            n = min(_PIECE, len(view) - start)
            read_into(piece[:n])
            if piece[:n] != _ZERO_PIECE[:n] or self._touched(start):
                view[start : start + n] = piece[:n]
                if self._written is not None:
                    self._written[start // _PIECE] = 1

    def _touched(self, start: int) -> bool:
        return self._written is None or bool(self._written[start // _PIECE])

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[memoryview | bytes]:
        """The ids from chunk ``start`` to ``end`` as consecutive buffers, each whole ids; pieces never
        written come from a constant, not the map."""
        first, last = start * ID_SIZE, len(self._buf) if end is None else min(end * ID_SIZE, len(self._buf))
        view = memoryview(self._buf)
        pos = first
        while pos < last:
            stop = min((pos // _PIECE + 1) * _PIECE, last)
            yield view[pos:stop] if self._touched(pos) else _ZERO_PIECE[: stop - pos]
            pos = stop

    def ids(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The ids from chunk ``start`` to ``end``."""
        for piece in self.pieces(start, end):
            yield from map(operator.itemgetter(0), _ROW.iter_unpack(piece))

    def __len__(self) -> int:
        return len(self._buf) // ID_SIZE

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("chunk index out of range")
        if not self._touched(index * ID_SIZE):
            return ZERO_ID
        return bytes(self._buf[index * ID_SIZE : (index + 1) * ID_SIZE])

    def __setitem__(self, index: int, cid: bytes) -> None:
        if len(cid) != ID_SIZE or not 0 <= index < len(self):
            raise IndexError("chunk index out of range, or not a 32-byte id")
        self._buf[index * ID_SIZE : (index + 1) * ID_SIZE] = cid
        if self._written is not None:
            self._written[index * ID_SIZE // _PIECE] = 1

    def __iter__(self) -> Iterator[bytes]:
        return self.ids()  # C speed per piece: ~50 ms a million

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkIds):
            return len(self) == len(other) and all(
                a == b for a, b in zip(self.pieces(), other.pieces(), strict=True))
        if isinstance(other, list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ChunkIds({len(self)} ids, {self.count(ZERO_ID)} zero)"

    def count(self, cid: bytes) -> int:
        return sum(map(cid.__eq__, self))

    def distinct(self) -> IdSet:
        """The ids, each once, in a compact set (a ``set[bytes]`` of a 1 TiB disk's ids takes 100 MB)."""
        return IdSet(self)

    def resized(self, count: int) -> ChunkIds:
        """The first ``count`` ids (zero ids appended past the end)."""
        out = ChunkIds.zeros(count)
        for i, cid in enumerate(self.ids(0, count)):
            if cid != ZERO_ID:
                out[i] = cid
        return out
