"""A vault's index rows grouped by the pack they point into, out of memory past a few megabytes.

Verify reads every pack once and checks every blob the index lists in it, so it needs the rows by pack,
while the index lists them by index object. Held as a table that is ~58 bytes a chunk: a vault of
ten million chunks would need 580 MB. Here rows go to partitions by pack id (``Partitions``: spilled
to an unnamed temporary file), and each partition is read back, grouped and sorted alone: memory
follows a partition (PARTITION rows), not the vault.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator

from raksha.vault.format.index import Location
from raksha.vault.format.scratch import Partitions

PARTITION = 1 << 15  # rows a partition holds on average, grouped in memory at once (~8 MB as tuples)
MAX_PARTITIONS = 1 << 12
BUFFER_BYTES = 4 << 20  # the partitions' write buffers, all together
# Pack id, offset (big-endian), chunk id, stored and raw length: records sort as bytes by pack, then offset.
_ROW = struct.Struct(">32sQ32sII")
_AFTER_PACK = b"\xff" * (_ROW.size - 32)  # after every record of a pack, appended to its id

PackRows = tuple[bytes, list[tuple[bytes, Location]]]  # a pack id and its (chunk id, location)s by offset


class RowsByPack:
    """Index rows, about ``expected`` of them, added with ``add_rows``; ``packs`` gives them by pack, as
    often as asked (gc goes over them several times, and adds an orphan pack's rows on the way)."""

    def __init__(self, expected: int, what: str) -> None:
        parts = min(MAX_PARTITIONS, 1 << (max(1, -(-expected // PARTITION)) - 1).bit_length())  # a power of two
        self._mask = parts - 1
        self._parts = Partitions(parts, BUFFER_BYTES, what, min_flush=64 * _ROW.size)
        self.rows = 0
        self.stored_bytes = 0

    def add_rows(self, rows: Iterable[tuple[bytes, bytes, int, int, int]]) -> None:
        """(chunk id, pack id, offset, stored length, raw length) rows, as an index object holds them."""
        parts, mask, pack_row = self._parts, self._mask, _ROW.pack
        buffers, flush_at = parts.buffers, parts.flush_at
        count = stored_bytes = 0
        for cid, pack_id, offset, stored, raw in rows:
            part = hash(pack_id) & mask  # seeded per process: no crafted ids pile into one partition
            buf = buffers[part]
            buf += pack_row(pack_id, offset, cid, stored, raw)
            count += 1
            stored_bytes += stored
            if len(buf) >= flush_at:
                parts.spill(part)
        self.rows += count
        self.stored_bytes += stored_bytes

    def packs(self) -> Iterator[PackRows]:
        """Every pack with its rows, each (chunk id, offset) once and by offset; a partition at a time."""
        size = _ROW.size
        for part in range(self._mask + 1):
            data = self._parts.read(part)
            records = [data[i : i + size] for i in range(0, len(data), size)]
            del data
            # Index objects list a pack's rows together and by offset: sorted runs, which a sort merges
            # in near linear time (a set first would scramble them: 3x slower). Repeats are then
            # neighbours, and dropped keeping that order.
            records.sort()
            records = list(dict.fromkeys(records))
            start = 0
            while start < len(records):
                pack_id = records[start][:32]
                end = bisect.bisect_left(records, pack_id + _AFTER_PACK, start)
                yield pack_id, [(cid, Location(pack_id, offset, stored, raw))
                                for _pack, offset, cid, stored, raw in _ROW.iter_unpack(b"".join(records[start:end]))]
                start = end

    def close(self) -> None:
        """Free the temporary file (dropping this does too, later)."""
        self._parts.close()
