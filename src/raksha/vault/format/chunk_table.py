"""Compact in-memory tables keyed by chunk id: the vault's chunk index, and sets of ids.

A ``dict[bytes, Location]`` costs about 385 bytes a chunk (the key, a Location, its pack id, three
ints, the dict's slot): 480 MB for a vault of a million chunks (1 TiB of data at 1 MiB chunks), and
every backup and restore loads the whole index. Here a chunk costs its row (the 32-byte id, and 16
bytes of location in a ``ChunkTable``) in one ``bytearray`` plus 7-13 bytes of hash slots.

Open addressing with linear probing, slots holding row numbers + 1 (0: empty), indexed by Python's
own hash of the id (SipHash with a per-process seed, so ids crafted to collide cannot degrade
it). Rows are never removed: nothing removes entries from a loaded index or an id set.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Container, Iterable, Iterator, Mapping, Set

from raksha.vault.format.constants import ID_SIZE
from raksha.vault.format.index import Location

_MIN_SLOTS = 1 << 8
UNLOCATED = 0xFFFFFFFF  # a ChunkLocator row's pack number until the index gives its location
_FIELDS = struct.Struct("<IIII")  # pack number, offset, stored length, raw length
_ROW = struct.Struct(f"<{ID_SIZE}sIIII")


class _IdRows:
    """Rows of ``width`` bytes, each starting with a distinct chunk id, found by id."""

    __slots__ = ("_count", "_mask", "_rows", "_slots", "_width")

    def __init__(self, width: int) -> None:
        self._width = width
        self._rows = bytearray()
        self._count = 0
        self._slots = array("I", bytes(4 * _MIN_SLOTS))
        self._mask = _MIN_SLOTS - 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        rows, width = self._rows, self._width
        for start in range(0, self._count * width, width):
            yield bytes(rows[start : start + ID_SIZE])

    def _find(self, cid: bytes) -> tuple[int, int]:
        """(row, slot): the id's row, -1 when absent, and the slot that holds it or would."""
        slots, mask, rows, width = self._slots, self._mask, self._rows, self._width
        i = hash(cid) & mask
        while True:
            r = slots[i]
            if not r:
                return -1, i
            start = (r - 1) * width
            if rows[start : start + ID_SIZE] == cid:
                return r - 1, i
            i = (i + 1) & mask

    def _append(self, slot: int, row: bytes) -> None:
        end = self._count * self._width
        if end < len(self._rows):  # room reserved
            self._rows[end : end + self._width] = row
        else:
            self._rows += row
        self._count += 1
        self._slots[slot] = self._count
        if self._count * 5 > len(self._slots) * 3:  # load factor 0.6: short probes, 7-13 bytes a row
            self._resize(self._count)

    def reserve(self, count: int) -> None:
        """Make room for ``count`` rows in all: loading them then rehashes nothing and grows no buffer
        (growing by reallocation left freed pieces of the heap that a process never gave back)."""
        if count * 5 > len(self._slots) * 3:
            self._resize(count)
        used = self._count * self._width
        if count * self._width > len(self._rows):
            rows = bytearray(count * self._width)
            rows[:used] = memoryview(self._rows)[:used]
            self._rows = rows

    def _add_ids(self, ids: Iterable[bytes], rest: bytes) -> None:
        """A row of each id not here yet: the id, then ``rest``. ``_find`` and ``_append`` inlined: a
        set of a million ids is built with this."""
        rows, slots, mask, count, width = self._rows, self._slots, self._mask, self._count, self._width
        try:
            for cid in ids:
                if len(cid) != ID_SIZE:
                    raise ValueError("a chunk id is 32 bytes")
                i = hash(cid) & mask
                while r := slots[i]:
                    start = (r - 1) * width
                    if rows[start : start + ID_SIZE] == cid:
                        break
                    i = (i + 1) & mask
                else:
                    end = count * width
                    if end < len(rows):  # room reserved
                        rows[end : end + width] = cid + rest
                    else:
                        rows += cid + rest
                    count += 1
                    slots[i] = count
                    if count * 5 > len(slots) * 3:
                        self._count = count
                        self._resize(count)
                        slots, mask = self._slots, self._mask
        finally:
            self._count = count  # what was added stays consistent, whatever stopped the loop

    def _resize(self, count: int) -> None:
        size = len(self._slots)
        while count * 5 > size * 3:
            size *= 2
        slots, mask, rows, width = array("I", bytes(4 * size)), size - 1, self._rows, self._width
        for r in range(self._count):
            start = r * width
            i = hash(bytes(rows[start : start + ID_SIZE])) & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = r + 1
        self._slots, self._mask = slots, mask


class IdSet(_IdRows, Set[bytes]):
    """A set of chunk ids at about 45 bytes an id (a ``set[bytes]`` takes about 100)."""

    __slots__ = ()

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        super().__init__(ID_SIZE)
        self.update(ids)

    def __contains__(self, cid: object) -> bool:
        # _find inlined: gc asks this millions of times (2.3 -> 1.1 s a million)
        if type(cid) is not bytes:
            return False
        slots, mask, rows = self._slots, self._mask, self._rows
        i = hash(cid) & mask
        while r := slots[i]:
            start = (r - 1) << 5  # rows are ids alone: 32 bytes
            if rows[start : start + 32] == cid:
                return True
            i = (i + 1) & mask
        return False

    def missing_of(self, ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``ids`` not in the set: ``__contains__`` inlined once for them all (a backup asks this of
        every distinct id of its parent: ~1 µs an id one call at a time)."""
        slots, mask, rows = self._slots, self._mask, self._rows
        out = set()
        for cid in ids:
            i = hash(cid) & mask
            while r := slots[i]:
                start = (r - 1) << 5
                if rows[start : start + 32] == cid:
                    break
                i = (i + 1) & mask
            else:
                out.add(cid)
        return out

    def add(self, cid: bytes) -> None:
        if len(cid) != ID_SIZE:
            raise ValueError("a chunk id is 32 bytes")
        row, slot = self._find(cid)
        if row < 0:
            self._append(slot, cid)

    def row_of(self, cid: bytes) -> int:
        """The id's row (0 to len - 1, in the order added), or -1: a key into arrays beside the set."""
        return self._find(cid)[0] if type(cid) is bytes else -1

    def buffer(self) -> memoryview:
        """The ids one after another, in the order added."""
        return memoryview(self._rows)[: self._count * ID_SIZE]

    def update(self, ids: Iterable[bytes]) -> None:
        """``add`` for each."""
        self._add_ids(ids, b"")


class ChunkTable(_IdRows, Mapping[bytes, Location]):
    """chunk id -> Location, at about 58 bytes a chunk. Adding an id again replaces its location."""

    __slots__ = ("_pack_numbers", "_packs")

    def __init__(self) -> None:
        super().__init__(_ROW.size)
        self._packs: list[bytes] = []  # pack number -> pack id: a vault has thousands of packs, not millions
        self._pack_numbers: dict[bytes, int] = {}

    def __contains__(self, cid: object) -> bool:
        if type(cid) is not bytes:  # _find inlined, as in IdSet
            return False
        slots, mask, rows, width = self._slots, self._mask, self._rows, self._width
        i = hash(cid) & mask
        while r := slots[i]:
            start = (r - 1) * width
            if rows[start : start + ID_SIZE] == cid:
                return True
            i = (i + 1) & mask
        return False

    def __getitem__(self, cid: bytes) -> Location:
        loc = self.get(cid)
        if loc is None:
            raise KeyError(cid)
        return loc

    def get(self, cid: bytes, default: Location | None = None) -> Location | None:  # type: ignore[override]
        row = self._find(cid)[0] if isinstance(cid, bytes) else -1
        if row < 0:
            return default
        _cid, pack, offset, stored, raw = _ROW.unpack_from(self._rows, row * _ROW.size)
        # Only a ChunkLocator holds UNLOCATED rows: an id it wants whose location no index gave yet.
        return default if pack == UNLOCATED else Location(self._packs[pack], offset, stored, raw)

    def rows(self) -> Iterator[tuple[bytes, bytes, int, int, int]]:
        """(chunk id, pack id, offset, stored length, raw length) of every chunk, as index files list them."""
        packs = self._packs
        for cid, pack, offset, stored, raw in _ROW.iter_unpack(memoryview(self._rows)[: self._count * _ROW.size]):
            yield cid, packs[pack], offset, stored, raw

    def items(self) -> Iterator[tuple[bytes, Location]]:  # type: ignore[override]
        """Without a lookup per chunk (``Mapping.items`` would find each key again)."""
        for cid, pack_id, offset, stored, raw in self.rows():
            yield cid, Location(pack_id, offset, stored, raw)

    def add(self, cid: bytes, pack_id: bytes, offset: int, stored_length: int, raw_length: int) -> None:
        pack = self._pack_numbers.get(pack_id)
        if pack is None:
            pack = self._pack_numbers[pack_id] = len(self._packs)
            self._packs.append(pack_id)
        row, slot = self._find(cid)
        if row >= 0:
            _FIELDS.pack_into(self._rows, row * _ROW.size + ID_SIZE, pack, offset, stored_length, raw_length)
        else:
            self._append(slot, _ROW.pack(cid, pack, offset, stored_length, raw_length))

    def update_rows(self, rows: Iterable[tuple[bytes, bytes, int, int, int]],
                    keep: Container[bytes] | None = None) -> None:
        """Add (chunk id, pack id, offset, stored length, raw length) rows, as an index file holds them;
        with ``keep``, only the rows of those ids.

        ``add`` inlined: loading a vault's index is a million of these (0.96 -> 0.5 s)."""
        width, pack_row, pack_row_into, pack_fields = _ROW.size, _ROW.pack, _ROW.pack_into, _FIELDS.pack_into
        buf, slots, mask, count = self._rows, self._slots, self._mask, self._count
        last_pack_id, pack = b"", 0
        try:
            for cid, pack_id, offset, stored, raw in rows:
                if keep is not None and cid not in keep:
                    continue
                if pack_id != last_pack_id:  # an index object lists a pack's chunks together
                    number = self._pack_numbers.get(pack_id)
                    if number is None:
                        number = self._pack_numbers[pack_id] = len(self._packs)
                        self._packs.append(pack_id)
                    last_pack_id, pack = pack_id, number
                i = hash(cid) & mask
                while r := slots[i]:
                    start = (r - 1) * width
                    if buf[start : start + ID_SIZE] == cid:
                        pack_fields(buf, start + ID_SIZE, pack, offset, stored, raw)
                        break
                    i = (i + 1) & mask
                else:
                    end = count * width
                    if end < len(buf):  # room reserved
                        pack_row_into(buf, end, cid, pack, offset, stored, raw)
                    else:
                        buf += pack_row(cid, pack, offset, stored, raw)
                    count += 1
                    slots[i] = count
                    if count * 5 > len(slots) * 3:
                        self._count = count
                        self._resize(count)
                        slots, mask = self._slots, self._mask
        finally:
            self._count = count  # what was added stays consistent, whatever stopped the loop


class ChunkLocator(ChunkTable):
    """The ids something needs, then their locations: one table for both (~58 bytes an id).

    Verify adds the ids of packs that vanished while it ran (``add_ids``), then reads the index through
    ``locate_rows``, which fills in the rows already here and adds none; ``get`` answers None for an id
    wanted and not located yet.
    """

    __slots__ = ()

    def add_ids(self, ids: Iterable[bytes]) -> None:
        """Want these ids; their rows stay unlocated until ``locate_rows`` sees them."""
        self._add_ids(ids, _FIELDS.pack(UNLOCATED, 0, 0, 0))

    def forget_locations(self) -> None:
        """Every row unlocated again (a load of the index that starts over)."""
        rows, width = self._rows, self._width
        for start in range(ID_SIZE, self._count * width, width):
            _FIELDS.pack_into(rows, start, UNLOCATED, 0, 0, 0)

    def locate_rows(self, rows: Iterable[tuple[bytes, bytes, int, int, int]]) -> None:
        """Rows as an index file holds them: each of a wanted id sets (or replaces) its location; the
        others are skipped."""
        self.update_rows(rows, keep=self)

    def unlocated(self) -> Iterator[bytes]:
        """The wanted ids no index row has located."""
        view = memoryview(self._rows)[: self._count * _ROW.size]
        for cid, pack, _offset, _stored, _raw in _ROW.iter_unpack(view):
            if pack == UNLOCATED:
                yield cid
