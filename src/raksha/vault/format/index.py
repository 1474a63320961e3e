"""Index files (format.md §7): chunk id -> (pack, offset, lengths)."""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from raksha.domain.errors import VaultCorrupt
from raksha.vault.format.constants import ID_SIZE, INDEX_MAGIC
from raksha.vault.format.crypto import Crypto
from raksha.vault.format.sealed import open_object, seal_object

_ENTRY = struct.Struct("<32s32sIII")
INDEX_ROW_SIZE = _ENTRY.size
_COUNT = struct.Struct("<I")
INDEX_NONCE_SIZE = 16


class Location(NamedTuple):
    """Where a chunk's blob lies. A named tuple: made for every row that gc, verify and a restore's
    plan go over (a frozen dataclass took ~1.3 µs to make, four times as long)."""

    pack_id: bytes
    offset: int
    stored_length: int
    raw_length: int


@dataclass
class IndexFile:
    """An index object's content: its entries stay packed as stored until asked for."""

    records: bytes | memoryview  # count x _ENTRY
    supersedes: list[bytes]

    def __len__(self) -> int:
        return len(self.records) // _ENTRY.size

    def rows(self) -> Iterator[tuple[bytes, bytes, int, int, int]]:
        """(chunk id, pack id, offset, stored length, raw length) per entry, without a Location each."""
        return _ENTRY.iter_unpack(self.records)

    @functools.cached_property
    def entries(self) -> dict[bytes, Location]:
        return {cid: Location(pack_id, offset, stored, raw) for cid, pack_id, offset, stored, raw in self.rows()}


def index_key(index_id: str) -> str:
    return f"index/{index_id}"


def index_rows(entries: Iterable[tuple[bytes, Location]]) -> bytes:
    """(chunk id, location) pairs packed as an index object lists them; rows concatenate."""
    return b"".join(_ENTRY.pack(cid, loc.pack_id, loc.offset, loc.stored_length, loc.raw_length)
                    for cid, loc in entries)


def encode_index(entries: Mapping[bytes, Location] | bytes | bytearray, crypto: Crypto,
                 supersedes: list[bytes] | None = None) -> bytes:
    """An index object of ``entries``: a mapping, or rows already packed by ``index_rows``."""
    rows = entries if isinstance(entries, bytes | bytearray) else index_rows(entries.items())
    if len(rows) % _ENTRY.size:
        raise ValueError("index rows are whole entries")
    supersedes = supersedes or []
    # The nonce makes every index object unique, so an index id is never reused after a delete.
    parts = [os.urandom(INDEX_NONCE_SIZE), _COUNT.pack(len(supersedes)), *supersedes,
             _COUNT.pack(len(rows) // _ENTRY.size), rows]
    return seal_object(INDEX_MAGIC, b"".join(parts), crypto)


def decode_index(data: bytes, crypto: Crypto, *, what: str) -> IndexFile:
    payload = open_object(data, INDEX_MAGIC, crypto, what=what)
    try:
        (n_sup,) = _COUNT.unpack_from(payload, INDEX_NONCE_SIZE)
        pos = INDEX_NONCE_SIZE + 4
        if pos + n_sup * ID_SIZE + 4 > len(payload):  # checked before allocating anything that size
            raise VaultCorrupt(f"{what}: index supersedes more ids than it holds", object=what)
        supersedes = [payload[pos + i * ID_SIZE : pos + (i + 1) * ID_SIZE] for i in range(n_sup)]
        pos += n_sup * ID_SIZE
        (count,) = _COUNT.unpack_from(payload, pos)
        pos += 4
    except struct.error:
        raise VaultCorrupt(f"{what}: truncated index", object=what) from None
    if len(payload) != pos + count * _ENTRY.size:
        raise VaultCorrupt(f"{what}: index size does not match its count", object=what)
    return IndexFile(memoryview(payload)[pos:], supersedes)
