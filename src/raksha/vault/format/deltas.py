"""A manifest's delta layers (format.md §8.1), kept in their encoded form.

As ``dict[int, list[Layer]]`` a layered chunk cost ~425 bytes (the list, a Layer, its id, its tuples of
ranges); a large disk that took scattered writes carries layers on up to half its chunks (ADR 0011), so
a 256 GiB disk's manifest took 100 MB and a terabyte's would take several hundred. Here a layered chunk
costs its encoding (52 bytes for one layer of one range), in a temporary file once there are many, and
8 bytes of index: the chunk number and where its entry starts. Layers are decoded when asked for.

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
from raksha.vault.format.scratch import SpillingBuffer

_LEN = struct.Struct("<I")
_PAIR = struct.Struct("<II")
MAX_DELTA_ITEMS = 65536  # layers per chunk, ranges per layer (format.md §8.1)
_READ_AHEAD = 1 << 20  # entries are read back in pieces of this size
_WHAT = "a large disk's delta layers"


@dataclass(frozen=True)
class Layer:
    """One delta layer on a chunk (format.md §8.1): ``blob_id``'s bytes overwrite ``ranges`` in order.

    ``blob_id`` is the zero id when the bytes are all zero (nothing stored)."""

    blob_id: bytes
    ranges: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(n for _, n in self.ranges)


def covered_ranges(layers: Sequence[Layer], ranges: Iterable[tuple[int, int]] = ()) -> tuple[tuple[int, int], ...]:
    """Every byte ``layers`` and ``ranges`` write, as ascending ranges that neither overlap nor touch:
    the ranges of the one layer that does what they do, applied in order (format.md §8.1)."""
    spans = sorted([*(r for layer in layers for r in layer.ranges), *ranges])
    out: list[tuple[int, int]] = []
    for off, n in spans:
        if out and off <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], off + n - start))
        else:
            out.append((off, n))
    return tuple(out)


def live_layers(layers: Sequence[Layer], ranges: Sequence[tuple[int, int]]) -> list[Layer]:
    """``layers`` without those that later layers and then ``ranges`` overwrite entirely: with them or
    without, the layers and then ``ranges`` applied in order give the same bytes."""
    live: list[Layer] = []
    covered = covered_ranges((), ranges)
    for layer in reversed(layers):
        if not all(_inside(r, covered) for r in layer.ranges):
            live.append(layer)
            covered = covered_ranges([layer], covered)
    live.reverse()
    return live


def _inside(r: tuple[int, int], covered: Sequence[tuple[int, int]]) -> bool:
    """Whether range ``r`` lies within one of ``covered`` (ascending, not touching)."""
    k = bisect.bisect_right(covered, (r[0], 1 << 62)) - 1
    return k >= 0 and covered[k][0] + covered[k][1] >= r[0] + r[1]


def encode_layers(index: int, layers: Sequence[Layer]) -> bytes:
    """Chunk ``index``'s entry."""
    parts = [_PAIR.pack(index, len(layers))]
    for layer in layers:
        parts.append(layer.blob_id + _LEN.pack(len(layer.ranges)))
        parts.extend(_PAIR.pack(off, n) for off, n in layer.ranges)
    return b"".join(parts)


class Deltas(Mapping[int, list[Layer]]):
    """Chunk index -> its layers, in order; entries are appended in increasing chunk order.

    The encoded entries are a ``SpillingBuffer``: past 1 MiB (~20,000 layered chunks) they live in a
    temporary file, and a layered chunk costs the process 8 bytes (its chunk number and where its entry
    starts), whatever the disk's size. Entries are read back in order a piece at a time, or one by one."""

    __slots__ = ("_index", "_offset", "_store")

    def __init__(self, items: Mapping[int, Sequence[Layer]] | None = None) -> None:
        self._store = SpillingBuffer(_WHAT)
        self._index = array("I")  # chunk numbers, increasing
        self._offset = array("I")  # where each one's entry starts in _store; 8 bytes wide past 4 GiB
        for i in sorted(items or ()):
            assert items is not None
            self.append(i, items[i])

    def append(self, index: int, layers: Sequence[Layer]) -> None:
        self.append_entry(index, encode_layers(index, layers))

    def append_entry(self, index: int, entry: bytes | memoryview) -> None:
        """Add chunk ``index``'s encoded entry (from ``encode_layers``); after every other."""
        if self._index and index <= self._index[-1]:
            raise ValueError("delta entries are added in increasing chunk order")
        self._index.append(index)
        self._offset = _append_offset(self._offset, self._store.append(entry))

    def _end(self, k: int) -> int:
        return self._offset[k + 1] if k + 1 < len(self._offset) else self._store.size

    def _entry_at(self, k: int) -> bytes | memoryview:
        return self._store.read(self._offset[k], self._end(k) - self._offset[k])

    def _entries(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """(chunk index, entry) of entries ``lo`` to ``hi``, in order, read a piece at a time."""
        hi = len(self._index) if hi is None else hi
        buf: bytes | memoryview = b""
        at = 0
        for k in range(lo, hi):
            start, end = self._offset[k], self._end(k)
            if end > at + len(buf):
                buf, at = self._store.read(start, max(end, min(start + _READ_AHEAD, self._end(hi - 1))) - start), start
            yield self._index[k], memoryview(buf)[start - at : end - at]

    def _find(self, index: int) -> int:
        k = bisect.bisect_left(self._index, index)
        return k if k < len(self._index) and self._index[k] == index else -1

    def __getitem__(self, index: int) -> list[Layer]:
        k = self._find(index)
        if k < 0:
            raise KeyError(index)
        return _decode_layers(self._entry_at(k), 0)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self._find(index) >= 0

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[int]:
        return iter(self._index)

    def items(self) -> Iterator[tuple[int, list[Layer]]]:  # type: ignore[override]
        """In chunk order, without a lookup per chunk."""
        for index, entry in self._entries():
            yield index, _decode_layers(entry, 0)

    def indexes(self, start: int = 0, stop: int | None = None) -> array[int]:
        """The layered chunks in [start, stop), in order (a compact array)."""
        lo, hi = self._span(start, stop)
        return self._index[lo:hi]

    def _span(self, start: int, stop: int | None) -> tuple[int, int]:
        lo = bisect.bisect_left(self._index, start)
        return lo, len(self._index) if stop is None else bisect.bisect_left(self._index, stop)

    def layer_counts(self) -> Iterator[tuple[int, int]]:
        """(chunk index, its number of layers), in order, reading only each entry's head."""
        for _, entry in self._entries():
            yield _PAIR.unpack_from(entry, 0)

    def blob_ids(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The stored blobs of the layers of chunks in [start, stop) (never the zero id), with repeats."""
        for _, entry in self._entries(*self._span(start, stop)):
            _, n_layers = _PAIR.unpack_from(entry, 0)
            pos = _PAIR.size
            for _ in range(n_layers):
                blob_id = bytes(entry[pos : pos + ID_SIZE])
                (n_ranges,) = _LEN.unpack_from(entry, pos + ID_SIZE)
                pos += ID_SIZE + _LEN.size + n_ranges * _PAIR.size
                if blob_id != ZERO_ID:
                    yield blob_id

    def encode(self) -> bytes:
        return b"".join(self.pieces())

    def pieces(self) -> Iterator[bytes | memoryview]:
        """``encode`` a piece at a time (a manifest is sealed as a stream)."""
        yield _LEN.pack(len(self._index))
        yield from self._store.pieces()

    @property
    def encoded_size(self) -> int:
        return _LEN.size + self._store.size

    @classmethod
    def read(cls, read: Callable[[int], bytes | memoryview], size: int, chunk_count: int,
             chunk_length: Callable[[int], int], what: str) -> Deltas:
        """The ``size`` bytes of encoded deltas that ``read(n)`` gives in order (a manifest's payload, read
        a piece at a time). Checks every entry (chunk order and range, counts, ranges in order inside
        their chunk); anything else is VAULT_CORRUPT."""

        def bad(why: str) -> VaultCorrupt:
            return VaultCorrupt(f"{what}: malformed deltas: {why}", object=what)

        src = _Pieces(read, size, bad)
        (count,) = _LEN.unpack(src.take(_LEN.size))
        out = cls()
        last = -1
        for _ in range(count):
            src.begin()
            index, n_layers = _PAIR.unpack(src.take(_PAIR.size))
            if not last < index < chunk_count:
                raise bad(f"chunk index {index} out of order or range")
            if not 0 < n_layers <= MAX_DELTA_ITEMS:
                raise bad(f"{n_layers} layers on chunk {index}")
            last, length = index, chunk_length(index)
            for _ in range(n_layers):
                (n_ranges,) = _LEN.unpack(src.take(ID_SIZE + _LEN.size)[ID_SIZE:])
                if not 0 < n_ranges <= MAX_DELTA_ITEMS:
                    raise bad(f"{n_ranges} ranges in a layer of chunk {index}")
                end = 0
                for off, n in _PAIR.iter_unpack(src.take(n_ranges * _PAIR.size)):
                    if n == 0 or off < end or off + n > length:
                        raise bad(f"range ({off}, {n}) of chunk {index}")
                    end = off + n
            out.append_entry(index, src.entry())
        if not src.done:
            raise bad("trailing bytes")
        return out


class _Pieces:
    """Encoded deltas read a piece at a time; an entry's bytes are kept from ``begin`` to ``entry``."""

    def __init__(self, read: Callable[[int], bytes | memoryview], size: int,
                 bad: Callable[[str], VaultCorrupt]) -> None:
        self._read, self._left, self._bad = read, size, bad
        self._buf = bytearray()
        self._pos = self._start = 0

    def begin(self) -> None:
        if self._pos > _READ_AHEAD:
            del self._buf[: self._pos]
            self._pos = 0
        self._start = self._pos

    def take(self, n: int) -> memoryview:
        while len(self._buf) - self._pos < n:
            if not self._left:
                raise self._bad("truncated")
            more = min(self._left, _READ_AHEAD)
            self._buf += self._read(more)
            self._left -= more
        self._pos += n
        return memoryview(self._buf)[self._pos - n : self._pos]

    def entry(self) -> bytes:
        return bytes(self._buf[self._start : self._pos])

    @property
    def done(self) -> bool:
        return not self._left and self._pos == len(self._buf)


def _append_offset(offsets: array[int], at: int) -> array[int]:
    if at >> 32 and offsets.typecode == "I":
        offsets = array("Q", offsets)
    offsets.append(at)
    return offsets


def _decode_layers(data: bytes | bytearray | memoryview, pos: int) -> list[Layer]:
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
    """Entries a backup encodes as its workers finish chunks, in any order, each chunk once: 8 bytes a
    chunk, and the entry itself in a ``SpillingBuffer``. Not thread-safe."""

    def __init__(self) -> None:
        self._store = SpillingBuffer(_WHAT)
        self._index = array("I")
        self._offset = array("I")  # 8 bytes wide only once the entries pass 4 GiB

    def add(self, index: int, layers: Sequence[Layer]) -> None:
        self._index.append(index)
        self._offset = _append_offset(self._offset, self._store.append(encode_layers(index, layers)))

    def __len__(self) -> int:
        return len(self._index)

    def in_order(self) -> Iterator[tuple[int, bytes | memoryview]]:
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
            end = self._offset[k + 1] if k + 1 < n else self._store.size
            yield self._index[k], self._store.read(self._offset[k], end - self._offset[k])


def _merge(kept: Deltas, keep: Callable[[int], bool], new: NewEntries) -> Iterator[tuple[int, bytes | memoryview]]:
    fresh = new.in_order()
    nxt = next(fresh, None)
    for index, entry in kept._entries():
        while nxt is not None and nxt[0] < index:
            yield nxt
            nxt = next(fresh, None)
        if nxt is not None and nxt[0] == index:
            continue  # replaced by the new entry
        if keep(index):
            yield index, entry
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
