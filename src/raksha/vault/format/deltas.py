"""A manifest's delta layers (format.md §8.1), kept in their encoded form.

As ``dict[int, list[Layer]]`` a layered chunk cost ~425 bytes (the list, a Layer, its id, its tuples of
ranges); a large disk that took scattered writes carries layers on up to half its chunks (ADR 0011), so
a 256 GiB disk's manifest took 100 MB and a terabyte's would take several hundred. Here a layered chunk
costs its encoding (52 bytes for one layer of one range) and 12 bytes of index: the chunk number and
where its entry starts. Layers are decoded when asked for.

The encoding is format.md §8.1's, entry after entry: chunk index and layer count (``<II``), then per
layer the blob id, the range count (``<I``) and the ranges (``<II`` each). ``encode`` is the count of
entries followed by them, as a manifest stores it.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format.constants import ID_SIZE, ZERO_ID

_LEN = struct.Struct("<I")
_PAIR = struct.Struct("<II")
MAX_DELTA_ITEMS = 65536  # layers per chunk, ranges per layer (format.md §8.1)


@dataclass(frozen=True)
class Layer:
    """One delta layer on a chunk (format.md §8.1): ``blob_id``'s bytes overwrite ``ranges`` in order.

    ``blob_id`` is the zero id when the bytes are all zero (nothing stored)."""

    blob_id: bytes
    ranges: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(n for _, n in self.ranges)


def encode_layers(index: int, layers: Sequence[Layer]) -> bytes:
    """Chunk ``index``'s entry."""
    parts = [_PAIR.pack(index, len(layers))]
    for layer in layers:
        parts.append(layer.blob_id + _LEN.pack(len(layer.ranges)))
        parts.extend(_PAIR.pack(off, n) for off, n in layer.ranges)
    return b"".join(parts)


class Deltas(Mapping[int, list[Layer]]):
    """Chunk index -> its layers, in order; entries are appended in increasing chunk order."""

    __slots__ = ("_base", "_data", "_index", "_offset")

    def __init__(self, items: Mapping[int, Sequence[Layer]] | None = None) -> None:
        # Entries from _base on: a decoded manifest's payload as read (no copy of it), or built here.
        self._data: bytes | bytearray = bytearray()
        self._base = 0
        self._index = array("I")  # chunk numbers, increasing
        self._offset = array("Q")  # where each one's entry starts in _data
        for i in sorted(items or ()):
            assert items is not None
            self.append(i, items[i])

    def append(self, index: int, layers: Sequence[Layer]) -> None:
        self.append_entry(index, encode_layers(index, layers))

    def append_entry(self, index: int, entry: bytes | memoryview) -> None:
        """Add chunk ``index``'s encoded entry (from ``encode_layers``); after every other."""
        if self._index and index <= self._index[-1]:
            raise ValueError("delta entries are added in increasing chunk order")
        if not isinstance(self._data, bytearray):
            self._data = bytearray(self._data)
        self._index.append(index)
        self._offset.append(len(self._data))
        self._data += entry

    def _entry_at(self, k: int) -> memoryview:
        end = self._offset[k + 1] if k + 1 < len(self._offset) else len(self._data)
        return memoryview(self._data)[self._offset[k] : end]

    def _find(self, index: int) -> int:
        k = bisect.bisect_left(self._index, index)
        return k if k < len(self._index) and self._index[k] == index else -1

    def __getitem__(self, index: int) -> list[Layer]:
        k = self._find(index)
        if k < 0:
            raise KeyError(index)
        return _decode_layers(self._data, self._offset[k])

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self._find(index) >= 0

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[int]:
        return iter(self._index)

    def items(self) -> Iterator[tuple[int, list[Layer]]]:  # type: ignore[override]
        """In chunk order, without a lookup per chunk."""
        for index, offset in zip(self._index, self._offset, strict=True):
            yield index, _decode_layers(self._data, offset)

    def indexes(self, start: int = 0, stop: int | None = None) -> array[int]:
        """The layered chunks in [start, stop), in order (a compact array)."""
        lo = bisect.bisect_left(self._index, start)
        hi = len(self._index) if stop is None else bisect.bisect_left(self._index, stop)
        return self._index[lo:hi]

    def layer_counts(self) -> Iterator[tuple[int, int]]:
        """(chunk index, its number of layers), in order, reading only each entry's head."""
        for offset in self._offset:
            yield _PAIR.unpack_from(self._data, offset)

    def blob_ids(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The stored blobs of the layers of chunks in [start, stop) (never the zero id), with repeats."""
        lo = bisect.bisect_left(self._index, start)
        hi = len(self._index) if stop is None else bisect.bisect_left(self._index, stop)
        data = self._data
        for k in range(lo, hi):
            pos = self._offset[k]
            _, n_layers = _PAIR.unpack_from(data, pos)
            pos += _PAIR.size
            for _ in range(n_layers):
                blob_id = bytes(data[pos : pos + ID_SIZE])
                (n_ranges,) = _LEN.unpack_from(data, pos + ID_SIZE)
                pos += ID_SIZE + _LEN.size + n_ranges * _PAIR.size
                if blob_id != ZERO_ID:
                    yield blob_id

    def encode(self) -> bytes:
        return _LEN.pack(len(self._index)) + bytes(memoryview(self._data)[self._base :])

    def pieces(self) -> Iterator[bytes | memoryview]:
        """``encode`` a piece at a time (a manifest is sealed as a stream)."""
        yield _LEN.pack(len(self._index))
        yield memoryview(self._data)[self._base :]

    @property
    def encoded_size(self) -> int:
        return _LEN.size + len(self._data) - self._base

    @classmethod
    def decode(cls, data: bytes | bytearray, chunk_count: int, chunk_length: Callable[[int], int], what: str) -> Deltas:
        """Check every entry (chunk order and range, counts, ranges in order inside their chunk), keeping
        ``data`` itself (not a copy); anything else is VAULT_CORRUPT."""

        def bad(why: str) -> VaultCorrupt:
            return VaultCorrupt(f"{what}: malformed deltas: {why}", object=what)

        size = len(data)

        def need(pos: int, n: int) -> None:
            if pos + n > size:
                raise bad("truncated")

        need(0, _LEN.size)
        (count,) = _LEN.unpack_from(data, 0)
        out = cls()
        out._data, out._base = data, _LEN.size
        body, pos, last = data, _LEN.size, -1
        for _ in range(count):
            need(pos, _PAIR.size)
            index, n_layers = _PAIR.unpack_from(body, pos)
            if not last < index < chunk_count:
                raise bad(f"chunk index {index} out of order or range")
            if not 0 < n_layers <= MAX_DELTA_ITEMS:
                raise bad(f"{n_layers} layers on chunk {index}")
            out._index.append(index)
            out._offset.append(pos)
            last, length = index, chunk_length(index)
            pos += _PAIR.size
            for _ in range(n_layers):
                need(pos, ID_SIZE + _LEN.size)
                (n_ranges,) = _LEN.unpack_from(body, pos + ID_SIZE)
                if not 0 < n_ranges <= MAX_DELTA_ITEMS:
                    raise bad(f"{n_ranges} ranges in a layer of chunk {index}")
                pos += ID_SIZE + _LEN.size
                need(pos, n_ranges * _PAIR.size)
                end = 0
                for off, n in _PAIR.iter_unpack(body[pos : pos + n_ranges * _PAIR.size]):
                    if n == 0 or off < end or off + n > length:
                        raise bad(f"range ({off}, {n}) of chunk {index}")
                    end = off + n
                pos += n_ranges * _PAIR.size
        if pos != size:
            raise bad("trailing bytes")
        return out


def _decode_layers(data: bytes | bytearray, pos: int) -> list[Layer]:
    _, n_layers = _PAIR.unpack_from(data, pos)
    pos += _PAIR.size
    layers = []
    for _ in range(n_layers):
        blob_id = bytes(data[pos : pos + ID_SIZE])
        (n_ranges,) = _LEN.unpack_from(data, pos + ID_SIZE)
        pos += ID_SIZE + _LEN.size
        ranges = tuple(_PAIR.iter_unpack(data[pos : pos + n_ranges * _PAIR.size]))
        pos += n_ranges * _PAIR.size
        layers.append(Layer(blob_id, ranges))
    return layers


class NewEntries:
    """Entries a backup encodes as its workers finish chunks, in any order, each chunk once: 12 bytes and
    the entry itself a chunk. Not thread-safe."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._index = array("I")
        self._offset = array("I")  # 8 bytes wide only once the entries pass 4 GiB

    def add(self, index: int, layers: Sequence[Layer]) -> None:
        at = len(self._data)
        if at >> 32 and self._offset.typecode == "I":
            self._offset = array("Q", self._offset)
        self._index.append(index)
        self._offset.append(at)
        self._data += encode_layers(index, layers)

    def __len__(self) -> int:
        return len(self._index)

    def in_order(self) -> Iterator[tuple[int, memoryview]]:
        """(chunk index, its entry), in chunk order."""
        n = len(self._index)
        if not n:
            return
        top = max(self._index)
        if top < 16 * n:  # where each chunk's entry is, 4 bytes a chunk: no list of a million ints to sort
            where = array("i", [-1]) * (top + 1)
            for k, i in enumerate(self._index):
                where[i] = k
            order: Iterable[int] = (k for k in where if k >= 0)
        else:
            order = sorted(range(n), key=self._index.__getitem__)
        for k in order:
            end = self._offset[k + 1] if k + 1 < n else len(self._data)
            yield self._index[k], memoryview(self._data)[self._offset[k] : end]


def _merge(kept: Deltas, keep: Callable[[int], bool], new: NewEntries) -> Iterator[tuple[int, memoryview]]:
    fresh = new.in_order()
    nxt = next(fresh, None)
    for k, index in enumerate(kept._index):
        while nxt is not None and nxt[0] < index:
            yield nxt
            nxt = next(fresh, None)
        if nxt is not None and nxt[0] == index:
            continue  # replaced by the new entry
        if keep(index):
            yield index, kept._entry_at(k)
    while nxt is not None:
        yield nxt
        nxt = next(fresh, None)


class MergedDeltas(Deltas):
    """``kept``'s entries for which ``keep`` holds, and ``new``'s, in chunk order (``new`` wins where both
    have one), not built: a new manifest's count, size and encoding come from the parent's entries and
    the new ones as they are, copied encoded, one pass each (a terabyte's half-million layered chunks would
    otherwise be held twice while the manifest is written). Anything else builds it first."""

    __slots__ = ("_built", "_count", "_parts", "_size")

    def __init__(self, kept: Deltas, keep: Callable[[int], bool], new: NewEntries) -> None:
        super().__init__()
        self._parts, self._built = (kept, keep, new), False
        self._count = self._size = 0
        for _, entry in _merge(kept, keep, new):
            self._count += 1
            self._size += len(entry)

    def _build(self) -> None:
        if not self._built:
            self._built = True
            for index, entry in _merge(*self._parts):
                self.append_entry(index, entry)

    def __len__(self) -> int:
        return self._count if not self._built else super().__len__()

    @property
    def encoded_size(self) -> int:
        return _LEN.size + self._size if not self._built else super().encoded_size

    def pieces(self) -> Iterator[bytes | memoryview]:
        if self._built:
            yield from super().pieces()
            return
        yield _LEN.pack(self._count)
        buf = bytearray()
        for _, entry in _merge(*self._parts):
            buf += entry
            if len(buf) >= 1 << 20:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    def encode(self) -> bytes:
        return b"".join(self.pieces())

    def __getitem__(self, index: int) -> list[Layer]:
        self._build()
        return super().__getitem__(index)

    def __contains__(self, index: object) -> bool:
        self._build()
        return super().__contains__(index)

    def __iter__(self) -> Iterator[int]:
        self._build()
        return super().__iter__()

    def items(self) -> Iterator[tuple[int, list[Layer]]]:  # type: ignore[override]
        self._build()
        return super().items()

    def indexes(self, start: int = 0, stop: int | None = None) -> array[int]:
        self._build()
        return super().indexes(start, stop)

    def layer_counts(self) -> Iterator[tuple[int, int]]:
        self._build()
        return super().layer_counts()

    def blob_ids(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        self._build()
        return super().blob_ids(start, stop)
