"""A manifest's chunk ids, 32 bytes a chunk, in one buffer or, for a large disk, a temporary file.

A list of 32-byte ``bytes`` objects costs about 73 bytes a chunk: 77 MB for the million chunks of a
1 TiB disk, before the copies encoding and decoding make. One buffer keeps it at 32. A disk of 32 GiB
and more (at 1 MiB chunks) keeps its ids in an unnamed temporary file (``$TMPDIR``, gone with the
process), read and written in place: the page cache holds them, not the process, so a backup or
restore of a disk of any size and any density takes the same memory. A sparse disk's zero ids are
holes in that file: never written, never read from the device.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import IO, overload

from raksha.vault.format.constants import ID_SIZE, ZERO_ID
from raksha.vault.format.scratch import read_at, scratch_file, truncate, write_at

_ROW = struct.Struct(f"{ID_SIZE}s")
_FILED = 1 << 20  # ids this large (a 32 GiB disk's at 1 MiB chunks) live in a temporary file
_PIECE = 64 << 10  # read and written in pieces of 2048 ids
ZERO_PIECE = bytes(_PIECE)  # a piece of zero ids (holes): compared with at C speed
_WHAT = "the chunk ids of a large disk"


def ids_in(piece: memoryview | bytes) -> Iterator[bytes]:
    """The ids of a piece of whole ids (one of ``ChunkIds.pieces``), at C speed."""
    return map(operator.itemgetter(0), _ROW.iter_unpack(piece))


class ChunkIds:
    """A fixed-length sequence of chunk ids (``bytes`` of 32): a ``bytearray``, or a temporary file.

    Thread-safe for setting distinct indexes (a backup's workers each set their chunks' ids)."""

    __slots__ = ("_buf", "_count", "_file")
    _buf: bytearray | None
    _file: IO[bytes] | None  # for a large list: the ids at offset 32 x index; unwritten ones are holes

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self._file = None
        self._buf = bytearray(b"".join(ids))
        if len(self._buf) % ID_SIZE:
            raise ValueError("chunk ids must be 32 bytes each")
        self._count = len(self._buf) // ID_SIZE

    @classmethod
    def zeros(cls, count: int) -> ChunkIds:
        """``count`` zero ids; in a temporary file when large (holes: nothing written or held)."""
        out = cls()
        out._count = count
        if count * ID_SIZE >= _FILED:
            out._buf = None
            out._file = scratch_file(_WHAT)  # closed with this object
            truncate(out._file, count * ID_SIZE, _WHAT)
        else:
            out._buf = bytearray(count * ID_SIZE)
        return out

    @property
    def in_file(self) -> bool:
        return self._file is not None

    def _write(self, pos: int, data: bytes | memoryview) -> None:
        if self._file is None:
            assert self._buf is not None
            self._buf[pos : pos + len(data)] = data
            return
        write_at(self._file, data, pos, _WHAT)

    def _read(self, pos: int, n: int) -> bytes | memoryview:
        if self._file is None:
            assert self._buf is not None
            return memoryview(self._buf)[pos : pos + n]
        return read_at(self._file, n, pos, _WHAT)

    def fill(self, read_into: Callable[[memoryview], None]) -> None:
        """Replace every id with what ``read_into`` reads (in order, into the views it is given); in a file,
        pieces of zero ids are not written (they are holes already)."""
        size = self._count * ID_SIZE
        piece = memoryview(bytearray(_PIECE))
        for start in range(0, size, _PIECE):
            n = min(_PIECE, size - start)
            read_into(piece[:n])
            if self._file is None or piece[:n] != ZERO_PIECE[:n]:
                self._write(start, piece[:n])

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[memoryview | bytes]:
        """The ids from chunk ``start`` to ``end`` as consecutive buffers of whole ids (at most 2048),
        each valid until the next is asked for."""
        pos = start * ID_SIZE
        last = self._count * ID_SIZE if end is None else min(end * ID_SIZE, self._count * ID_SIZE)
        while pos < last:
            stop = min((pos // _PIECE + 1) * _PIECE, last)
            yield self._read(pos, stop - pos)
            pos = stop

    def ids(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The ids from chunk ``start`` to ``end``."""
        for piece in self.pieces(start, end):
            yield from ids_in(piece)

    def __len__(self) -> int:
        return self._count

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
        return bytes(self._read(index * ID_SIZE, ID_SIZE))

    def __setitem__(self, index: int, cid: bytes) -> None:
        if len(cid) != ID_SIZE or not 0 <= index < len(self):
            raise IndexError("chunk index out of range, or not a 32-byte id")
        self._write(index * ID_SIZE, cid)

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

    def resized(self, count: int) -> ChunkIds:
        """The first ``count`` ids (zero ids appended past the end)."""
        out = ChunkIds.zeros(count)
        pos = 0
        for piece in self.pieces(0, count):
            if out._file is None or piece != ZERO_PIECE[: len(piece)]:
                out._write(pos, piece)
            pos += len(piece)
        return out
